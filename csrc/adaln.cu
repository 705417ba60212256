// Fused adaLN modulation kernels (forward and backward). Torch-free: CUDA runtime only. See adaln.cuh for the
// contract.
//
// Layout of the work. A row (one token, C elements) is split into 16-byte vectors (8 half/bfloat16 or 4 float;
// nv = C / elems-per-vector of them). kL threads share a row: thread t of the row holds vectors
// t, t + kL, t + 2 kL, ... (at most kV of them) in registers, in packed form, so a warp's accesses are
// contiguous 16-byte pieces. A block of kL * kR threads works on kR rows at a time. Row sums are reduced with
// shuffles inside aligned groups of kL lanes (kL <= 32), or with shuffles plus shared memory (kL a multiple of
// 32). Every thread of a row gets bitwise the same sums (butterfly shuffles, then the same summation order over
// warps), so the statistics all threads use are the ones stored.
//
// Forward: one pass, rows are independent; the grid covers the B*N rows, kR per block.
// Backward: one block per partial slot (b, g, k); the block walks the rows of its chunk kR at a time, keeps
// the per-column partial sums for the modulation gradients in registers, and at the end sums its kR row
// groups in shared memory and writes the slot. How a row's loads are scheduled (kPipeline, see Pipeline) trades
// bytes in flight against registers.
#include "adaln.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>

namespace openvid {
namespace {

using detail::cp_async_16;
using detail::cp_async_4;
using detail::cp_async_commit;
using detail::cp_async_wait;
using detail::Cvt;
using detail::group_sum;
using detail::ld_cached;
using detail::ld_stream;
using detail::st_float4;
using detail::st_vec;

// ------------------------------------------------------------------------------------------------------------
// Configurations. One table per direction, indexed by the number of 16-byte vectors per row (nv); the first
// entry with nv <= max_nv is used. threads per block = L * R.

struct Config {
  int max_nv;      // largest nv this entry handles
  int L;           // threads per row: a power of two <= 32, or a multiple of 32
  int V;           // 16-byte vectors per thread (at most); L * V >= max_nv
  int R;           // rows per block at a time
  int min_blocks;  // __launch_bounds__ minimum blocks per SM: caps registers at about 64K / (L * R * min_blocks)
  int pipeline;    // backward only: a Pipeline value
};

// Backward load scheduling (per row group of a block).
enum Pipeline : int {
  // A ring of shared-memory stages filled with cp.async up to 3 rows ahead of the processing (as many stages,
  // 2 to 4, as fit in 48 KB of static shared memory). Each thread copies, and later reads back, only its own
  // vectors, so no barrier is needed. Costs no registers: for the V = 1 configurations.
  kPipeAsync = 0,
  // All of row s's inputs are loaded into registers when row s starts: large V with few blocks per SM, where
  // one row's loads already keep enough bytes in flight.
  kPipeRowStart = 1,
  // Like kPipeRowStart, but y/grad_x_out are loaded only after the row reduction: fewest registers live across
  // it (float rows of more than 4096 elements).
  kPipeLateResidual = 2,
};

// nv = C / 8 for half/bfloat16, C / 4 for float. Notable shapes:
//   bf16/fp16 C=1152 -> nv=144 -> plain (32, 5, 4), residual (16, 9, 8) (see kForwardPlainConfigs).
//   float     C=1152 -> nv=288 -> (32, 9, 4): exact fit.
//   16-bit C=2048 -> (32, 8, 4); C=4096 -> (64, 8, 2); C=8192 -> (128, 8, 1).
constexpr Config kForwardConfigs[] = {
    // max_nv   L  V   R  min_blocks pipeline (unused)
    {4,       4, 1, 32, 1, 0},
    {8,       8, 1, 16, 1, 0},
    {16,     16, 1,  8, 1, 0},
    {32,     32, 1,  4, 1, 0},
    {64,     32, 2,  4, 1, 0},
    {128,    32, 4,  4, 1, 0},
    {144,    16, 9,  8, 4, 0},
    {256,    32, 8,  4, 4, 0},
    {288,    32, 9,  4, 4, 0},
    {512,    64, 8,  2, 4, 0},
    {1024,  128, 8,  1, 4, 0},
    {2048,  256, 8,  1, 2, 0},
};
// The plain forward moves half the bytes per row of the residual one, so it needs more rows in flight: at
// bf16 C=1152 on an H100 (16 x 4096 rows), 32 lanes x 5 vectors reached 2.69 TB/s against 2.49 for the
// residual mode's 16 x 9 (which stays best there: 2.49 against 2.34). Same table otherwise.
constexpr Config kForwardPlainConfigs[] = {
    {4,       4, 1, 32, 1, 0},
    {8,       8, 1, 16, 1, 0},
    {16,     16, 1,  8, 1, 0},
    {32,     32, 1,  4, 1, 0},
    {64,     32, 2,  4, 1, 0},
    {128,    32, 4,  4, 1, 0},
    {144,    32, 5,  4, 4, 0},
    {256,    32, 8,  4, 4, 0},
    {288,    32, 9,  4, 4, 0},
    {512,    64, 8,  2, 4, 0},
    {1024,  128, 8,  1, 4, 0},
    {2048,  256, 8,  1, 2, 0},
};

// Backward keeps 2 (plain) or 3 (residual) fp32 accumulators per element a thread owns, so rows are spread over
// more threads (V small):
//   bf16/fp16 C=1152 -> nv=144 -> (160, 1, 1): 5 warps per row, 144 of 160 threads active, 4 blocks per SM.
//   float     C=1152 -> nv=288 -> (288, 1, 1): 9 warps per row.
//   16-bit C=2048 -> (256, 1, 1); C=4096 -> (256, 2, 1); C=8192 -> (512, 2, 1).
constexpr Config kBackwardConfigs[] = {
    // max_nv   L  V   R  min_blocks pipeline
    {4,       4, 1, 32, 4, kPipeAsync},
    {8,       8, 1, 16, 4, kPipeAsync},
    {16,     16, 1,  8, 4, kPipeAsync},
    {32,     32, 1,  4, 4, kPipeAsync},
    {64,     64, 1,  2, 4, kPipeAsync},
    {128,   128, 1,  1, 4, kPipeAsync},
    {160,   160, 1,  1, 4, kPipeAsync},
    {256,   256, 1,  1, 2, kPipeAsync},
    {288,   288, 1,  1, 2, kPipeAsync},
    {512,   256, 2,  1, 2, kPipeRowStart},
    {1024,  512, 2,  1, 1, kPipeRowStart},
    {2048,  512, 4,  1, 1, kPipeLateResidual},
};

constexpr int kNumForwardConfigs = sizeof(kForwardConfigs) / sizeof(Config);
constexpr int kNumBackwardConfigs = sizeof(kBackwardConfigs) / sizeof(Config);

constexpr bool table_ok(const Config* table, int count) {
  for (int i = 0; i < count; ++i) {
    const Config& c = table[i];
    const bool l_ok = c.L <= 32 ? (c.L >= 1 && (c.L & (c.L - 1)) == 0) : (c.L % 32 == 0);
    if (!l_ok || c.V < 1 || c.R < 1 || c.min_blocks < 1 || c.L * c.V < c.max_nv || (c.L * c.R) % 32 != 0 ||
        c.L * c.R > 1024)
      return false;
    if (i > 0 && table[i - 1].max_nv >= c.max_nv) return false;
  }
  // The last entry must cover C = kAdaLNMaxC for float (4 elements per vector).
  return table[count - 1].max_nv >= kAdaLNMaxC / 4;
}
static_assert(table_ok(kForwardConfigs, kNumForwardConfigs), "bad forward config table");
static_assert(table_ok(kForwardPlainConfigs, kNumForwardConfigs) &&
                  sizeof(kForwardPlainConfigs) == sizeof(kForwardConfigs),
              "bad plain forward config table");
static_assert(table_ok(kBackwardConfigs, kNumBackwardConfigs), "bad backward config table");

// ------------------------------------------------------------------------------------------------------------
// Row reduction: sums kN values over the kL threads of each row; every thread of the row gets the sums.
// For kL > 32, `red` is shared memory of (block threads / 32) * kN floats and the call contains one
// __syncthreads(), so all threads of the block must make it; a second call may reuse `red` only after another
// barrier (callers alternate between two buffers).
template <int kL, int kN>
__device__ __forceinline__ void row_allreduce(float (&v)[kN], float* red) {
  if constexpr (kL <= 32) {
#pragma unroll
    for (int q = 0; q < kN; ++q) v[q] = group_sum<kL>(v[q]);
  } else {
    constexpr int kW = kL / 32;  // warps per row
#pragma unroll
    for (int q = 0; q < kN; ++q) v[q] = group_sum<32>(v[q]);
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int q = 0; q < kN; ++q) red[warp * kN + q] = v[q];
    }
    __syncthreads();
    const int first = (warp / kW) * kW;  // first warp of this row
#pragma unroll
    for (int q = 0; q < kN; ++q) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kW; ++w) s += red[(first + w) * kN + q];
      v[q] = s;
    }
  }
}

template <typename T>
__device__ __forceinline__ const T* row_ptr(const ConstTensor3D& t, int64_t b, int64_t r) {
  return static_cast<const T*>(t.data) + b * t.stride_b + r * t.stride_row;
}
template <typename T>
__device__ __forceinline__ T* row_ptr(const MutTensor3D& t, int64_t b, int64_t r) {
  return static_cast<T*>(t.data) + b * t.stride_b + r * t.stride_row;
}

// ------------------------------------------------------------------------------------------------------------
// Forward.

template <typename T, bool kResidual, int kL, int kV, int kR, int kMinBlocks>
__global__ void __launch_bounds__(kL * kR, kMinBlocks) adaln_forward_kernel(const AdaLNForwardParams p) {
  using Cv = Cvt<T>;
  constexpr int kE = Cv::kElems;
  constexpr int kThreads = kL * kR;
  __shared__ float red[2][kL > 32 ? kThreads / 32 : 1];  // [0]: sum, [1]: sum of squared deviations

  const int t = threadIdx.x % kL;  // thread within the row
  const int64_t rows = p.B * p.N;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kR + threadIdx.x / kL;
  const bool row_ok = row < rows;
  const int nv = static_cast<int>(p.C) / kE;

  int64_t b = 0, n = 0, grp = 0;
  if (row_ok) {
    const int64_t gs = p.N / p.G;  // rows per modulation group
    if (rows <= INT_MAX) {         // 32-bit divisions are much cheaper than 64-bit ones
      const uint32_t r32 = static_cast<uint32_t>(row), n32 = static_cast<uint32_t>(p.N);
      b = r32 / n32;
      n = r32 - static_cast<uint32_t>(b) * n32;
      grp = static_cast<uint32_t>(n) / static_cast<uint32_t>(gs);
    } else {
      b = row / p.N;
      n = row - b * p.N;
      grp = n / gs;
    }
  }

  // Per-thread pointers (*_row) address element t * kE of their row; vector i of the thread is at + i * kL * kE.
  const T* x_row = row_ptr<T>(p.x, b, n) + t * kE;
  uint4 xv[kV];  // the LayerNorm input (x, or the rounded x_out), packed

  if constexpr (kResidual) {
    const T* y_row = row_ptr<T>(p.y, b, n) + t * kE;
    const T* gate_row = row_ptr<T>(p.gate, b, grp) + t * kE;
    uint4 yv[kV];
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int j = t + i * kL;
      if (row_ok && j < nv) {
        xv[i] = ld_stream(x_row + i * kL * kE);
        yv[i] = ld_stream(y_row + i * kL * kE);
      } else {
        xv[i] = yv[i] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
    T* xo_row = row_ptr<T>(p.x_out, b, n) + t * kE;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int j = t + i * kL;
      if (row_ok && j < nv) {
        float xf[kE], yf[kE], gf[kE];
        Cv::to_float(xv[i], xf);
        Cv::to_float(yv[i], yf);
        Cv::to_float(ld_cached(gate_row + i * kL * kE), gf);  // modulation: cached, usually an L1 hit
#pragma unroll
        for (int e = 0; e < kE; ++e) xf[e] = __fadd_rn(xf[e], __fmul_rn(gf[e], yf[e]));  // no FMA contraction
        xv[i] = Cv::from_float(xf);  // the one rounding to T; LayerNorm reads this rounded value
        st_vec(xo_row + i * kL * kE, xv[i]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int j = t + i * kL;
      xv[i] = (row_ok && j < nv) ? ld_stream(x_row + i * kL * kE) : make_uint4(0u, 0u, 0u, 0u);
    }
  }

  const float c_f = static_cast<float>(p.C);

  // Mean.
  float acc[1] = {0.f};
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    if (t + i * kL < nv) {  // vectors past the row end hold zeros, but skip them anyway
      float f[kE];
      Cv::to_float(xv[i], f);
#pragma unroll
      for (int e = 0; e < kE; ++e) acc[0] += f[e];
    }
  }
  row_allreduce<kL, 1>(acc, red[0]);
  const float mean = __fdiv_rn(acc[0], c_f);

  // Biased variance from the registered values (two-pass).
  acc[0] = 0.f;
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    if (t + i * kL < nv) {
      float f[kE];
      Cv::to_float(xv[i], f);
#pragma unroll
      for (int e = 0; e < kE; ++e) {
        const float d = f[e] - mean;
        acc[0] = fmaf(d, d, acc[0]);
      }
    }
  }
  row_allreduce<kL, 1>(acc, red[1]);
  const float rstd = __frsqrt_rn(__fdiv_rn(acc[0], c_f) + p.eps);

  if (row_ok && t == 0) {
    p.mean[row] = mean;
    p.rstd[row] = rstd;
  }

  // h = xhat * (1 + scale) + shift.
  const T* scale_row = row_ptr<T>(p.scale, b, grp) + t * kE;
  const T* shift_row = row_ptr<T>(p.shift, b, grp) + t * kE;
  T* h_row = row_ptr<T>(p.h, b, n) + t * kE;
#pragma unroll
  for (int i = 0; i < kV; ++i) {
    const int j = t + i * kL;
    if (row_ok && j < nv) {
      float f[kE], sc[kE], sh[kE];
      Cv::to_float(xv[i], f);
      Cv::to_float(ld_cached(scale_row + i * kL * kE), sc);
      Cv::to_float(ld_cached(shift_row + i * kL * kE), sh);
#pragma unroll
      for (int e = 0; e < kE; ++e) f[e] = fmaf((f[e] - mean) * rstd, 1.f + sc[e], sh[e]);
      st_vec(h_row + i * kL * kE, Cv::from_float(f));
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Backward.

// A row's inputs for this thread, packed. Split in two so that y and grad_x_out, needed only after the row
// reduction, can be loaded later than grad_h and x_ln (kPipeLateResidual).
template <int kV>
struct BackwardRowMain {
  uint4 grad_h[kV];
  uint4 x_ln[kV];
  float mean;
  float rstd;
};
template <int kV>
struct BackwardRowResidual {
  uint4 y[kV];
  uint4 grad_x_out[kV];
};

// kPipeAsync ring: per stage, kInputs 16-byte vectors per thread slot (grad_h, x_ln[, y, grad_x_out]) times kV,
// plus mean and rstd per thread. As many stages (2..4) as fit in `budget` bytes of static shared memory.
constexpr int kAsyncMaxStages = 4;
constexpr int async_stage_bytes(int threads, int vecs, int inputs) { return threads * (vecs * inputs * 16 + 8); }
constexpr int async_stages(int stage_bytes, int budget) {
  return budget / stage_bytes >= kAsyncMaxStages ? kAsyncMaxStages : budget / stage_bytes;
}

template <typename T, bool kResidual, int kL, int kV, int kR, int kMinBlocks, int kPipeline>
__global__ void __launch_bounds__(kL * kR, kMinBlocks) adaln_backward_kernel(const AdaLNBackwardParams p) {
  using Cv = Cvt<T>;
  constexpr int kE = Cv::kElems;
  constexpr int kThreads = kL * kR;
  constexpr int kCap = kL * kV * kE;  // columns a row group covers (>= C)
  __shared__ float red[2][kL > 32 ? 2 * kThreads / 32 : 1];  // double-buffered per-row sums
  __shared__ __align__(16) float acc_buf[kR > 1 ? kR * kCap : 4];

  // kPipeAsync ring: ring[stage][input][thread][vector] (uint4), ring_stats[stage][mean|rstd][thread].
  constexpr bool kAsync = kPipeline == kPipeAsync;
  constexpr int kInputs = kResidual ? 4 : 2;
  constexpr int kStageBytes = async_stage_bytes(kThreads, kV, kInputs);
  constexpr int kRingBudget = 48 * 1024 - static_cast<int>(sizeof(red) + sizeof(acc_buf)) - 256;
  constexpr int kStages = kAsync ? async_stages(kStageBytes, kRingBudget) : 1;
  static_assert(!kAsync || kStages >= 2, "kPipeAsync: not even two ring stages fit in static shared memory");
  __shared__ __align__(16) uint4 ring[kAsync ? kStages * kInputs * kThreads * kV : 1];
  __shared__ float ring_stats[kAsync ? kStages * 2 * kThreads : 1];

  const int tid = threadIdx.x;
  const int t = tid % kL;
  const int rg = tid / kL;  // row group within the block
  const int nv = static_cast<int>(p.C) / kE;

  // This block's slot (b, g, k) and its rows [n_begin, n_end) of sample b.
  const int64_t slot = blockIdx.x;
  const int64_t k = slot % p.K;
  const int64_t bg = slot / p.K;
  const int64_t g = bg % p.G;
  const int64_t b = bg / p.G;
  const int64_t gs = p.N / p.G;
  const int64_t rpc = (gs + p.K - 1) / p.K;
  // Row indices within a sample fit in 32 bits (the launcher checks N <= INT_MAX).
  const int n_begin = static_cast<int>(g * gs + min(k * rpc, gs));
  const int n_end = static_cast<int>(g * gs + min((k + 1) * rpc, gs));
  const int steps = (n_end - n_begin + kR - 1) / kR;

  const T* scale_row = row_ptr<T>(p.scale, b, g) + t * kE;
  const T* gate_row = kResidual ? row_ptr<T>(p.gate, b, g) + t * kE : nullptr;
  const bool has_grad_x_out = kResidual && p.grad_x_out.data != nullptr;
  const float inv_c = 1.f / static_cast<float>(p.C);

  float acc_shift[kV][kE], acc_scale[kV][kE], acc_gate[kResidual ? kV : 1][kE];
#pragma unroll
  for (int i = 0; i < kV; ++i) {
#pragma unroll
    for (int e = 0; e < kE; ++e) {
      acc_shift[i][e] = 0.f;
      acc_scale[i][e] = 0.f;
      acc_gate[kResidual ? i : 0][e] = 0.f;
    }
  }

  // Row cursors. This thread's row group handles rows n_begin + rg, n_begin + rg + kR, ...; the pointers address
  // element t * kE of the current row (vector i of the thread is at + i * kL * kE) and move kR rows per step.
  // With kPipeAsync, loads (n_ld) run up to kStages - 1 rows ahead of the processing (n_st).
  const int row0 = n_begin + rg;
  const T* gh_ld = row_ptr<T>(p.grad_h, b, row0) + t * kE;
  const T* xl_ld = row_ptr<T>(p.x_ln, b, row0) + t * kE;
  // Without grad_x_out its cursor walks grad_h (valid memory) but is never loaded from.
  const ConstTensor3D& go_t = has_grad_x_out ? p.grad_x_out : p.grad_h;
  const T* go_ld = kResidual ? row_ptr<T>(go_t, b, row0) + t * kE : nullptr;
  const T* y_ld = kResidual ? row_ptr<T>(p.y, b, row0) + t * kE : nullptr;
  const int64_t stat0 = b * p.N;  // mean/rstd index of row 0 of sample b
  int n_ld = row0;   // next row for load_main
  int n_res = row0;  // next row for load_residual

  T* gx_st = row_ptr<T>(p.grad_x, b, row0) + t * kE;
  T* gy_st = kResidual ? row_ptr<T>(p.grad_y, b, row0) + t * kE : nullptr;
  int n_st = row0;

  // Load the next row's grad_h, x_ln, mean, rstd (zeros where there is no row or no vector), then advance.
  auto load_main = [&](BackwardRowMain<kV>& in) {
    const bool ok = n_ld < n_end;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const bool v_ok = ok && t + i * kL < nv;
      in.grad_h[i] = v_ok ? ld_stream(gh_ld + i * kL * kE) : make_uint4(0u, 0u, 0u, 0u);
      in.x_ln[i] = v_ok ? ld_stream(xl_ld + i * kL * kE) : make_uint4(0u, 0u, 0u, 0u);
    }
    in.mean = ok ? __ldg(p.mean + stat0 + n_ld) : 0.f;
    in.rstd = ok ? __ldg(p.rstd + stat0 + n_ld) : 0.f;
    gh_ld += p.grad_h.stride_row * kR;
    xl_ld += p.x_ln.stride_row * kR;
    n_ld += kR;
  };
  // Load the next row's y and grad_x_out (residual mode), then advance.
  auto load_residual = [&](BackwardRowResidual<kV>& in) {
    const bool ok = n_res < n_end;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const bool v_ok = ok && t + i * kL < nv;
      in.y[i] = v_ok ? ld_stream(y_ld + i * kL * kE) : make_uint4(0u, 0u, 0u, 0u);
      in.grad_x_out[i] = (v_ok && has_grad_x_out) ? ld_stream(go_ld + i * kL * kE) : make_uint4(0u, 0u, 0u, 0u);
    }
    y_ld += p.y.stride_row * kR;
    go_ld += go_t.stride_row * kR;
    n_res += kR;
  };

  // Processes the next row to process from its loaded inputs, then advances. s: the step (buffer parity).
  auto process_row = [&](int s, const BackwardRowMain<kV>& cur, BackwardRowResidual<kV>& res) {
    const bool row_ok = n_st < n_end;
    const float mean = cur.mean, rstd = cur.rstd;

    // Pass 1: the two row sums, and the shift/scale partials.
    float sums[2] = {0.f, 0.f};  // sum(dxhat), sum(dxhat * xhat)
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int j = t + i * kL;
      if (row_ok && j < nv) {
        float gh[kE], xl[kE], sc[kE];
        Cv::to_float(cur.grad_h[i], gh);
        Cv::to_float(cur.x_ln[i], xl);
        Cv::to_float(ld_cached(scale_row + i * kL * kE), sc);
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          const float xhat = (xl[e] - mean) * rstd;
          const float dxhat = gh[e] * (1.f + sc[e]);
          sums[0] += dxhat;
          sums[1] = fmaf(dxhat, xhat, sums[1]);
          acc_shift[i][e] += gh[e];
          acc_scale[i][e] = fmaf(gh[e], xhat, acc_scale[i][e]);
        }
      }
    }
    row_allreduce<kL, 2>(sums, red[s & 1]);
    const float mean_dxhat = sums[0] * inv_c;
    const float mean_dxhat_xhat = sums[1] * inv_c;

    // Pass 2: grad_x = g (+ grad_x_out), grad_y and the gate partial. Vector i's residual part runs right after
    // its g, except with kPipeLateResidual, where all g are computed first (grad_h and x_ln die), then y and
    // grad_x_out are loaded.
    float d[kV][kE];
    auto finish_vector = [&](int i) {
      if constexpr (kResidual) {
        float go[kE], yv[kE], gt[kE], gy[kE];
        Cv::to_float(res.grad_x_out[i], go);  // zeros when grad_x_out is absent
        Cv::to_float(res.y[i], yv);
        Cv::to_float(ld_cached(gate_row + i * kL * kE), gt);
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          d[i][e] += go[e];
          gy[e] = d[i][e] * gt[e];
          acc_gate[i][e] = fmaf(d[i][e], yv[e], acc_gate[i][e]);
        }
        st_vec(gy_st + i * kL * kE, Cv::from_float(gy));
      }
      st_vec(gx_st + i * kL * kE, Cv::from_float(d[i]));
    };
    constexpr bool kLate = kResidual && kPipeline == kPipeLateResidual;
#pragma unroll
    for (int i = 0; i < kV; ++i) {
      const int j = t + i * kL;
      if (row_ok && j < nv) {
        float gh[kE], xl[kE], sc[kE];
        Cv::to_float(cur.grad_h[i], gh);
        Cv::to_float(cur.x_ln[i], xl);
        Cv::to_float(ld_cached(scale_row + i * kL * kE), sc);
#pragma unroll
        for (int e = 0; e < kE; ++e) {
          const float xhat = (xl[e] - mean) * rstd;
          const float dxhat = gh[e] * (1.f + sc[e]);
          d[i][e] = rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat);
        }
        if constexpr (!kLate) finish_vector(i);
      }
    }
    if constexpr (kLate) {
      load_residual(res);
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        if (row_ok && t + i * kL < nv) finish_vector(i);
      }
    }
    gx_st += p.grad_x.stride_row * kR;
    if constexpr (kResidual) gy_st += p.grad_y.stride_row * kR;
    n_st += kR;
  };

  BackwardRowResidual<kV> res;  // only used in residual mode
  if constexpr (!kResidual) {
#pragma unroll
    for (int i = 0; i < kV; ++i) res.y[i] = res.grad_x_out[i] = make_uint4(0u, 0u, 0u, 0u);
  }
  if constexpr (kAsync) {
    // This thread's slot for input q, vector i of stage st: ring[((st * kInputs + q) * kThreads + tid) * kV + i].
    auto slot = [&](int st, int q) { return ring + ((st * kInputs + q) * kThreads + tid) * kV; };
    // Issue the copies of the next row to load into stage st, then advance (one commit per row, maybe empty).
    auto issue_row = [&](int st) {
      if (n_ld < n_end) {
#pragma unroll
        for (int i = 0; i < kV; ++i) {
          if (t + i * kL < nv) {
            cp_async_16(slot(st, 0) + i, gh_ld + i * kL * kE);
            cp_async_16(slot(st, 1) + i, xl_ld + i * kL * kE);
            if constexpr (kResidual) {
              cp_async_16(slot(st, 2) + i, y_ld + i * kL * kE);
              if (has_grad_x_out) cp_async_16(slot(st, 3) + i, go_ld + i * kL * kE);
            }
          }
        }
        cp_async_4(ring_stats + (st * 2 + 0) * kThreads + tid, p.mean + stat0 + n_ld);
        cp_async_4(ring_stats + (st * 2 + 1) * kThreads + tid, p.rstd + stat0 + n_ld);
      }
      cp_async_commit();
      gh_ld += p.grad_h.stride_row * kR;
      xl_ld += p.x_ln.stride_row * kR;
      if constexpr (kResidual) {
        y_ld += p.y.stride_row * kR;
        go_ld += go_t.stride_row * kR;
      }
      n_ld += kR;
    };
    // Read the row to process next from stage st (its copies are complete): zeros where nothing was copied.
    auto read_row = [&](int st, BackwardRowMain<kV>& in, BackwardRowResidual<kV>& r) {
      const bool ok = n_st < n_end;
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        const bool v_ok = ok && t + i * kL < nv;
        const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
        in.grad_h[i] = v_ok ? slot(st, 0)[i] : zero;
        in.x_ln[i] = v_ok ? slot(st, 1)[i] : zero;
        if constexpr (kResidual) {
          r.y[i] = v_ok ? slot(st, 2)[i] : zero;
          r.grad_x_out[i] = (v_ok && has_grad_x_out) ? slot(st, 3)[i] : zero;
        }
      }
      in.mean = ok ? ring_stats[(st * 2 + 0) * kThreads + tid] : 0.f;
      in.rstd = ok ? ring_stats[(st * 2 + 1) * kThreads + tid] : 0.f;
    };
    // Rows s .. s + kStages - 2 are in flight when row s is processed.
#pragma unroll
    for (int st = 0; st + 1 < kStages; ++st) issue_row(st);
    BackwardRowMain<kV> cur;
    int st = 0;  // stage of row s
    for (int s = 0; s < steps; ++s) {
      issue_row(st == 0 ? kStages - 1 : st - 1);  // row s + kStages - 1 into the stage row s - 1 has left
      cp_async_wait<kStages - 1>();                // row s's group is complete
      read_row(st, cur, res);
      process_row(s, cur, res);
      st = st + 1 == kStages ? 0 : st + 1;
    }
    cp_async_wait<0>();  // only empty groups remain (rows past the chunk), but leave nothing in flight
  } else {
    BackwardRowMain<kV> cur;
    for (int s = 0; s < steps; ++s) {
      load_main(cur);
      if constexpr (kResidual && kPipeline == kPipeRowStart) load_residual(res);
      process_row(s, cur, res);  // kPipeLateResidual: loads y/grad_x_out after the reduction
    }
  }

  // Write this slot's partial sums: [B, G, K, C] contiguous, slot-major.
  const int64_t C = p.C;
  auto write_partial = [&](const float (&acc)[kV][kE], float* out_base) {
    float* out = out_base + slot * C;
    if constexpr (kR == 1) {
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        const int j = t + i * kL;
        if (j < nv) {
#pragma unroll
          for (int q = 0; q < kE; q += 4)
            st_float4(out + j * kE + q, acc[i][q], acc[i][q + 1], acc[i][q + 2], acc[i][q + 3]);
        }
      }
    } else {
      __syncthreads();  // the previous call's readers of acc_buf are done
#pragma unroll
      for (int i = 0; i < kV; ++i) {
        const int j = t + i * kL;
        if (j < nv) {
#pragma unroll
          for (int q = 0; q < kE; q += 4)
            st_float4(acc_buf + rg * kCap + j * kE + q, acc[i][q], acc[i][q + 1], acc[i][q + 2], acc[i][q + 3]);
        }
      }
      __syncthreads();
      const int c4_count = static_cast<int>(C / 4);
      for (int c4 = tid; c4 < c4_count; c4 += kThreads) {
        float4 s = *reinterpret_cast<const float4*>(acc_buf + 4 * c4);
#pragma unroll
        for (int r = 1; r < kR; ++r) {
          const float4 v = *reinterpret_cast<const float4*>(acc_buf + r * kCap + 4 * c4);
          s.x += v.x;
          s.y += v.y;
          s.z += v.z;
          s.w += v.w;
        }
        st_float4(out + 4 * c4, s.x, s.y, s.z, s.w);
      }
    }
  };
  write_partial(acc_shift, p.partial_shift);
  write_partial(acc_scale, p.partial_scale);
  if constexpr (kResidual) write_partial(acc_gate, p.partial_gate);
}

// ------------------------------------------------------------------------------------------------------------
// Host side: validation and dispatch.

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// A stride matters only when its dimension has more than one index.
bool stride_ok(int64_t stride, int64_t size) { return size <= 1 || stride % 8 == 0; }

template <typename P>
bool tensor_ok(const Strided3D<P>& t, int64_t B, int64_t R) {
  return t.data != nullptr && aligned16(t.data) && stride_ok(t.stride_b, B) && stride_ok(t.stride_row, R);
}

bool shape_ok(int64_t B, int64_t N, int64_t G, int64_t C) {
  return B >= 0 && N >= 0 && G >= 1 && N % G == 0 && C >= 1 && C <= kAdaLNMaxC && C % 8 == 0;
}

int elems_per_vec(DType dtype) { return 16 / dtype_size(dtype); }

// Largest nv for element type T (C = kAdaLNMaxC): table entries past the one covering it are not instantiated.
template <typename T>
constexpr int max_vecs() {
  return kAdaLNMaxC / detail::VecTraits<T>::kElems;
}

int config_index(const Config* table, int count, int nv) {
  for (int i = 0; i < count; ++i)
    if (nv <= table[i].max_nv) return i;
  return -1;
}

AdaLNKernelConfig to_public(const Config* table, int count, DType dtype, int64_t C) {
  AdaLNKernelConfig out;
  if (C < 1 || C > kAdaLNMaxC || C % 8 != 0) return out;
  const int idx = config_index(table, count, static_cast<int>(C) / elems_per_vec(dtype));
  if (idx < 0) return out;
  out.threads_per_row = table[idx].L;
  out.vecs_per_thread = table[idx].V;
  out.threads = table[idx].L * table[idx].R;
  out.valid = true;
  return out;
}

template <typename T, bool kResidual, int I = 0>
cudaError_t forward_dispatch(const AdaLNForwardParams& p, int nv, cudaStream_t stream) {
  constexpr Config c = kResidual ? kForwardConfigs[I] : kForwardPlainConfigs[I];
  if constexpr (I + 1 < kNumForwardConfigs && c.max_nv < max_vecs<T>()) {  // later entries reachable for T
    if (nv > c.max_nv) return forward_dispatch<T, kResidual, I + 1>(p, nv, stream);
  }
  const int64_t blocks = (p.B * p.N + c.R - 1) / c.R;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  adaln_forward_kernel<T, kResidual, c.L, c.V, c.R, c.min_blocks>
      <<<static_cast<unsigned>(blocks), c.L * c.R, 0, stream>>>(p);
  return cudaGetLastError();
}

// Asks once per device for the largest shared-memory carveout for `kernel` (a hint; the kPipeAsync kernels use
// up to 46 KB of shared memory per block and should still fit 4 blocks per SM).
template <typename Kernel>
cudaError_t prefer_max_shared_carveout(Kernel kernel) {
  static std::atomic<unsigned long long> done_devices{0};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const unsigned long long bit = device < 64 ? 1ull << device : 0ull;
  if (bit != 0 && (done_devices.load(std::memory_order_relaxed) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                             static_cast<int>(cudaSharedmemCarveoutMaxShared));
  if (err == cudaSuccess) done_devices.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

// occupancy != nullptr: report the blocks per multiprocessor instead of launching.
template <typename T, bool kResidual, int I = 0>
cudaError_t backward_dispatch(const AdaLNBackwardParams& p, int nv, cudaStream_t stream, int* occupancy) {
  constexpr Config c = kBackwardConfigs[I];
  if constexpr (I + 1 < kNumBackwardConfigs && c.max_nv < max_vecs<T>()) {  // later entries reachable for T
    if (nv > c.max_nv) return backward_dispatch<T, kResidual, I + 1>(p, nv, stream, occupancy);
  }
  auto kernel = adaln_backward_kernel<T, kResidual, c.L, c.V, c.R, c.min_blocks, c.pipeline>;
  if constexpr (c.pipeline == kPipeAsync) {
    const cudaError_t err = prefer_max_shared_carveout(kernel);
    if (err != cudaSuccess) return err;
  }
  if (occupancy != nullptr) return cudaOccupancyMaxActiveBlocksPerMultiprocessor(occupancy, kernel, c.L * c.R, 0);
  const int64_t blocks = p.B * p.G * p.K;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(blocks), c.L * c.R, 0, stream>>>(p);
  return cudaGetLastError();
}

template <bool kResidual>
cudaError_t backward_by_dtype(const AdaLNBackwardParams& p, cudaStream_t stream, int* occupancy) {
  const int nv = static_cast<int>(p.C) / elems_per_vec(p.dtype);
  switch (p.dtype) {
    case DType::kFloat32: return backward_dispatch<float, kResidual>(p, nv, stream, occupancy);
    case DType::kFloat16: return backward_dispatch<__half, kResidual>(p, nv, stream, occupancy);
    case DType::kBFloat16: return backward_dispatch<__nv_bfloat16, kResidual>(p, nv, stream, occupancy);
  }
  return cudaErrorInvalidValue;
}

template <bool kResidual>
cudaError_t forward_by_dtype(const AdaLNForwardParams& p, cudaStream_t stream) {
  const int nv = static_cast<int>(p.C) / elems_per_vec(p.dtype);
  switch (p.dtype) {
    case DType::kFloat32: return forward_dispatch<float, kResidual>(p, nv, stream);
    case DType::kFloat16: return forward_dispatch<__half, kResidual>(p, nv, stream);
    case DType::kBFloat16: return forward_dispatch<__nv_bfloat16, kResidual>(p, nv, stream);
  }
  return cudaErrorInvalidValue;
}

bool dtype_ok(DType d) { return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16; }

}  // namespace

AdaLNKernelConfig adaln_forward_config(DType dtype, int64_t C, bool residual) {
  return to_public(residual ? kForwardConfigs : kForwardPlainConfigs, kNumForwardConfigs, dtype, C);
}

AdaLNKernelConfig adaln_backward_config(DType dtype, int64_t C) {
  return to_public(kBackwardConfigs, kNumBackwardConfigs, dtype, C);
}

cudaError_t adaln_forward(const AdaLNForwardParams& p, cudaStream_t stream) {
  if (!dtype_ok(p.dtype) || !shape_ok(p.B, p.N, p.G, p.C) || !(p.eps >= 0.f)) return cudaErrorInvalidValue;
  if (p.B * p.N == 0) return cudaSuccess;
  const int64_t B = p.B, N = p.N, G = p.G;
  bool ok = tensor_ok(p.x, B, N) && tensor_ok(p.shift, B, G) && tensor_ok(p.scale, B, G) &&
            tensor_ok(p.h, B, N) && p.mean != nullptr && p.rstd != nullptr;
  if (p.residual) ok = ok && tensor_ok(p.y, B, N) && tensor_ok(p.gate, B, G) && tensor_ok(p.x_out, B, N);
  if (!ok) return cudaErrorInvalidValue;
  return p.residual ? forward_by_dtype<true>(p, stream) : forward_by_dtype<false>(p, stream);
}

cudaError_t adaln_backward(const AdaLNBackwardParams& p, cudaStream_t stream) {
  if (!dtype_ok(p.dtype) || !shape_ok(p.B, p.N, p.G, p.C) || p.K < 1 || p.N > INT_MAX) return cudaErrorInvalidValue;
  if (p.B * p.G * p.K == 0) return cudaSuccess;  // no slot to write (then B == 0: no rows either)
  const int64_t B = p.B, N = p.N, G = p.G;
  bool ok = p.partial_shift != nullptr && p.partial_scale != nullptr && aligned16(p.partial_shift) &&
            aligned16(p.partial_scale) && tensor_ok(p.scale, B, G);
  if (p.residual) ok = ok && p.partial_gate != nullptr && aligned16(p.partial_gate) && tensor_ok(p.gate, B, G);
  if (N > 0) {  // with N == 0 the kernel only zeroes the partial slots: the row tensors may be empty (null)
    ok = ok && tensor_ok(p.grad_h, B, N) && tensor_ok(p.x_ln, B, N) && tensor_ok(p.grad_x, B, N) &&
         p.mean != nullptr && p.rstd != nullptr;
    if (p.residual) {
      ok = ok && tensor_ok(p.y, B, N) && tensor_ok(p.grad_y, B, N) &&
           (p.grad_x_out.data == nullptr || tensor_ok(p.grad_x_out, B, N));
    }
  }
  if (!ok) return cudaErrorInvalidValue;
  return p.residual ? backward_by_dtype<true>(p, stream, nullptr) : backward_by_dtype<false>(p, stream, nullptr);
}

int adaln_backward_blocks_per_sm(DType dtype, int64_t C, bool residual) {
  if (!dtype_ok(dtype) || C < 1 || C > kAdaLNMaxC || C % 8 != 0) return 0;
  AdaLNBackwardParams p;
  p.dtype = dtype;
  p.C = C;
  int blocks = 0;
  const cudaError_t err = residual ? backward_by_dtype<true>(p, nullptr, &blocks)
                                   : backward_by_dtype<false>(p, nullptr, &blocks);
  return err == cudaSuccess ? blocks : 0;
}

}  // namespace openvid
