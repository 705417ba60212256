// Attention over many short sequences (STDiT temporal attention), forward and backward. Torch-free: CUDA
// runtime only. See temporal_attention.cuh for the contract.
//
// Work decomposition. A block takes kNSeq consecutive sequences n = (b*S + s)*H + h (so, in the packed qkv
// layout, the rows of several consecutive heads of one token, which are contiguous in memory) and copies all of
// their rows into shared memory in one go with cp.async (every 16-byte piece of the block's inputs is in flight
// at once; consecutive threads take consecutive pieces of a row, and the rows of consecutive sequences follow
// each other). Rows t in [T, T16) (T16 = T rounded up to 16) are zero-filled by the copies themselves, so padded
// keys and queries contribute exact zeros to every product. Each warp then takes one 16-row tile of one
// sequence (an "item": kNSeq * T16 / 16 <= warps of the block) and does its matrix products with mma.sync
// (m16n8k16, fp32 accumulate; an m16n8k8 step covers D % 16 == 8, so D = 72 is not padded) on fragments read
// with ldmatrix. The whole key range of a sequence (T <= 128) is handled in one pass: no online softmax.
// Results are staged in the shared-memory rows of an input that is dead by then and written with 16-byte
// stores by the whole block, in the same coalesced order as the loads.
//
// Shared-memory rows are D elements padded to an odd number of 16-byte pieces, so the 8 rows an ldmatrix
// reads fall in 8 different bank groups (D = 72 needs no padding: 9 pieces).
//
// Forward item (sequence, query tile i):  S = Q_i K^T (16 x T16), masked softmax over the keys t < T in fp32
//   (exp2 domain), P normalised then rounded to the element type, O_i = P V, lse from the row max and sum.
// Backward (q, k, v, dout copied; out read straight into registers, it only feeds delta), three phases
// separated by block barriers (warp barriers when T <= 16: each warp then owns a whole sequence):
//   1. delta_t = sum_d dout[t, d] * out[t, d] for every row (fp32), lse * log2(e) into shared memory.
//   2. item (sequence, key tile j): loops over the query tiles i: S^T = K_j Q_i^T, P^T = exp2(S^T c - lse),
//      dP^T = V_j dO_i^T, dS^T = P^T (dP^T - delta); dV_j += P^T dO_i, dK_j += dS^T Q_i. dS^T (rounded) is
//      kept in shared memory for phase 3.
//   3. item (sequence, query tile i): dQ_i = scale * sum_j dS_ij K_j, with dS_ij read transposed by
//      ldmatrix.trans.
// No atomics: every output element is written once.
//
// Templates: element type, a T bucket (16, 32, 64, 128: register arrays hold a whole row of scores) and a D
// bucket (32, 64, 72, 96, 128: accumulators of the D-wide products); the actual T and D are run-time values
// within the bucket, and tiles past them are skipped.
#include "temporal_attention.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>

namespace openvid {
namespace {

using detail::cp_async_commit;
using detail::cp_async_wait;
using detail::Cvt;
using detail::ld_stream;
using detail::st_vec;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------------------------------------------------
// Configurations, one table per direction with one entry per T bucket (the first entry with T <= t_max is
// used). Items are 16-row tiles of a sequence: kNSeq * t_max / 16 per block. The backward has one warp per item
// (a warp keeps its key tile's dK in registers across a barrier); the forward's warps loop over the items.
struct Config {
  int t_max;       // largest T of the bucket (a multiple of 16)
  int nseq;        // sequences per block
  int warps;       // backward: nseq * t_max / 16; forward: a divisor of that
  int min_blocks;  // __launch_bounds__ minimum blocks per SM at the D bucket of 72 (see min_blocks_at)
};
// T = 16 (the model's case), D = 72 on an H100: forward 61 registers and 28 KB of shared memory per block: 8
// blocks (32 warps) per SM, every byte of a block's inputs in flight at once. Backward: 66 registers, 6 blocks
// of 37 KB.
// T = 128: 4 warps of 2 query tiles each rather than 8 of one: the forward is register-bound (a 128-key row of
// scores), and 4 blocks of 4 warps keep more bytes in flight than 2 blocks of 8.
constexpr Config kForwardConfigs[] = {
    // t_max nseq warps min_blocks
    {16,  4, 4, 5},
    {32,  2, 4, 5},
    {64,  1, 4, 6},
    {128, 1, 4, 4},
};
constexpr Config kBackwardConfigs[] = {
    {16,  4, 4, 6},
    {32,  2, 4, 4},
    {64,  1, 4, 4},
    {128, 1, 8, 2},
};
constexpr int kNumConfigs = sizeof(kForwardConfigs) / sizeof(Config);
// D buckets: register arrays are sized for the bucket; the actual D (a multiple of 8) may be smaller. D = 72
// has its own bucket: the products then do exactly 4 k16 + 1 k8 steps and 9 n8 tiles.
constexpr int kDBuckets[] = {32, 64, 72, 96, 128};
constexpr int kNumDBuckets = sizeof(kDBuckets) / sizeof(int);

constexpr bool tables_ok(const Config* table, bool backward) {
  for (int i = 0; i < kNumConfigs; ++i) {
    const Config& c = table[i];
    const int items = c.nseq * (c.t_max / 16);
    if (c.t_max % 16 != 0 || c.warps < 1 || c.warps * 32 > 1024 || c.min_blocks < 1) return false;
    if (backward ? c.warps != items : items % c.warps != 0) return false;
    if (i > 0 && table[i - 1].t_max >= c.t_max) return false;
  }
  return table[kNumConfigs - 1].t_max == kTemporalAttentionMaxT;
}
constexpr bool d_buckets_ok() {
  for (int i = 0; i < kNumDBuckets; ++i) {
    if (kDBuckets[i] % 8 != 0 || (i > 0 && kDBuckets[i - 1] >= kDBuckets[i])) return false;
  }
  return kDBuckets[kNumDBuckets - 1] == kTemporalAttentionMaxD;
}
static_assert(tables_ok(kForwardConfigs, false) && tables_ok(kBackwardConfigs, true) && d_buckets_ok(),
              "bad temporal attention config tables");
static_assert(sizeof(kBackwardConfigs) == sizeof(kForwardConfigs), "one entry per T bucket in both tables");

// The table's min_blocks is for D <= 72; larger D buckets hold more accumulators (forward: one 16 x D tile,
// backward: up to two), so the cap on registers is relaxed in proportion.
constexpr int min_blocks_at(const Config& c, int kd, bool backward) {
  const int extra = kd <= 72 ? 0 : (backward ? (kd - 72) : (kd - 72) / 2);  // fp32 registers per thread
  const int regs_72 = 65536 / (c.warps * 32 * c.min_blocks);
  const int b = 65536 / (c.warps * 32 * (regs_72 + extra));
  return b < 1 ? 1 : b;
}

// ------------------------------------------------------------------------------------------------------------
// Shared-memory layout of a block (bytes), the same on host and device.
//   header: int64 offsets [kNSeq][kTensors] (b*stride_b + s*stride_s + h*stride_h per tensor), int64 sequence
//           index [kNSeq] (-1: past the end); backward also fp32 lse * log2(e) [kNSeq][T16] and delta
//           [kNSeq][T16].
//   tiles:  per sequence, tiles of T16 rows x rs 16-byte pieces (forward q, k, v; backward q, k, v, dout),
//           then in the backward dS^T: T16 rows x ds_rs pieces, unless it fits in V's tile (ds_in_v).
struct SmemLayout {
  int t16;         // T rounded up to 16
  int rs;          // tile row stride in 16-byte pieces (odd)
  int ds_rs;       // dS^T row stride in 16-byte pieces (odd), backward
  int tile_bytes;  // one tile
  int seq_bytes;   // all tiles of one sequence
  int tiles_off;   // header size
  int total;
  bool ds_in_v;    // backward: dS^T lives in V's tile (T16 = 16 and D >= 16), else in its own region
};

__host__ __device__ __forceinline__ SmemLayout make_layout(int T, int D, int nseq, int ntensors, bool backward) {
  SmemLayout L;
  L.t16 = (T + 15) / 16 * 16;
  L.rs = (D / 8) | 1;
  L.ds_rs = L.t16 / 8 + 1;
  L.tile_bytes = L.t16 * L.rs * 16;
  // With one 16-row tile per sequence the backward keeps dS^T in V's tile where it fits (see the kernel).
  L.ds_in_v = L.t16 == 16 && L.ds_rs <= L.rs;
  L.seq_bytes = backward ? 4 * L.tile_bytes + (L.ds_in_v ? 0 : L.t16 * L.ds_rs * 16) : 3 * L.tile_bytes;
  const int header = nseq * (ntensors + 1) * 8 + (backward ? 2 * nseq * L.t16 * 4 : 0);
  L.tiles_off = (header + 15) / 16 * 16;
  L.total = L.tiles_off + nseq * L.seq_bytes;
  return L;
}

// Kernel arguments: the 5-D tensors (byte pointer, element strides) in a fixed order.
struct TensorArg {
  const char* data;
  int64_t sb, st, ss, sh;
};
template <int kTensors>
struct KernelArgs {
  TensorArg t[kTensors];
  int64_t num_seq;  // B * S * H
  int64_t S, H;
  int T, D;
  float scale;
  const float* lse_in;  // backward
  float* lse_out;       // forward
};
// Forward: q, k, v, out. Backward: q, k, v, dout, out, dq, dk, dv.
enum ForwardTensor : int { kFwdQ = 0, kFwdK, kFwdV, kFwdOut, kFwdTensors };
enum BackwardTensor : int { kBwdQ = 0, kBwdK, kBwdV, kBwdDout, kBwdOut, kBwdDq, kBwdDk, kBwdDv, kBwdTensors };

// ------------------------------------------------------------------------------------------------------------
// PTX wrappers. Shared memory is addressed with 32-bit shared-window addresses. Every shared-memory access is a
// volatile asm with a memory clobber, so the compiler keeps them in program order relative to each other and
// to the barriers.

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte copy to shared memory of src_bytes (16 or 0) bytes from global memory, the rest zero-filled.
__device__ __forceinline__ void cp_async_16_zfill(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x2(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x2_t(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void sts_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ uint4 lds_v4(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// D[16x8] += A[16x16] B[16x8] (A row-major fragments a, B column fragments b0, b1), fp32 accumulate.
template <typename E>
__device__ __forceinline__ void mma_k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<E, __half>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
// D[16x8] += A[16x8] B[8x8].
template <typename E>
__device__ __forceinline__ void mma_k8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
  if constexpr (std::is_same<E, __half>::value) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
  } else {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(b0));
  }
}

// ------------------------------------------------------------------------------------------------------------
// Warp-level tile products. Fragment layouts (PTX ISA, mma.m16n8k16): with g = lane / 4, q = lane % 4, an fp32
// accumulator c[4] of a 16x8 tile holds (row g, cols 2q, 2q+1) and (row g+8, same cols). Two adjacent 16x8
// accumulator tiles, rounded and packed, are exactly the A fragment of a 16x16 operand (pack_a).
//
// All shared-memory operands are row-major tiles with a row stride of `rsb` bytes. Every ldmatrix below uses
// the same lane addressing: lane l supplies row (l % 16) and column offset 8 * (l / 16) elements of a 16x16
// block, so its four 8x8 matrices are (rows 0-7, cols 0-7), (rows 8-15, 0-7), (rows 0-7, 8-15), (8-15, 8-15).

struct Lane {
  int g, q;      // accumulator row group and column pair
  uint32_t off;  // ldmatrix address offset within a 16x16 block at row stride rsb: (l % 16) * rsb + (l / 16) * 16
};
__device__ __forceinline__ Lane make_lane(int rsb) {
  const int l = threadIdx.x % 32;
  return Lane{l / 4, l % 4, static_cast<uint32_t>((l % 16) * rsb + (l / 16) * 16)};
}

template <typename E>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return Cvt<E>::float_to_word(lo, hi);
}
template <typename E>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<E>(c0[0], c0[1]);
  a[1] = pack2<E>(c0[2], c0[3]);
  a[2] = pack2<E>(c1[0], c1[1]);
  a[3] = pack2<E>(c1[2], c1[3]);
}

// [c0 | c1] (16 x 16) += A B^T over the first D columns, where A (16 rows) and B (16 rows) are row-major tiles
// starting at shared addresses a_s and b_s (both D wide). c0 holds B's rows 0-7, c1 rows 8-15.
template <typename E, int kD>
__device__ __forceinline__ void mma_abt(float (&c0)[4], float (&c1)[4], uint32_t a_s, uint32_t b_s, const Lane& ln,
                                        int D) {
#pragma unroll
  for (int ks = 0; ks < (kD + 8) / 16; ++ks) {
    const uint32_t col = ks * 32;  // bytes
    if (ks * 16 + 16 <= D) {
      uint32_t a[4], b[4];
      ldsm_x4(a, a_s + ln.off + col);
      ldsm_x4(b, b_s + ln.off + col);  // (B rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
      mma_k16<E>(c0, a, b[0], b[2]);
      mma_k16<E>(c1, a, b[1], b[3]);
    } else if (ks * 16 + 8 <= D) {  // the D % 16 == 8 tail: m16n8k8; x2 uses lanes 0-15 (rows 0-15, k 0-7)
      uint32_t a0, a1, b0, b1;
      ldsm_x2(a0, a1, a_s + ln.off + col);
      ldsm_x2(b0, b1, b_s + ln.off + col);
      mma_k8<E>(c0, a0, a1, b0);
      mma_k8<E>(c1, a0, a1, b1);
    }
  }
}

// acc (16 x D, kD / 8 tiles of 16x8) += A B, with A a 16x16 operand in registers and B (16 rows x D) a row-major
// tile at shared address b_s, read transposed (ldmatrix.trans gives the column fragments of a row-major B).
template <typename E, int kD>
__device__ __forceinline__ void mma_ab(float (&acc)[kD / 8][4], const uint32_t (&a)[4], uint32_t b_s, const Lane& ln,
                                       int D) {
  const int nd = D / 8;
#pragma unroll
  for (int jd = 0; jd < kD / 8; jd += 2) {
    const uint32_t col = jd * 16;  // bytes
    if (jd + 1 < kD / 8 && jd + 1 < nd) {
      uint32_t b[4];
      ldsm_x4_t(b, b_s + ln.off + col);  // (k 0-7, n jd), (k 8-15, n jd), (k 0-7, n jd+1), (k 8-15, n jd+1)
      const int jn = jd + 1 < kD / 8 ? jd + 1 : jd;  // jd + 1 wherever this branch is reachable
      mma_k16<E>(acc[jd], a, b[0], b[1]);
      mma_k16<E>(acc[jn], a, b[2], b[3]);
    } else if (jd < nd) {  // odd last tile; x2 uses lanes 0-15 (k 0-15, n jd)
      uint32_t b0, b1;
      ldsm_x2_t(b0, b1, b_s + ln.off + col);
      mma_k16<E>(acc[jd], a, b0, b1);
    }
  }
}

// Writes a 16 x D accumulator tile (times `mul`), rounded, into a row-major shared tile at t_s.
template <typename E, int kD>
__device__ __forceinline__ void stage_tile(uint32_t t_s, int rsb, const float (&acc)[kD / 8][4], float mul,
                                           const Lane& ln, int D) {
  const int nd = D / 8;
  const uint32_t r0 = t_s + ln.g * rsb + ln.q * 4;
#pragma unroll
  for (int jd = 0; jd < kD / 8; ++jd) {
    if (jd < nd) {
      sts_u32(r0 + jd * 16, pack2<E>(acc[jd][0] * mul, acc[jd][1] * mul));
      sts_u32(r0 + 8 * rsb + jd * 16, pack2<E>(acc[jd][2] * mul, acc[jd][3] * mul));
    }
  }
}

template <int kD>
__device__ __forceinline__ void zero(float (&acc)[kD / 8][4]) {
#pragma unroll
  for (int j = 0; j < kD / 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// ------------------------------------------------------------------------------------------------------------
// Block-level copies between global memory and the shared tiles. Piece c of a tensor's part in the block:
// c = (row * kNSeq + seq) * kPieces + piece, with kPieces = kD / 8 >= D / 8 (pieces past D / 8 are skipped), so
// consecutive threads take consecutive 16-byte pieces and every division is by a compile-time constant.

// Per-sequence offsets of every tensor and the sequence index, into the header (threads 0 .. kNSeq-1).
template <int kNSeq, int kTensors>
__device__ __forceinline__ void setup_sequences(const KernelArgs<kTensors>& a, int64_t* offs, int64_t* seq_ids) {
  const int tid = threadIdx.x;
  if (tid < kNSeq) {
    const int64_t n = static_cast<int64_t>(blockIdx.x) * kNSeq + tid;
    if (n < a.num_seq) {
      const int64_t h = n % a.H;
      const int64_t bs = n / a.H;
      const int64_t s = bs % a.S;
      const int64_t b = bs / a.S;
#pragma unroll
      for (int x = 0; x < kTensors; ++x) offs[tid * kTensors + x] = b * a.t[x].sb + s * a.t[x].ss + h * a.t[x].sh;
      seq_ids[tid] = n;
    } else {
#pragma unroll
      for (int x = 0; x < kTensors; ++x) offs[tid * kTensors + x] = 0;
      seq_ids[tid] = -1;
    }
  }
}

// Issues the copies of tensor x into slot `slot` of every sequence (rows [T, T16) and absent sequences are
// zero-filled).
template <int kNSeq, int kD, int kThreads, int kTensors>
__device__ __forceinline__ void load_tensor(const KernelArgs<kTensors>& a, int x, uint32_t tiles_s, int slot,
                                            const SmemLayout& L, const int64_t* offs, const int64_t* seq_ids) {
  constexpr int kPieces = kD / 8;
  const int nc = a.D / 8;
  const int rsb = L.rs * 16;
  const int count = L.t16 * kNSeq * kPieces;
  const char* base = a.t[x].data;
  const int64_t st = a.t[x].st;
  for (int c = threadIdx.x; c < count; c += kThreads) {
    const int piece = c % kPieces;
    const int r = c / kPieces;
    const int seq = r % kNSeq;
    const int row = r / kNSeq;
    if (piece < nc) {
      const uint32_t dst = tiles_s + seq * L.seq_bytes + slot * L.tile_bytes + row * rsb + piece * 16;
      const bool ok = row < a.T && seq_ids[seq] >= 0;
      const char* src = ok ? base + 2 * (offs[seq * kTensors + x] + row * st + piece * 8) : base;
      cp_async_16_zfill(dst, src, ok ? 16u : 0u);
    }
  }
}

// Writes rows [0, T) of slot `slot` of every present sequence to tensor x.
template <int kNSeq, int kD, int kThreads, int kTensors>
__device__ __forceinline__ void store_tensor(const KernelArgs<kTensors>& a, int x, uint32_t tiles_s, int slot,
                                             const SmemLayout& L, const int64_t* offs, const int64_t* seq_ids) {
  constexpr int kPieces = kD / 8;
  const int nc = a.D / 8;
  const int rsb = L.rs * 16;
  const int count = a.T * kNSeq * kPieces;
  char* base = const_cast<char*>(a.t[x].data);
  const int64_t st = a.t[x].st;
  for (int c = threadIdx.x; c < count; c += kThreads) {
    const int piece = c % kPieces;
    const int r = c / kPieces;
    const int seq = r % kNSeq;
    const int row = r / kNSeq;
    if (piece < nc && seq_ids[seq] >= 0) {
      const uint4 v = lds_v4(tiles_s + seq * L.seq_bytes + slot * L.tile_bytes + row * rsb + piece * 16);
      st_vec(base + 2 * (offs[seq * kTensors + x] + row * st + piece * 8), v);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Forward.

template <typename E, int kTMax, int kD, int kNSeq, int kWarps, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    temporal_attention_forward_kernel(const KernelArgs<kFwdTensors> a) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kKeyTiles = kTMax / 8;  // 16x8 score tiles of a 16-row query tile
  extern __shared__ __align__(16) unsigned char smem[];

  const SmemLayout L = make_layout(a.T, a.D, kNSeq, kFwdTensors, false);
  int64_t* offs = reinterpret_cast<int64_t*>(smem);
  int64_t* seq_ids = offs + kNSeq * kFwdTensors;
  const uint32_t tiles_s = smem_u32(smem) + L.tiles_off;
  const int T = a.T, D = a.D;
  const int m16 = L.t16 / 16;  // 16-row tiles

  setup_sequences<kNSeq>(a, offs, seq_ids);
  __syncthreads();
#pragma unroll
  for (int x = kFwdQ; x <= kFwdV; ++x) load_tensor<kNSeq, kD, kThreads>(a, x, tiles_s, x, L, offs, seq_ids);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int rsb = L.rs * 16;
  for (int item = threadIdx.x / 32; item < kNSeq * m16; item += kWarps) {
    const int seq = item % kNSeq;
    const int mt = item / kNSeq;  // query tile
    if (seq_ids[seq] < 0) continue;
    const Lane ln = make_lane(rsb);
    const uint32_t seq_s = tiles_s + seq * L.seq_bytes;
    const uint32_t q_s = seq_s + kFwdQ * L.tile_bytes + mt * 16 * rsb;
    const uint32_t k_s = seq_s + kFwdK * L.tile_bytes;
    const uint32_t v_s = seq_s + kFwdV * L.tile_bytes;

    // Scores of this lane's two rows (g, g + 8) against all keys.
    float s[kKeyTiles][4];
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int jp = 0; jp < kKeyTiles / 2; ++jp) {
      if (jp < m16) mma_abt<E, kD>(s[2 * jp], s[2 * jp + 1], q_s, k_s + jp * 16 * rsb, ln, D);
    }

    // Softmax in the exp2 domain; keys t >= T get probability 0 (tiles past T16 are all such keys).
    const float c = a.scale * kLog2e;
    const float neg_inf = __int_as_float(0xff800000u);
    float mx[2] = {neg_inf, neg_inf};
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = 8 * j + 2 * ln.q + (e & 1);
        const float v = key < T ? s[j][e] * c : neg_inf;
        s[j][e] = v;
        mx[e >> 1] = fmaxf(mx[e >> 1], v);
      }
    }
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // row max over the quad; key 0 is always valid, so it is finite
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = ex2(s[j][e] - mx[e >> 1]);
        sum[e >> 1] += s[j][e];
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // >= 1: the max element contributes 2^0
      sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
      sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
    }
    const float inv[2] = {1.f / sum[0], 1.f / sum[1]};
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= inv[e >> 1];
    }
    if (ln.q == 0) {
      const int64_t lse_row = seq_ids[seq] * T;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int t = mt * 16 + ln.g + 8 * r;
        if (t < T) a.lse_out[lse_row + t] = (mx[r] + lg2(sum[r])) * kLn2;
      }
    }

    // O = P V over the key tiles.
    float o[kD / 8][4];
    zero<kD>(o);
#pragma unroll
    for (int jp = 0; jp < kKeyTiles / 2; ++jp) {
      if (jp < m16) {
        uint32_t p[4];
        pack_a<E>(p, s[2 * jp], s[2 * jp + 1]);
        mma_ab<E, kD>(o, p, v_s + jp * 16 * rsb, ln, D);
      }
    }
    __syncwarp();  // every lane's reads of this Q tile are done: stage O in its rows
    stage_tile<E, kD>(q_s, rsb, o, 1.f, ln, D);
  }
  __syncthreads();
  store_tensor<kNSeq, kD, kThreads>(a, kFwdOut, tiles_s, kFwdQ, L, offs, seq_ids);
}

// ------------------------------------------------------------------------------------------------------------
// Backward. Slots: 0 q, 1 k, 2 v, 3 dout, then 4 dS^T (T16 > 16). out is only needed for delta: it goes
// straight to registers. Outputs are staged in dead input tiles: T16 > 16: dq in q, dk in dout, dv in v;
// T16 = 16 (kWarpPrivate): dS^T in v (for D >= 16), dv in dout, dk in q, dq in k, each as soon as its tile is
// dead. Without a dS^T region a block of 4 sequences at D = 72 needs 36.8 KB: 6 blocks per SM instead of 5.

// Scores and gradients of one (key tile, query tile) pair: P^T and dS^T as A fragments (pa, dsa), dS^T also
// stored rounded at ds_w (this lane's first element of the tile in the dS^T region).
template <typename E, int kD, bool kSyncBeforeStore>
__device__ __forceinline__ void tile_grads(uint32_t (&pa)[4], uint32_t (&dsa)[4], uint32_t kj_s, uint32_t vj_s,
                                           uint32_t qi_s, uint32_t doi_s, uint32_t ds_w, int dsb,
                                           const float* lse2_i, const float* delta_i, const bool (&key_ok)[2],
                                           float c, const Lane& ln, int D) {
  float st[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  float dpt[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  mma_abt<E, kD>(st[0], st[1], kj_s, qi_s, ln, D);    // S^T: rows keys, cols queries
  mma_abt<E, kD>(dpt[0], dpt[1], vj_s, doi_s, ln, D);  // dP^T
  if constexpr (kSyncBeforeStore) __syncwarp();        // the dS^T stores overwrite what was just read
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    const int qc = n * 8 + 2 * ln.q;  // this lane's first query column within the tile
    const float l0 = lse2_i[qc], l1 = lse2_i[qc + 1];
    const float d0 = delta_i[qc], d1 = delta_i[qc + 1];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      // Queries past T have lse2 = +inf: P = 0. Keys past T are masked here.
      const float p = key_ok[e >> 1] ? ex2(st[n][e] * c - ((e & 1) ? l1 : l0)) : 0.f;
      dpt[n][e] = p * (dpt[n][e] - ((e & 1) ? d1 : d0));  // dS^T
      st[n][e] = p;                                       // P^T
    }
    sts_u32(ds_w + n * 16, pack2<E>(dpt[n][0], dpt[n][1]));
    sts_u32(ds_w + n * 16 + 8 * dsb, pack2<E>(dpt[n][2], dpt[n][3]));
  }
  pack_a<E>(pa, st[0], st[1]);
  pack_a<E>(dsa, dpt[0], dpt[1]);
}

template <typename E, int kTMax, int kD, int kNSeq, int kWarps, int kMinBlocks>
__global__ void __launch_bounds__(kWarps * 32, kMinBlocks)
    temporal_attention_backward_kernel(const KernelArgs<kBwdTensors> a) {
  constexpr int kThreads = kWarps * 32;
  constexpr int kSlotQ = 0, kSlotK = 1, kSlotV = 2, kSlotDout = 3, kSlotDs = 4;
  // With one 16-row tile per sequence (kTMax = 16) every warp works on its own sequence only, from its delta
  // on: the phases need no block barrier.
  constexpr bool kWarpPrivate = kTMax == 16;
  static_assert(kThreads / 2 == kNSeq * kTMax, "delta: two threads per row of the block's sequences");
  extern __shared__ __align__(16) unsigned char smem[];

  const SmemLayout L = make_layout(a.T, a.D, kNSeq, kBwdTensors, true);
  int64_t* offs = reinterpret_cast<int64_t*>(smem);
  int64_t* seq_ids = offs + kNSeq * kBwdTensors;
  float* lse2 = reinterpret_cast<float*>(seq_ids + kNSeq);  // [kNSeq][T16], lse * log2(e); +inf past T
  float* delta = lse2 + kNSeq * L.t16;                       // [kNSeq][T16]
  const uint32_t tiles_s = smem_u32(smem) + L.tiles_off;
  const int T = a.T, D = a.D;
  const int t16 = L.t16;
  const int m16 = t16 / 16;
  const int rsb = L.rs * 16;
  const int dsb = L.ds_rs * 16;

  setup_sequences<kNSeq>(a, offs, seq_ids);
  __syncthreads();
  load_tensor<kNSeq, kD, kThreads>(a, kBwdQ, tiles_s, kSlotQ, L, offs, seq_ids);
  load_tensor<kNSeq, kD, kThreads>(a, kBwdK, tiles_s, kSlotK, L, offs, seq_ids);
  load_tensor<kNSeq, kD, kThreads>(a, kBwdV, tiles_s, kSlotV, L, offs, seq_ids);
  load_tensor<kNSeq, kD, kThreads>(a, kBwdDout, tiles_s, kSlotDout, L, offs, seq_ids);
  cp_async_commit();

  // delta and lse: two threads per row (kThreads / 2 == kNSeq * kTMax rows: one each), the row's out pieces
  // split between them and loaded into registers while the copies are in flight. Rows past T and absent
  // sequences give delta 0 and lse2 = +inf.
  constexpr int kOutPieces = (kD / 8 + 1) / 2;
  const int nc = D / 8;
  const int sub = threadIdx.x & 1;
  const int d_seq = (threadIdx.x / 2) / kTMax;
  const int d_row = (threadIdx.x / 2) % kTMax;
  uint4 ov[kOutPieces];
  {
    const int64_t n = seq_ids[d_seq];
    const bool row_ok = n >= 0 && d_row < T;
    const char* o_row = a.t[kBwdOut].data + 2 * (offs[d_seq * kBwdTensors + kBwdOut] + d_row * a.t[kBwdOut].st);
#pragma unroll
    for (int k = 0; k < kOutPieces; ++k) {
      const int pc = sub + 2 * k;
      ov[k] = (row_ok && pc < nc) ? ld_stream(o_row + pc * 16) : make_uint4(0u, 0u, 0u, 0u);
    }
    if (sub == 0 && d_row < t16)
      lse2[d_seq * t16 + d_row] = row_ok ? a.lse_in[n * T + d_row] * kLog2e : __int_as_float(0x7f800000u);
  }
  cp_async_wait<0>();
  __syncthreads();
  {
    const uint32_t do_row = tiles_s + d_seq * L.seq_bytes + kSlotDout * L.tile_bytes + min(d_row, t16 - 1) * rsb;
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < kOutPieces; ++k) {
      const int pc = sub + 2 * k;
      if (pc < nc) {
        float fd[8], fo[8];
        Cvt<E>::to_float(lds_v4(do_row + pc * 16), fd);
        Cvt<E>::to_float(ov[k], fo);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc = fmaf(fd[e], fo[e], acc);
      }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    if (sub == 0 && d_row < t16) delta[d_seq * t16 + d_row] = acc;
  }
  if constexpr (kWarpPrivate) {
    __syncwarp();
  } else {
    __syncthreads();
  }

  const int warp = threadIdx.x / 32;
  const int seq = warp % kNSeq;
  const int tile = warp / kNSeq;  // key tile in phase 2, query tile in phase 3
  const bool active = tile < m16 && seq_ids[seq] >= 0;
  const Lane ln = make_lane(rsb);
  const uint32_t seq_s = tiles_s + seq * L.seq_bytes;
  const uint32_t q_s = seq_s + kSlotQ * L.tile_bytes;
  const uint32_t k_s = seq_s + kSlotK * L.tile_bytes;
  const uint32_t v_s = seq_s + kSlotV * L.tile_bytes;
  const uint32_t do_s = seq_s + kSlotDout * L.tile_bytes;
  // dS^T [key][query], row stride dsb: with T16 = 16 in V's tile (dead once dP^T is computed) when its 16 rows
  // of 48 bytes fit there (D >= 16).
  const uint32_t ds_s = L.ds_in_v ? v_s : seq_s + kSlotDs * L.tile_bytes;
  const float* lse2_seq = lse2 + seq * t16;
  const float* delta_seq = delta + seq * t16;
  const float c = a.scale * kLog2e;
  const int l = threadIdx.x % 32;
  const uint32_t ds_lane = ds_s + (l % 16) * dsb + (l / 16) * 16;  // ldmatrix addressing at row stride dsb

  if constexpr (kWarpPrivate) {
    // One key tile and one query tile: dV, dK and dQ one after the other, each staged as soon as it is done,
    // so only one 16 x D accumulator is live at a time.
    if (active) {
      const bool key_ok[2] = {ln.g < T, ln.g + 8 < T};
      uint32_t pa[4], dsa[4];
      tile_grads<E, kD, true>(pa, dsa, k_s, v_s, q_s, do_s, ds_s + ln.g * dsb + ln.q * 4, dsb, lse2_seq, delta_seq,
                              key_ok, c, ln, D);
      __syncwarp();  // dS^T stores visible to the warp
      {
        float dv[kD / 8][4];
        zero<kD>(dv);
        mma_ab<E, kD>(dv, pa, do_s, ln, D);
        __syncwarp();  // dout reads done
        stage_tile<E, kD>(do_s, rsb, dv, 1.f, ln, D);
      }
      {
        float dk[kD / 8][4];
        zero<kD>(dk);
        mma_ab<E, kD>(dk, dsa, q_s, ln, D);
        __syncwarp();  // Q reads done
        stage_tile<E, kD>(q_s, rsb, dk, a.scale, ln, D);
      }
      {
        uint32_t r[4];
        ldsm_x4_t(r, ds_lane);  // (keys 0-7, queries 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
        const uint32_t ds_a[4] = {r[0], r[2], r[1], r[3]};  // dS as a row-major A fragment
        float dq[kD / 8][4];
        zero<kD>(dq);
        mma_ab<E, kD>(dq, ds_a, k_s, ln, D);
        __syncwarp();  // K reads done
        stage_tile<E, kD>(k_s, rsb, dq, a.scale, ln, D);
      }
    }
  } else {
    // Phase 2: key tile j = tile, over all query tiles.
    float dk[kD / 8][4];
    zero<kD>(dk);
    if (active) {
      const int j = tile;
      const uint32_t kj_s = k_s + j * 16 * rsb;
      const uint32_t vj_s = v_s + j * 16 * rsb;
      float dv[kD / 8][4];
      zero<kD>(dv);
      const bool key_ok[2] = {j * 16 + ln.g < T, j * 16 + ln.g + 8 < T};
      const uint32_t ds_w = ds_s + (j * 16 + ln.g) * dsb + ln.q * 4;
      for (int i = 0; i < m16; ++i) {
        const uint32_t qi_s = q_s + i * 16 * rsb;
        const uint32_t doi_s = do_s + i * 16 * rsb;
        uint32_t pa[4], dsa[4];
        tile_grads<E, kD, false>(pa, dsa, kj_s, vj_s, qi_s, doi_s, ds_w + i * 32, dsb, lse2_seq + i * 16,
                                 delta_seq + i * 16, key_ok, c, ln, D);
        mma_ab<E, kD>(dv, pa, doi_s, ln, D);
        mma_ab<E, kD>(dk, dsa, qi_s, ln, D);
      }
      __syncwarp();  // every lane's reads of V_j are done: stage dV_j in its rows (no other warp reads them)
      stage_tile<E, kD>(vj_s, rsb, dv, 1.f, ln, D);
    }
    __syncthreads();  // dS^T complete; q and dout are dead

    if (active) stage_tile<E, kD>(do_s + tile * 16 * rsb, rsb, dk, a.scale, ln, D);

    // Phase 3: query tile i = tile.
    if (active) {
      const int i = tile;
      float dq[kD / 8][4];
      zero<kD>(dq);
      for (int j = 0; j < m16; ++j) {
        uint32_t r[4];
        ldsm_x4_t(r, ds_lane + j * 16 * dsb + i * 32);  // (keys 0-7, queries 0-7), (8-15, 0-7), (0-7, 8-15), ..
        const uint32_t ds_a[4] = {r[0], r[2], r[1], r[3]};  // dS_ij as a row-major A fragment
        mma_ab<E, kD>(dq, ds_a, k_s + j * 16 * rsb, ln, D);
      }
      stage_tile<E, kD>(q_s + i * 16 * rsb, rsb, dq, a.scale, ln, D);
    }
  }
  __syncthreads();
  store_tensor<kNSeq, kD, kThreads>(a, kBwdDq, tiles_s, kWarpPrivate ? kSlotK : kSlotQ, L, offs, seq_ids);
  store_tensor<kNSeq, kD, kThreads>(a, kBwdDk, tiles_s, kWarpPrivate ? kSlotQ : kSlotDout, L, offs, seq_ids);
  store_tensor<kNSeq, kD, kThreads>(a, kBwdDv, tiles_s, kWarpPrivate ? kSlotDout : kSlotV, L, offs, seq_ids);
}

// ------------------------------------------------------------------------------------------------------------
// Host side: validation and dispatch.

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// A stride matters only when its dimension has more than one index.
bool stride_ok(int64_t stride, int64_t size) { return size <= 1 || stride % 8 == 0; }

template <typename P>
bool tensor_ok(const Strided5D<P>& t, int64_t B, int64_t T, int64_t S, int64_t H) {
  return t.data != nullptr && aligned16(t.data) && stride_ok(t.stride_b, B) && stride_ok(t.stride_t, T) &&
         stride_ok(t.stride_s, S) && stride_ok(t.stride_h, H);
}

bool shape_ok(DType dtype, int64_t B, int64_t T, int64_t S, int64_t H, int64_t D) {
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && B >= 0 && S >= 0 && H >= 0 && T >= 1 &&
         T <= kTemporalAttentionMaxT && D >= 8 && D <= kTemporalAttentionMaxD && D % 8 == 0;
}

// B * S * H, or -1 on overflow.
int64_t num_sequences(int64_t B, int64_t S, int64_t H) {
  int64_t bs = 0, n = 0;
  if (__builtin_mul_overflow(B, S, &bs) || __builtin_mul_overflow(bs, H, &n)) return -1;
  return n;
}

template <typename P>
TensorArg arg_of(const Strided5D<P>& t) {
  return TensorArg{static_cast<const char*>(t.data), t.stride_b, t.stride_t, t.stride_s, t.stride_h};
}

int config_index(int64_t T) {
  for (int i = 0; i < kNumConfigs; ++i)
    if (T <= kForwardConfigs[i].t_max) return i;  // the same buckets in both tables
  return -1;
}
int d_bucket_index(int64_t D) {
  for (int i = 0; i < kNumDBuckets; ++i)
    if (D <= kDBuckets[i]) return i;
  return -1;
}

// Raises the kernel's dynamic shared-memory limit once per device to the most any shape of its buckets needs.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes, std::atomic<unsigned long long>& done_devices) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const unsigned long long bit = device < 64 ? 1ull << device : 0ull;
  if (bit != 0 && (done_devices.load(std::memory_order_relaxed) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done_devices.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

template <typename E, int CI, int DI, bool kBackward, int kTensors>
cudaError_t launch(const KernelArgs<kTensors>& a, cudaStream_t stream) {
  constexpr Config c = kBackward ? kBackwardConfigs[CI] : kForwardConfigs[CI];
  constexpr int kD = kDBuckets[DI];
  constexpr int kMinBlocks = min_blocks_at(c, kD, kBackward);
  constexpr int kThreads = c.warps * 32;
  static std::atomic<unsigned long long> smem_set{0};
  const SmemLayout L = make_layout(a.T, a.D, c.nseq, kTensors, kBackward);
  int max_bytes = 0;  // over the bucket's shapes (T = t_max is the most; D: the dS^T placement depends on it)
  for (int d = 8; d <= kD; d += 8)
    max_bytes = std::max(max_bytes, make_layout(c.t_max, d, c.nseq, kTensors, kBackward).total);
  const int64_t blocks = (a.num_seq + c.nseq - 1) / c.nseq;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  if constexpr (kBackward) {
    auto kernel = temporal_attention_backward_kernel<E, c.t_max, kD, c.nseq, c.warps, kMinBlocks>;
    cudaError_t err = allow_smem(kernel, max_bytes, smem_set);
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(blocks), kThreads, L.total, stream>>>(a);
  } else {
    auto kernel = temporal_attention_forward_kernel<E, c.t_max, kD, c.nseq, c.warps, kMinBlocks>;
    cudaError_t err = allow_smem(kernel, max_bytes, smem_set);
    if (err != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(blocks), kThreads, L.total, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename E, bool kBackward, int kTensors, int CI = 0, int DI = 0>
cudaError_t dispatch(const KernelArgs<kTensors>& a, int ci, int di, cudaStream_t stream) {
  if constexpr (CI + 1 < kNumConfigs) {
    if (ci > CI) return dispatch<E, kBackward, kTensors, CI + 1, DI>(a, ci, di, stream);
  }
  if constexpr (DI + 1 < kNumDBuckets) {
    if (di > DI) return dispatch<E, kBackward, kTensors, CI, DI + 1>(a, ci, di, stream);
  }
  return launch<E, CI, DI, kBackward>(a, stream);
}

template <bool kBackward, int kTensors>
cudaError_t dispatch_dtype(DType dtype, const KernelArgs<kTensors>& a, cudaStream_t stream) {
  const int ci = config_index(a.T), di = d_bucket_index(a.D);
  if (ci < 0 || di < 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat16: return dispatch<__half, kBackward>(a, ci, di, stream);
    case DType::kBFloat16: return dispatch<__nv_bfloat16, kBackward>(a, ci, di, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t temporal_attention_forward(const TemporalAttentionForwardParams& p, cudaStream_t stream) {
  if (!shape_ok(p.dtype, p.B, p.T, p.S, p.H, p.D)) return cudaErrorInvalidValue;
  const int64_t n = num_sequences(p.B, p.S, p.H);
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t B = p.B, T = p.T, S = p.S, H = p.H;
  if (!tensor_ok(p.q, B, T, S, H) || !tensor_ok(p.k, B, T, S, H) || !tensor_ok(p.v, B, T, S, H) ||
      !tensor_ok(p.out, B, T, S, H) || p.lse == nullptr)
    return cudaErrorInvalidValue;
  KernelArgs<kFwdTensors> a{};
  a.t[kFwdQ] = arg_of(p.q);
  a.t[kFwdK] = arg_of(p.k);
  a.t[kFwdV] = arg_of(p.v);
  a.t[kFwdOut] = arg_of(p.out);
  a.num_seq = n;
  a.S = S;
  a.H = H;
  a.T = static_cast<int>(T);
  a.D = static_cast<int>(p.D);
  a.scale = p.softmax_scale;
  a.lse_out = p.lse;
  return dispatch_dtype<false>(p.dtype, a, stream);
}

cudaError_t temporal_attention_backward(const TemporalAttentionBackwardParams& p, cudaStream_t stream) {
  if (!shape_ok(p.dtype, p.B, p.T, p.S, p.H, p.D)) return cudaErrorInvalidValue;
  const int64_t n = num_sequences(p.B, p.S, p.H);
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int64_t B = p.B, T = p.T, S = p.S, H = p.H;
  if (!tensor_ok(p.q, B, T, S, H) || !tensor_ok(p.k, B, T, S, H) || !tensor_ok(p.v, B, T, S, H) ||
      !tensor_ok(p.out, B, T, S, H) || !tensor_ok(p.dout, B, T, S, H) || !tensor_ok(p.dq, B, T, S, H) ||
      !tensor_ok(p.dk, B, T, S, H) || !tensor_ok(p.dv, B, T, S, H) || p.lse == nullptr)
    return cudaErrorInvalidValue;
  KernelArgs<kBwdTensors> a{};
  a.t[kBwdQ] = arg_of(p.q);
  a.t[kBwdK] = arg_of(p.k);
  a.t[kBwdV] = arg_of(p.v);
  a.t[kBwdDout] = arg_of(p.dout);
  a.t[kBwdOut] = arg_of(p.out);
  a.t[kBwdDq] = arg_of(p.dq);
  a.t[kBwdDk] = arg_of(p.dk);
  a.t[kBwdDv] = arg_of(p.dv);
  a.num_seq = n;
  a.S = S;
  a.H = H;
  a.T = static_cast<int>(T);
  a.D = static_cast<int>(p.D);
  a.scale = p.softmax_scale;
  a.lse_in = p.lse;
  return dispatch_dtype<true>(p.dtype, a, stream);
}

}  // namespace openvid
