// Attention over long sequences (non-causal), forward, for Hopper (sm_90a). Torch-free: CUDA runtime plus the
// CuTe headers of CUTLASS (nvidia-cutlass). See spatial_attention.cuh for the contract.
//
// Structure (FlashAttention-3 style, written for this project):
//   * A tile is kBlockM = 64 * kWG query rows of one (b, h); its block loops over all keys in tiles of kBlockN.
//     Warpgroup 0 is the producer (its first thread issues every copy; the warpgroup gives its registers away with
//     setmaxnreg), warpgroups 1..kWG are consumers of 64 query rows each (they take the registers). Persistent
//     configurations launch one block per SM (kMinBlocks per SM) looping over tiles, so that the producer loads
//     the next tile's Q, K, V while the consumers finish the previous tile (Q has its own empty barrier).
//   * Copies: the tensor-memory accelerator (cp.async.bulk.tensor.4d) with tensor maps built on the host for the
//     call: the tensor is described as (D, H, S, B) with its real strides, so rows past S and columns past D are
//     zero-filled by the hardware and nothing outside the tensor is read. The head dim is padded to a bucket kD
//     (64, 80, 96, 128) by that zero fill: D = 72 runs as 80 (5 k-steps of 16 in Q K^T, n = 80 in P V), not 128.
//     The bucket is split into a main part (multiples of 64 columns: 128-byte rows, 128-byte swizzle) and a tail
//     of 16 or 32 columns (32- or 64-byte swizzle), each with its own tensor maps and shared-memory tiles in the
//     layouts of CuTe's GMMA swizzle atoms (K-major for Q and K, MN-major for V, the B operand of P V). A single
//     32-byte-swizzled 80-column layout (five 16-column boxes) ran 1.5x slower than this split (NOTES).
//     Each copy completes on an mbarrier (transaction bytes); K and V have separate full/empty barriers per
//     pipeline stage, so Q K^T of a tile can start before its V has landed.
//   * Consumers: S = Q K^T with wgmma from shared memory (fp32 accumulators in registers), online softmax in
//     the exp2 domain, P rounded to the element type in registers and used as the register A operand of
//     O += P V (wgmma, V from shared memory; an n = 64/128 product plus an n = 16/32 one for the tail). Within a
//     warpgroup, Q K_{j+1}^T is issued before P_j V_j and the softmax of tile j+1 runs while P_j V_j is in the
//     tensor cores; with two consumer warpgroups, named barriers make their product issues alternate
//     (ping-pong), so one warpgroup's softmax overlaps the other's products.
//   * Keys: the key tiles of a (b, h) are the video tiles of k/v (rows past Sk in the last one are zero-filled by
//     the copy and masked to -inf), then the text tiles of k_text/v_text up to len_b = text_lens[b] (a second set
//     of tensor maps; the producer picks the maps per key tile). The number of key tiles varies with b, so both
//     sides of the pipeline count it per query tile from text_lens; text tiles past len_b are never loaded. The
//     last text tile is loaded ENDING at row len_b (starting at len_b - kBlockN, which may be negative: the copy
//     zero-fills rows before 0), so no row at or past len_b ever reaches shared memory (those rows may hold
//     NaN/Inf, and a NaN V row would poison O even with P = 0); its rows that the previous text tile already
//     covered are masked to -inf instead. A query tile with no key tile loads nothing and writes out = 0,
//     lse = -inf.
//   * Query rows past Sq are computed on zeros and not stored.
//   * Epilogue: O / rowsum rounded to the element type, staged in shared memory (rows padded by 16 bytes), then
//     written with 16-byte stores (columns < D, rows < Sq); lse = scale * max + log(sum) (-inf without keys).
#include "spatial_attention.cuh"

#include <cuda_runtime.h>

#include <cstdint>
#include <algorithm>
#include <atomic>

#if __has_include(<cute/tensor.hpp>)
#define OPENVID_SPATIAL_HAVE_CUTE 1
#endif

#ifdef OPENVID_SPATIAL_HAVE_CUTE

// Wgmma shapes with n not a power of two (n = 80 for the D = 72 bucket) live in CuTe's extended set.
#ifndef CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED 1
#endif

#include <cuda.h>  // CUtensorMap and its enums only; the driver entry point is fetched through the runtime
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/numeric_types.h>

namespace openvid {
namespace spatial_detail {

using namespace cute;

// ------------------------------------------------------------------------------------------------------------
// Configuration of one kernel instance.
// The head-dim bucket kD is split into a main part kDa (a multiple of 64: 128-byte rows, 128-byte swizzle, the
// fastest layout for both the copies and wgmma) and a tail kDb = kD - kDa (0, 16 or 32 columns: 32- or 64-byte
// swizzle). Each part has its own tensor maps and shared-memory tiles; Q K^T runs over both (one wgmma group), and
// P V is an n = kDa product plus an n = kDb product.
template <typename Elem_, int kD_, int kBlockN_, int kStages_, int kWG_, bool kPingPong_, int kMinBlocks_ = 1,
          bool kPersistent_ = true>
struct FwdConfig {
  using Elem = Elem_;  // cutlass::bfloat16_t or cutlass::half_t
  static constexpr int kD = kD_;            // head-dim bucket (multiple of 16)
  static constexpr int kBlockN = kBlockN_;  // keys per tile
  static constexpr int kStages = kStages_;  // K/V pipeline depth
  static constexpr int kWG = kWG_;          // consumer warpgroups (64 query rows each)
  static constexpr bool kPingPong = kPingPong_ && kWG_ == 2;
  static constexpr int kMinBlocks = kMinBlocks_;  // blocks per SM the registers are sized for
  // Persistent blocks loop over tiles (a tile's epilogue overlaps the next tile's loads); otherwise one block per
  // tile (no loop-carried state: fewer live registers).
  static constexpr bool kPersistent = kPersistent_;
  static constexpr int kBlockM = 64 * kWG;
  static constexpr int kThreads = 128 * (kWG + 1);
  // Registers: the launch gives every thread kLaunchRegs; setmaxnreg moves them from the producer to consumers.
  static constexpr int kLaunchRegs = (65536 / (kThreads * kMinBlocks)) / 8 * 8 > 255
                                         ? 248
                                         : (65536 / (kThreads * kMinBlocks)) / 8 * 8;
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegsRaw = (kLaunchRegs * kThreads - kProducerRegs * 128) / (128 * kWG) / 8 * 8;
  static constexpr int kConsumerRegs = kConsumerRegsRaw > 240 ? 240 : kConsumerRegsRaw;

  static constexpr int kDa = kD / 64 * 64;
  static constexpr int kDb = kD - kDa;
  static constexpr int kDbT = kDb > 0 ? kDb : 16;  // tail extent used for (unused) types when kDb == 0
  static constexpr int kTailSwizzle = kDbT == 32 ? 64 : 32;
  static constexpr int kMainBoxes = kDa / 64;

  using AtomKa = GMMA::Layout_K_SW128_Atom<Elem>;
  using AtomMNa = GMMA::Layout_MN_SW128_Atom<Elem>;
  using AtomKb = std::conditional_t<kTailSwizzle == 64, GMMA::Layout_K_SW64_Atom<Elem>, GMMA::Layout_K_SW32_Atom<Elem>>;
  using AtomMNb =
      std::conditional_t<kTailSwizzle == 64, GMMA::Layout_MN_SW64_Atom<Elem>, GMMA::Layout_MN_SW32_Atom<Elem>>;

  // (rows, d): column boxes of 64 (main) each kBlockM rows deep: [box][row][64], swizzled; tail [row][kDb].
  using SmemLayoutQa = decltype(tile_to_shape(AtomKa{}, Shape<Int<kBlockM>, Int<kDa>>{}));
  using SmemLayoutQb = decltype(tile_to_shape(AtomKb{}, Shape<Int<kBlockM>, Int<kDbT>>{}));
  using SmemLayoutKa = decltype(tile_to_shape(AtomKa{}, Shape<Int<kBlockN>, Int<kDa>, Int<kStages>>{}));
  using SmemLayoutKb = decltype(tile_to_shape(AtomKb{}, Shape<Int<kBlockN>, Int<kDbT>, Int<kStages>>{}));
  // V as the (n = d, k = key) B operand of P V, d contiguous: [stage][box][key][64], as TMA writes it.
  using SmemLayoutVta =
      decltype(tile_to_shape(AtomMNa{}, Shape<Int<kDa>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{}));
  using SmemLayoutVtb =
      decltype(tile_to_shape(AtomMNb{}, Shape<Int<kDbT>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{}));

  using MmaS = decltype(make_tiled_mma(GMMA::ss_op_selector<Elem, Elem, float, Shape<_64, Int<kBlockN>, Int<kD>>>(),
                                       Layout<Shape<Int<kWG>, _1, _1>>{}));
  using MmaOa = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<kDa>, Int<kBlockN>>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<Int<kWG>, _1, _1>>{}));
  using MmaOb = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Elem, Elem, float, Shape<_64, Int<kDbT>, Int<kBlockN>>, GMMA::Major::K, GMMA::Major::MN>(),
      Layout<Shape<Int<kWG>, _1, _1>>{}));

  static constexpr int kOStride = kD + 8;  // staging rows padded by 16 bytes

  struct SharedStorage {
    alignas(1024) Elem q_a[kBlockM * kDa];
    alignas(1024) Elem k_a[kBlockN * kDa * kStages];
    alignas(1024) Elem v_a[kBlockN * kDa * kStages];
    alignas(1024) Elem q_b[kDb > 0 ? kBlockM * kDb : 8];
    alignas(1024) Elem k_b[kDb > 0 ? kBlockN * kDb * kStages : 8];
    alignas(1024) Elem v_b[kDb > 0 ? kBlockN * kDb * kStages : 8];
    alignas(16) Elem o[kBlockM * kOStride];
    alignas(8) uint64_t bar_q, empty_q;
    uint64_t full_k[kStages], full_v[kStages], empty_k[kStages], empty_v[kStages];
  };
  static constexpr size_t kSmemBytes = sizeof(SharedStorage) + 1024;  // + manual 1024-byte alignment

  static_assert(kD % 16 == 0 && kD >= 64 && kD <= 128, "head-dim bucket");
  static_assert(kDb == 0 || kDb == 16 || kDb == 32, "tail of 16 or 32 columns");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "key tile");
  static_assert(cosize_v<SmemLayoutQa> == kBlockM * kDa, "Q layout is compact");
  static_assert(cosize_v<SmemLayoutKa> == kBlockN * kDa * kStages, "K layout is compact");
  static_assert(cosize_v<SmemLayoutVta> == kBlockN * kDa * kStages, "V layout is compact");
  static_assert(kDb == 0 || cosize_v<SmemLayoutVtb> == kBlockN * kDb * kStages, "V tail layout is compact");
};

struct FwdArgs {
  void* out;
  int64_t out_sb, out_ss, out_sh;
  float* lse;
  int64_t lse_sb, lse_sh;
  const int32_t* text_lens;  // null: no text keys
  int Sq, Sk, L, H, D;
  int m_blocks;      // query tiles per (b, h)
  int tiles_per_b;   // m_blocks * H
  int total_tiles;   // m_blocks * H * B
  float scale;       // softmax_scale
  float scale_log2;  // softmax_scale * log2(e)
};

// ---- PTX helpers ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_u32(bar);
  uint32_t done;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2,
                                            int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_u32(bar))
      : "memory");
}
__device__ __forceinline__ void prefetch_tmap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}
__device__ __forceinline__ void named_bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

template <typename Elem>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<Elem, cutlass::bfloat16_t>) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// Online softmax on one S tile held in the wgmma accumulator layout: value i = i0 + 2*half + 4*nb is row
// (lane/4 + 8*half) of the warp's 16 rows, column 8*nb + 2*(lane%4) + i0. m: running raw max, l: this thread's
// partial running sum (summed over the quad at the end), corr: factor for O. Scores become probabilities.
// With kMask, only the columns in [lo, hi) are keys; the others are set to -inf (overwriting whatever the
// product gave, so zero-filled rows never count).
template <bool kFirst, bool kMask, int kN, class TS>
__device__ __forceinline__ void online_softmax(TS& s, float (&m)[2], float (&l)[2], float (&corr)[2], int lo, int hi,
                                               float scale_log2) {
  const int lane = threadIdx.x % 32;
  if constexpr (kMask) {
    CUTE_UNROLL
    for (int nb = 0; nb < kN / 8; ++nb) {
      CUTE_UNROLL
      for (int i0 = 0; i0 < 2; ++i0) {
        const int col = nb * 8 + 2 * (lane % 4) + i0;
        if (col < lo || col >= hi) {
          s(i0 + 4 * nb) = -INFINITY;
          s(i0 + 2 + 4 * nb) = -INFINITY;
        }
      }
    }
  }
  CUTE_UNROLL
  for (int r = 0; r < 2; ++r) {
    float mx = kFirst ? -INFINITY : m[r];
    CUTE_UNROLL
    for (int nb = 0; nb < kN / 8; ++nb) {
      mx = fmaxf(mx, fmaxf(s(2 * r + 4 * nb), s(1 + 2 * r + 4 * nb)));
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // mx is finite: every key tile has at least one unmasked key.
    corr[r] = kFirst ? 1.0f : ex2((m[r] - mx) * scale_log2);
    m[r] = mx;
    const float ms = mx * scale_log2;
    float sum = 0.0f;
    CUTE_UNROLL
    for (int nb = 0; nb < kN / 8; ++nb) {
      CUTE_UNROLL
      for (int i0 = 0; i0 < 2; ++i0) {
        const float p = ex2(fmaf(s(i0 + 2 * r + 4 * nb), scale_log2, -ms));
        s(i0 + 2 * r + 4 * nb) = p;
        sum += p;
      }
    }
    l[r] = kFirst ? sum : fmaf(l[r], corr[r], sum);
  }
}

// The tensor maps: q, k, v, k_text, v_text main parts (64-column boxes) and tails (kDb-column boxes). Maps of
// tensors that the call does not use (k, v when Sk == 0; text without text_lens) stay zeroed and are never touched.
struct FwdMaps {
  CUtensorMap q_a, k_a, v_a, q_b, k_b, v_b;
  CUtensorMap kt_a, vt_a, kt_b, vt_b;
};

// The key tiles of one (b, h) and where each comes from: key tiles j < n_vid are video rows [j * kBlockN, ...) of
// k/v (rows past Sk zero-filled by the copy), the rest text rows of k_text/v_text, the last of them ending at
// row len (see the notes at the top). Only the columns [lo(j), hi(j)) of key tile j are new keys.
// At most two key tiles need a mask: the last video tile when kBlockN does not divide Sk (rows past Sk), and the
// last text tile when it does not divide len (rows the previous text tile covered, or rows before 0). Their
// indices are fixed per (b, h), so the consumers' key loop only compares the tile index with the next of them;
// lo and hi are computed for those tiles only (computing them for every tile cost ~10 instructions per key tile).
template <int kBlockN>
struct KeyTiles {
  int Sk, n_vid, len, n;
  int masked_vid, masked_text;  // index of the masked last video / text tile, -1: none
  __device__ __forceinline__ KeyTiles(const FwdArgs& a, int b) {
    // Counts are >= 0: unsigned division is a shift.
    Sk = a.Sk;
    n_vid = static_cast<unsigned>(Sk + kBlockN - 1) / kBlockN;
    masked_vid = Sk % kBlockN != 0 ? n_vid - 1 : -1;
    // Without text keys every tile has the same key tiles: nothing to load or compute per tile.
    len = 0;
    n = n_vid;
    masked_text = -1;
    if (a.text_lens != nullptr) {
      len = min(max(__ldg(a.text_lens + b), 0), a.L);
      n = n_vid + static_cast<unsigned>(len + kBlockN - 1) / kBlockN;
      masked_text = len % kBlockN != 0 ? n - 1 : -1;
    }
  }
  __device__ __forceinline__ bool text(int j) const { return j >= n_vid; }
  // First row of key tile j in its tensor (negative for a short last text tile: rows before 0 are zero-filled).
  __device__ __forceinline__ int row(int j) const {
    return j < n_vid ? j * kBlockN : min((j - n_vid) * kBlockN, len - kBlockN);
  }
  __device__ __forceinline__ int lo(int j) const { return j < n_vid ? 0 : (j - n_vid) * kBlockN - row(j); }
  __device__ __forceinline__ int hi(int j) const { return j < n_vid ? min(kBlockN, Sk - j * kBlockN) : kBlockN; }
  // lo(j) > 0 || hi(j) < kBlockN.
  __device__ __forceinline__ bool masked(int j) const { return j == masked_vid || j == masked_text; }
  // The first masked key tile at index >= 1, -1: none (masked_vid < masked_text when both exist).
  __device__ __forceinline__ int first_masked_after_0() const { return masked_vid >= 1 ? masked_vid : masked_text; }
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    spatial_attention_fwd_kernel(const __grid_constant__ FwdMaps maps, const FwdArgs args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Elem = typename Cfg::Elem;
  constexpr int kD = Cfg::kD, kDa = Cfg::kDa, kDb = Cfg::kDb;
  constexpr int kBlockM = Cfg::kBlockM, kBlockN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int kWG = Cfg::kWG;
  using Smem = typename Cfg::SharedStorage;

  extern __shared__ char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));

  const int tid = threadIdx.x;
  const int wg = tid / 128;
  // Persistent blocks: tile t = (b * H + h) * m_blocks + m_block, taken round-robin (consecutive blocks share
  // the K/V of one head in L2).
  auto decode = [&](int t, int& m_block, int& h, int& b) {
    m_block = t % args.m_blocks;
    const int bh = t / args.m_blocks;
    h = bh % args.H;
    b = bh / args.H;
  };

  if (tid == 0) {
    mbar_init(&sm.bar_q, 1);
    mbar_init(&sm.empty_q, kWG * 4);
    CUTE_UNROLL
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&sm.full_k[s], 1);
      mbar_init(&sm.full_v[s], 1);
      mbar_init(&sm.empty_k[s], kWG * 4);
      mbar_init(&sm.empty_v[s], kWG * 4);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- producer ----------------
    cutlass::arch::warpgroup_reg_dealloc<Cfg::kProducerRegs>();
    if (tid == 0) {
      const bool has_vid = args.Sk > 0, has_text = args.text_lens != nullptr;
      // Only the maps this call encoded (the others are zeroed).
      auto prefetch_part = [&](const CUtensorMap& q, const CUtensorMap& k, const CUtensorMap& v, const CUtensorMap& kt,
                               const CUtensorMap& vt) {
        prefetch_tmap(&q);
        if (has_vid) {
          prefetch_tmap(&k);
          prefetch_tmap(&v);
        }
        if (has_text) {
          prefetch_tmap(&kt);
          prefetch_tmap(&vt);
        }
      };
      prefetch_part(maps.q_a, maps.k_a, maps.v_a, maps.kt_a, maps.vt_a);
      if constexpr (kDb > 0) prefetch_part(maps.q_b, maps.k_b, maps.v_b, maps.kt_b, maps.vt_b);
      constexpr uint32_t kQBytes = kBlockM * kD * sizeof(Elem);
      constexpr uint32_t kKVBytes = kBlockN * kD * sizeof(Elem);  // zero-filled rows count too
      int it = 0;      // key tiles loaded so far (pipeline position)
      int q_iter = 0;  // Q tiles loaded so far (query tiles with at least one key tile)
      for (int t = blockIdx.x; t < args.total_tiles; t += gridDim.x) {
        int m_block, h, b;
        decode(t, m_block, h, b);
        const KeyTiles<kBlockN> kt(args, b);
        if (kt.n == 0) continue;  // no keys: the consumers write the tile without Q
        const int m0 = m_block * kBlockM;
        if (q_iter > 0) mbar_wait(&sm.empty_q, (q_iter - 1) & 1);  // previous tile's Q K^T all done
        ++q_iter;
        mbar_arrive_expect_tx(&sm.bar_q, kQBytes);
        CUTE_UNROLL
        for (int i = 0; i < Cfg::kMainBoxes; ++i) {
          tma_load_4d(sm.q_a + i * kBlockM * 64, &maps.q_a, &sm.bar_q, i * 64, h, m0, b);
        }
        if constexpr (kDb > 0) tma_load_4d(sm.q_b, &maps.q_b, &sm.bar_q, kDa, h, m0, b);
        // Key tile at row n0 of k/v (video) or k_text/v_text (text) into the next pipeline stage.
        auto load_kv = [&](bool text, int n0) {
          const int s = it % kStages;
          const uint32_t ph = (it / kStages) & 1;
          ++it;
          mbar_wait(&sm.empty_k[s], ph ^ 1);
          mbar_arrive_expect_tx(&sm.full_k[s], kKVBytes);
          CUTE_UNROLL
          for (int i = 0; i < Cfg::kMainBoxes; ++i) {
            tma_load_4d(sm.k_a + (s * kDa + i * 64) * kBlockN, text ? &maps.kt_a : &maps.k_a, &sm.full_k[s], i * 64, h,
                        n0, b);
          }
          if constexpr (kDb > 0) {
            tma_load_4d(sm.k_b + s * kDb * kBlockN, text ? &maps.kt_b : &maps.k_b, &sm.full_k[s], kDa, h, n0, b);
          }
          mbar_wait(&sm.empty_v[s], ph ^ 1);
          mbar_arrive_expect_tx(&sm.full_v[s], kKVBytes);
          CUTE_UNROLL
          for (int i = 0; i < Cfg::kMainBoxes; ++i) {
            tma_load_4d(sm.v_a + (s * kDa + i * 64) * kBlockN, text ? &maps.vt_a : &maps.v_a, &sm.full_v[s], i * 64, h,
                        n0, b);
          }
          if constexpr (kDb > 0) {
            tma_load_4d(sm.v_b + s * kDb * kBlockN, text ? &maps.vt_b : &maps.v_b, &sm.full_v[s], kDa, h, n0, b);
          }
        };
        // Video tiles, then text tiles: two loops, so that the maps and the row rule are fixed in each.
        for (int j = 0; j < kt.n_vid; ++j) load_kv(false, j * kBlockN);
        for (int j = kt.n_vid; j < kt.n; ++j) load_kv(true, kt.row(j));
        if constexpr (!Cfg::kPersistent) break;
      }
    }
  } else {
    // ---------------- consumers ----------------
    cutlass::arch::warpgroup_reg_alloc<Cfg::kConsumerRegs>();
    const int ct = tid - 128;  // 0 .. 128*kWG-1
    const int cwg = ct / 128;
    const int lane = tid % 32;
    const int warp_in_wg = (ct % 128) / 32;

    typename Cfg::MmaS mma_s;
    typename Cfg::MmaOa mma_oa;
    typename Cfg::MmaOb mma_ob;
    auto thr_s = mma_s.get_thread_slice(ct);
    auto thr_oa = mma_oa.get_thread_slice(ct);
    auto thr_ob = mma_ob.get_thread_slice(ct);
    Tensor sQa = make_tensor(make_smem_ptr(sm.q_a), typename Cfg::SmemLayoutQa{});
    Tensor sKa = make_tensor(make_smem_ptr(sm.k_a), typename Cfg::SmemLayoutKa{});
    Tensor sVa = make_tensor(make_smem_ptr(sm.v_a), typename Cfg::SmemLayoutVta{});
    Tensor sQb = make_tensor(make_smem_ptr(sm.q_b), typename Cfg::SmemLayoutQb{});
    Tensor sKb = make_tensor(make_smem_ptr(sm.k_b), typename Cfg::SmemLayoutKb{});
    Tensor sVb = make_tensor(make_smem_ptr(sm.v_b), typename Cfg::SmemLayoutVtb{});
    Tensor tSrQa = thr_s.partition_fragment_A(sQa);
    Tensor tSrKa = thr_s.partition_fragment_B(sKa);
    Tensor tSrQb = thr_s.partition_fragment_A(sQb);
    Tensor tSrKb = thr_s.partition_fragment_B(sKb);
    Tensor tOrVa = thr_oa.partition_fragment_B(sVa);
    Tensor tOrVb = thr_ob.partition_fragment_B(sVb);
    Tensor tSrS = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor tOrOa = partition_fragment_C(mma_oa, Shape<Int<kBlockM>, Int<kDa>>{});
    Tensor tOrOb = partition_fragment_C(mma_ob, Shape<Int<kBlockM>, Int<Cfg::kDbT>>{});
    // P in the register-A layout of the P V product: the accumulator order of S is already the A-fragment order.
    Tensor tOrP = make_tensor<Elem>(Layout<Shape<Shape<_2, _2, _2>, _1, Int<kBlockN / 16>>>{});
    static_assert(size(tSrS) == kBlockN / 2 && size(tOrP) == kBlockN / 2 && size(tOrOa) == kDa / 2, "fragments");
    uint32_t* p_words = reinterpret_cast<uint32_t*>(raw_pointer_cast(tOrP.data()));

    // S = Q K^T over the main and tail columns, one wgmma group.
    auto gemm_s = [&](int stage) {
      warpgroup_fence_operand(tSrS);
      warpgroup_arrive();
      mma_s.accumulate_ = GMMA::ScaleOut::Zero;
      CUTE_UNROLL
      for (int kk = 0; kk < size<2>(tSrQa); ++kk) {
        cute::gemm(mma_s, tSrQa(_, _, kk), tSrKa(_, _, kk, stage), tSrS);
        mma_s.accumulate_ = GMMA::ScaleOut::One;
      }
      if constexpr (kDb > 0) {
        CUTE_UNROLL
        for (int kk = 0; kk < size<2>(tSrQb); ++kk) cute::gemm(mma_s, tSrQb(_, _, kk), tSrKb(_, _, kk, stage), tSrS);
      }
      warpgroup_commit_batch();
      warpgroup_fence_operand(tSrS);
    };
    // O += P V over the main and tail columns, one wgmma group.
    auto gemm_o = [&](int stage) {
      warpgroup_fence_operand(tOrOa);
      if constexpr (kDb > 0) warpgroup_fence_operand(tOrOb);
      warpgroup_arrive();
      CUTE_UNROLL
      for (int kk = 0; kk < size<2>(tOrP); ++kk) cute::gemm(mma_oa, tOrP(_, _, kk), tOrVa(_, _, kk, stage), tOrOa);
      if constexpr (kDb > 0) {
        CUTE_UNROLL
        for (int kk = 0; kk < size<2>(tOrP); ++kk) cute::gemm(mma_ob, tOrP(_, _, kk), tOrVb(_, _, kk, stage), tOrOb);
      }
      warpgroup_commit_batch();
      warpgroup_fence_operand(tOrOa);
      if constexpr (kDb > 0) warpgroup_fence_operand(tOrOb);
    };
    auto convert_p = [&]() {
      CUTE_UNROLL
      for (int i = 0; i < kBlockN / 4; ++i) p_words[i] = pack2<Elem>(tSrS(2 * i), tSrS(2 * i + 1));
    };
    auto rescale_o = [&](const float (&c)[2]) {
      CUTE_UNROLL
      for (int i = 0; i < kDa / 2; ++i) tOrOa(i) *= c[(i / 2) % 2];
      if constexpr (kDb > 0) {
        CUTE_UNROLL
        for (int i = 0; i < kDb / 2; ++i) tOrOb(i) *= c[(i / 2) % 2];
      }
    };
    // Ping-pong between the two consumer warpgroups: each waits for its turn to issue products.
    auto pp_sync = [&]() {
      if constexpr (Cfg::kPingPong) named_bar_sync(1 + cwg, 256);
    };
    auto pp_arrive = [&]() {
      if constexpr (Cfg::kPingPong) named_bar_arrive(1 + (1 - cwg), 256);
    };
    auto release = [&](uint64_t* bar) {
      __syncwarp();
      if (lane == 0) mbar_arrive(bar);
    };
    mma_oa.accumulate_ = GMMA::ScaleOut::One;
    mma_ob.accumulate_ = GMMA::ScaleOut::One;
    const float sl2 = args.scale_log2;

    int it = 0;      // key tiles consumed so far (pipeline position)
    int q_iter = 0;  // Q tiles consumed so far
    for (int t = blockIdx.x; t < args.total_tiles; t += gridDim.x) {
      // Before the key loop the batch index is needed only for the text length: without text keys a tile starts
      // without any division (decode, two divisions, runs after the key loop); with them it is one division.
      const KeyTiles<kBlockN> kt(args, args.text_lens != nullptr ? t / args.tiles_per_b : 0);
      const int n = kt.n;
      CUTE_UNROLL
      for (int i = 0; i < size(tOrOa); ++i) tOrOa(i) = 0.0f;
      CUTE_UNROLL
      for (int i = 0; i < size(tOrOb); ++i) tOrOb(i) = 0.0f;
      // l = 0 stays for a tile without keys (n == 0): out = 0, lse = -inf below.
      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, corr[2] = {1.0f, 1.0f};

      if (n > 0) {
        if constexpr (Cfg::kPingPong) {
          if (cwg == 1) named_bar_arrive(1, 256);  // warpgroup 0 goes first
        }

        mbar_wait(&sm.bar_q, q_iter & 1);
        ++q_iter;
        // Key tile 0.
        {
          const int s = it % kStages;
          const uint32_t ph = (it / kStages) & 1;
          mbar_wait(&sm.full_k[s], ph);
          pp_sync();
          gemm_s(s);
          pp_arrive();
          warpgroup_wait<0>();
          release(&sm.empty_k[s]);
          if (n == 1) release(&sm.empty_q);
          if (kt.masked(0)) {
            online_softmax<true, true, kBlockN>(tSrS, m, l, corr, kt.lo(0), kt.hi(0), sl2);
          } else {
            online_softmax<true, false, kBlockN>(tSrS, m, l, corr, 0, kBlockN, sl2);
          }
          convert_p();
        }
        // The next key tile that needs a mask (see KeyTiles): one compare per key tile.
        int next_masked = kt.first_masked_after_0();
        for (int j = 1; j < n; ++j) {
          const int s = (it + j) % kStages;
          const uint32_t ph = ((it + j) / kStages) & 1;
          const int sp = (it + j - 1) % kStages;
          const uint32_t php = ((it + j - 1) / kStages) & 1;
          mbar_wait(&sm.full_k[s], ph);
          pp_sync();
          gemm_s(s);
          rescale_o(corr);
          mbar_wait(&sm.full_v[sp], php);
          gemm_o(sp);
          pp_arrive();
          warpgroup_wait<1>();
          release(&sm.empty_k[s]);
          // Last Q K^T of this tile is done: Q may be reloaded. (j + 1 == n: the loop's own exit test; written as
          // j == n - 1, n was recomputed from text_lens in every iteration.)
          if (j + 1 == n) release(&sm.empty_q);
          if (j == next_masked) {
            online_softmax<false, true, kBlockN>(tSrS, m, l, corr, kt.lo(j), kt.hi(j), sl2);
            next_masked = kt.masked_text;  // the only one that can follow (or j itself: not seen again)
          } else {
            online_softmax<false, false, kBlockN>(tSrS, m, l, corr, 0, kBlockN, sl2);
          }
          warpgroup_wait<0>();
          release(&sm.empty_v[sp]);
          convert_p();
        }
        // Last P V.
        {
          const int sp = (it + n - 1) % kStages;
          const uint32_t php = ((it + n - 1) / kStages) & 1;
          rescale_o(corr);
          mbar_wait(&sm.full_v[sp], php);
          pp_sync();
          gemm_o(sp);
          if (cwg == 0) pp_arrive();  // warpgroup 1's last turn has no matching wait
          warpgroup_wait<0>();
          release(&sm.empty_v[sp]);
        }
        it += n;
      }

      // Finalize: normalise, lse, stage O in shared memory, coalesced 16-byte stores. The row sum is >= 1 when
      // the row has keys (the max term is exp(0)) and 0 when it has none.
      int m_block, h, b;
      decode(t, m_block, h, b);
      const int row_in_wg0 = warp_in_wg * 16 + lane / 4;
      const int m0 = m_block * kBlockM + cwg * 64;
      float inv[2];
      CUTE_UNROLL
      for (int r = 0; r < 2; ++r) {
        float sum = l[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        inv[r] = sum > 0.0f ? 1.0f / sum : 0.0f;
        const int row = m0 + row_in_wg0 + 8 * r;
        if (lane % 4 == 0 && row < args.Sq) {
          args.lse[b * args.lse_sb + h * args.lse_sh + row] = sum > 0.0f ? m[r] * args.scale + logf(sum) : -INFINITY;
        }
      }
      Elem* so = sm.o + cwg * 64 * Cfg::kOStride;
      named_bar_sync(3 + cwg, 128);  // the previous tile's staging reads are done
      CUTE_UNROLL
      for (int nb = 0; nb < kDa / 8; ++nb) {
        CUTE_UNROLL
        for (int r = 0; r < 2; ++r) {
          const int row = row_in_wg0 + 8 * r;
          const int col = nb * 8 + 2 * (lane % 4);
          *reinterpret_cast<uint32_t*>(so + row * Cfg::kOStride + col) =
              pack2<Elem>(tOrOa(2 * r + 4 * nb) * inv[r], tOrOa(1 + 2 * r + 4 * nb) * inv[r]);
        }
      }
      if constexpr (kDb > 0) {
        CUTE_UNROLL
        for (int nb = 0; nb < kDb / 8; ++nb) {
          CUTE_UNROLL
          for (int r = 0; r < 2; ++r) {
            const int row = row_in_wg0 + 8 * r;
            const int col = kDa + nb * 8 + 2 * (lane % 4);
            *reinterpret_cast<uint32_t*>(so + row * Cfg::kOStride + col) =
                pack2<Elem>(tOrOb(2 * r + 4 * nb) * inv[r], tOrOb(1 + 2 * r + 4 * nb) * inv[r]);
          }
        }
      }
      named_bar_sync(3 + cwg, 128);
      constexpr int kVecs = kD / 8;
      const int dvecs = args.D / 8;
      char* out_base = static_cast<char*>(args.out) +
                       (static_cast<int64_t>(b) * args.out_sb + static_cast<int64_t>(h) * args.out_sh) * sizeof(Elem);
      for (int idx = ct % 128; idx < 64 * kVecs; idx += 128) {
        const int row = idx / kVecs, vc = idx % kVecs;
        const int grow = m0 + row;
        if (grow < args.Sq && vc < dvecs) {
          const uint4 val = *reinterpret_cast<const uint4*>(so + row * Cfg::kOStride + vc * 8);
          char* dst = out_base + (static_cast<int64_t>(grow) * args.out_ss + vc * 8) * sizeof(Elem);
          *reinterpret_cast<uint4*>(dst) = val;
        }
      }
      if constexpr (!Cfg::kPersistent) break;
    }  // tiles
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// ---- host side ------------------------------------------------------------------------------------------------

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point (nothing links libcuda explicitly).
inline EncodeTiledFn encode_tiled_fn() {
  static EncodeTiledFn fn = []() -> EncodeTiledFn {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// A [B, S, H, D] tensor as the TMA tensor (D, H, S, B); box (box_cols, 1, box_rows, 1). The stride of a dimension
// of size 1 is never used; it is replaced by the packed one (a valid multiple of 16 bytes).
inline bool encode_map(CUtensorMap* map, DType dtype, const void* ptr, int64_t B, int64_t S, int64_t H, int64_t D,
                       int64_t sb, int64_t ss, int64_t sh, int box_cols, int box_rows, int swizzle_bytes) {
  EncodeTiledFn fn = encode_tiled_fn();
  if (fn == nullptr) return false;
  const int64_t esize = 2;
  const int64_t bh = H > 1 ? sh * esize : (D * esize + 15) / 16 * 16;
  const int64_t bs = S > 1 ? ss * esize : bh * H;
  const int64_t bb = B > 1 ? sb * esize : bs * S;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(D), static_cast<cuuint64_t>(H), static_cast<cuuint64_t>(S),
                              static_cast<cuuint64_t>(B)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(bh), static_cast<cuuint64_t>(bs),
                                 static_cast<cuuint64_t>(bb)};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(box_cols), 1u, static_cast<cuuint32_t>(box_rows), 1u};
  const cuuint32_t estrides[4] = {1u, 1u, 1u, 1u};
  const CUtensorMapSwizzle sw = swizzle_bytes == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                : swizzle_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                      : CU_TENSOR_MAP_SWIZZLE_32B;
  const CUtensorMapDataType dt =
      dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  const CUresult r = fn(map, dt, 4, const_cast<void*>(ptr), dims, strides, box, estrides,
                        CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

// Text keys take part when text_lens is given and k_text has rows (with L == 0 every length clamps to 0).
inline bool has_text(const SpatialAttentionForwardParams& p) { return p.text_lens != nullptr && p.L > 0; }

// The most keys a query row can have: sets the length of the key loop (configuration, tile order).
inline int64_t max_keys(const SpatialAttentionForwardParams& p) { return p.Sk + (has_text(p) ? p.L : 0); }

// Encodes the maps of the tensors that the call uses (see FwdMaps; `maps` comes in zeroed): main part and tail of
// each, boxes of kBlockM (q) or kBlockN (keys) rows.
template <class Cfg>
bool make_maps(const SpatialAttentionForwardParams& p, FwdMaps& maps) {
  struct Entry {
    const ConstTensor4D& t;
    int64_t rows;  // 0: not used by this call
    CUtensorMap* main;
    CUtensorMap* tail;
    int box_rows;
  };
  const int64_t L = has_text(p) ? p.L : 0;
  const Entry entries[] = {{p.q, p.Sq, &maps.q_a, &maps.q_b, Cfg::kBlockM},
                           {p.k, p.Sk, &maps.k_a, &maps.k_b, Cfg::kBlockN},
                           {p.v, p.Sk, &maps.v_a, &maps.v_b, Cfg::kBlockN},
                           {p.k_text, L, &maps.kt_a, &maps.kt_b, Cfg::kBlockN},
                           {p.v_text, L, &maps.vt_a, &maps.vt_b, Cfg::kBlockN}};
  for (const Entry& e : entries) {
    if (e.rows == 0) continue;
    if (!encode_map(e.main, p.dtype, e.t.data, p.B, e.rows, p.H, p.D, e.t.stride_b, e.t.stride_s, e.t.stride_h, 64,
                    e.box_rows, 128)) {
      return false;
    }
    if (Cfg::kDb > 0 && !encode_map(e.tail, p.dtype, e.t.data, p.B, e.rows, p.H, p.D, e.t.stride_b, e.t.stride_s,
                                    e.t.stride_h, Cfg::kDb, e.box_rows, Cfg::kTailSwizzle)) {
      return false;
    }
  }
  return true;
}

template <class Cfg>
bool kernel_usable_uncached(int dev) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (major != 9 || minor != 0) return false;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, spatial_attention_fwd_kernel<Cfg>) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.binaryVersion == 90 && attr.ptxVersion >= 90 && static_cast<size_t>(optin) >= Cfg::kSmemBytes;
}

// The kernel instance has its sm_90a body (the build included compute_90a) and the current device (an sm_90
// GPU) runs it. Cached per device (a benign race: every thread computes the same answer).
template <class Cfg>
bool kernel_usable() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];  // 0 unknown, 1 usable, 2 not
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (dev < 0 || dev >= kMaxDevices) return kernel_usable_uncached<Cfg>(dev);
  int state = cache[dev].load(std::memory_order_relaxed);
  if (state == 0) {
    state = kernel_usable_uncached<Cfg>(dev) ? 1 : 2;
    cache[dev].store(state, std::memory_order_relaxed);
  }
  return state == 1;
}

template <class Cfg>
cudaError_t launch_fwd(const SpatialAttentionForwardParams& p, cudaStream_t stream) {
  FwdMaps maps{};
  if (!make_maps<Cfg>(p, maps)) return cudaErrorInvalidValue;
  auto kernel = spatial_attention_fwd_kernel<Cfg>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Cfg::kSmemBytes));
  if (err != cudaSuccess) return err;
  FwdArgs a;
  a.out = p.out.data;
  a.out_sb = p.out.stride_b;
  a.out_ss = p.out.stride_s;
  a.out_sh = p.out.stride_h;
  a.lse = p.lse;
  a.lse_sb = p.lse_stride_b;
  a.lse_sh = p.lse_stride_h;
  a.text_lens = has_text(p) ? p.text_lens : nullptr;
  a.Sq = static_cast<int>(p.Sq);
  a.Sk = static_cast<int>(p.Sk);
  a.L = static_cast<int>(p.L);
  a.H = static_cast<int>(p.H);
  a.D = static_cast<int>(p.D);
  a.scale = p.softmax_scale;
  a.scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const int64_t m_blocks = (p.Sq + Cfg::kBlockM - 1) / Cfg::kBlockM;
  const int64_t total = m_blocks * p.H * p.B;
  if (total >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  int dev = 0, sms = 0;
  err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  a.m_blocks = static_cast<int>(m_blocks);
  a.tiles_per_b = static_cast<int>(m_blocks * p.H);
  a.total_tiles = static_cast<int>(total);
  // Persistent blocks (one per SM, or kMinBlocks): each loops over tiles, so that a tile's epilogue overlaps the
  // next tile's loads.
  const dim3 grid(static_cast<unsigned>(
      Cfg::kPersistent ? std::min<int64_t>(total, static_cast<int64_t>(sms) * Cfg::kMinBlocks) : total));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(maps, a);
  return cudaGetLastError();
}

// Tuned configurations per head-dim bucket (H100, see the notes at the top):
//   <Elem, kD, kBlockN, kStages, kWG, kPingPong, kMinBlocks, kPersistent>.
// By the number of keys of a row (at most Sk + L), which sets the length of the key loop.
// Few keys (text-only cross-attention, L <= 128): 64-key tiles with two ping-pong consumer warpgroups. At D = 72,
// B = 2, Sq = 16384, L = 120 (random lengths) this ran 1.7x faster than Cfg80 (124 vs 210 us) and 1.5x faster than
// one consumer warpgroup with 64-key tiles, two blocks per SM (183 us). The time grew with the rows that the copy
// zero-fills before row 0 in a short last text tile (all lengths 8: 235 us with 128-key tiles, 134 with 64), so
// shorter key tiles win here (.device/text/NOTES.md, run 4).
template <typename Elem, int kD>
using CfgFewKeys = FwdConfig<Elem, kD, 64, 3, 2, true, 1, true>;
template <typename Elem>
using Cfg64Short = FwdConfig<Elem, 64, 128, 2, 1, false, 2, true>;  // keys <= 1024: 2 blocks of 64 rows per SM
template <typename Elem>
using Cfg64Long = FwdConfig<Elem, 64, 128, 2, 3, false, 1, false>;  // keys > 1024: 192 rows per K/V tile
template <typename Elem>
using Cfg80 = FwdConfig<Elem, 80, 128, 3, 2, true, 1, true>;
template <typename Elem>
using Cfg96 = FwdConfig<Elem, 96, 128, 3, 2, true, 1, true>;
template <typename Elem>
using Cfg128Short = FwdConfig<Elem, 128, 64, 2, 1, false, 2, true>;  // keys <= 512: 2 blocks of 64 rows per SM
template <typename Elem>
using Cfg128Long = FwdConfig<Elem, 128, 128, 2, 2, true, 1, false>;  // not persistent: that one spills 60 B

template <class Op, typename Elem>
bool dispatch_d(const SpatialAttentionForwardParams& p, Op& op) {
  const int64_t keys = max_keys(p);
  if (keys <= 128) {
    if (p.D <= 64) return op.template run<CfgFewKeys<Elem, 64>>();
    if (p.D <= 80) return op.template run<CfgFewKeys<Elem, 80>>();
    if (p.D <= 96) return op.template run<CfgFewKeys<Elem, 96>>();
    return op.template run<CfgFewKeys<Elem, 128>>();
  }
  if (p.D <= 64) return keys <= 1024 ? op.template run<Cfg64Short<Elem>>() : op.template run<Cfg64Long<Elem>>();
  if (p.D <= 80) return op.template run<Cfg80<Elem>>();
  if (p.D <= 96) return op.template run<Cfg96<Elem>>();
  return keys <= 512 ? op.template run<Cfg128Short<Elem>>() : op.template run<Cfg128Long<Elem>>();
}

// Calls op.template run<Cfg>() for the parameters' configuration; false if there is none.
template <class Op>
bool dispatch(const SpatialAttentionForwardParams& p, Op& op) {
  if (p.dtype == DType::kBFloat16) return dispatch_d<Op, cutlass::bfloat16_t>(p, op);
  if (p.dtype == DType::kFloat16) return dispatch_d<Op, cutlass::half_t>(p, op);
  return false;
}

struct SupportedOp {
  const SpatialAttentionForwardParams& p;
  template <class Cfg>
  bool run() {
    FwdMaps maps{};
    return kernel_usable<Cfg>() && make_maps<Cfg>(p, maps);
  }
};

struct LaunchOp {
  const SpatialAttentionForwardParams& p;
  cudaStream_t stream;
  cudaError_t result = cudaErrorInvalidValue;
  template <class Cfg>
  bool run() {
    if (!kernel_usable<Cfg>()) return false;
    result = launch_fwd<Cfg>(p, stream);
    return true;
  }
};

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
bool strides_ok(const Strided4D<T>& t, int64_t B, int64_t S, int64_t H) {
  const int64_t sizes[3] = {B, S, H};
  const int64_t strides[3] = {t.stride_b, t.stride_s, t.stride_h};
  for (int i = 0; i < 3; ++i) {
    if (sizes[i] <= 1) continue;
    if (strides[i] <= 0 || strides[i] % 8 != 0 || strides[i] >= (int64_t{1} << 36)) return false;
  }
  return t.data != nullptr && aligned16(t.data);
}

bool no_work(const SpatialAttentionForwardParams& p) { return p.B == 0 || p.Sq == 0 || p.H == 0; }

// Everything but the device checks (lse is not looked at unless need_lse, text_lens only for its alignment).
bool params_ok(const SpatialAttentionForwardParams& p, bool need_lse = true) {
  if (p.dtype != DType::kBFloat16 && p.dtype != DType::kFloat16) return false;
  if (p.D < 8 || p.D > kSpatialAttentionMaxD || p.D % 8 != 0) return false;
  // Counts below 2^30: row coordinates of key tiles (up to Sk + kBlockN) stay in int.
  const int64_t kMaxRows = int64_t{1} << 30, kMax = (int64_t{1} << 31) - 1;
  if (p.B < 0 || p.H < 0 || p.B > kMax || p.H > kMax) return false;
  if (p.Sq < 0 || p.Sk < 0 || p.L < 0 || p.Sq >= kMaxRows || p.Sk >= kMaxRows || p.L >= kMaxRows) return false;
  const int64_t tiles_per_b = (p.Sq + 63) / 64 * p.H;  // < 2^55: no overflow
  if (p.B > 0 && tiles_per_b > kMax / p.B) return false;  // tile indices are int
  if (!(p.softmax_scale >= 0.0f) || !(p.softmax_scale < INFINITY)) return false;
  if (no_work(p)) return true;
  if (need_lse && (p.lse == nullptr || p.lse_stride_b < 0 || p.lse_stride_h < 0)) return false;
  bool ok = strides_ok(p.q, p.B, p.Sq, p.H) && strides_ok(p.out, p.B, p.Sq, p.H);
  if (p.Sk > 0) ok = ok && strides_ok(p.k, p.B, p.Sk, p.H) && strides_ok(p.v, p.B, p.Sk, p.H);
  if (p.text_lens != nullptr) {
    ok = ok && reinterpret_cast<uintptr_t>(p.text_lens) % alignof(int32_t) == 0;
    if (p.L > 0) ok = ok && strides_ok(p.k_text, p.B, p.L, p.H) && strides_ok(p.v_text, p.B, p.L, p.H);
  }
  return ok;
}

}  // namespace spatial_detail

bool spatial_attention_forward_supported(const SpatialAttentionForwardParams& p) {
  using namespace spatial_detail;
  if (!params_ok(p, /*need_lse=*/false)) return false;
  if (no_work(p)) return true;
  SupportedOp op{p};
  return dispatch(p, op);
}

cudaError_t spatial_attention_forward(const SpatialAttentionForwardParams& p, cudaStream_t stream) {
  using namespace spatial_detail;
  if (!params_ok(p)) return cudaErrorInvalidValue;
  if (no_work(p)) return cudaSuccess;
  LaunchOp op{p, stream};
  dispatch(p, op);
  return op.result;
}

}  // namespace openvid

#else  // no CUTLASS headers: the kernels are not built, callers use another backend.

namespace openvid {
bool spatial_attention_forward_supported(const SpatialAttentionForwardParams&) { return false; }
cudaError_t spatial_attention_forward(const SpatialAttentionForwardParams&, cudaStream_t) {
  return cudaErrorNotSupported;
}
}  // namespace openvid

#endif  // OPENVID_SPATIAL_HAVE_CUTE
