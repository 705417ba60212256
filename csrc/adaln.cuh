// Fused adaLN modulation (DiT / PixArt / STDiT): torch-free parameter structs and launchers.
//
// Forward, two modes:
//   plain:    h     = LayerNorm(x) * (1 + scale) + shift
//   residual: x_out = round_T(x + gate * y)            (fp32 product and sum, rounded once to the element type)
//             h     = LayerNorm(x_out) * (1 + scale) + shift     (the ROUNDED x_out, as stored)
// LayerNorm has no affine, uses the biased variance over C and `eps`; its statistics are fp32 and are stored:
// mean[b*N + n], rstd[b*N + n] = 1 / sqrt(var + eps). The variance is computed two-pass from registers
// (mean first, then the mean of squared deviations), not as E[x^2] - E[x]^2. All arithmetic is fp32.
//
// Backward (one kernel, both modes), per row with xhat = (x_ln - mean) * rstd, dxhat = grad_h * (1 + scale):
//   g = rstd * (dxhat - mean_C(dxhat) - xhat * mean_C(dxhat * xhat))
//   plain:    grad_x = g
//   residual: d = g + grad_x_out (grad_x_out optional: absent means zero); grad_x = d; grad_y = d * gate
// and fp32 partial sums of the modulation gradients, each a contiguous [B, G, K, C] tensor:
//   partial_shift += grad_h;  partial_scale += grad_h * xhat;  partial_gate += d * y   (residual only)
// Slot (b, g, k) holds the sum over the rows n of group g handled by chunk k:
//   [g*gs + k*rpc, min(g*gs + (k+1)*rpc, (g+1)*gs)),  gs = N / G, rpc = ceil(gs / K);
// every slot is written (zero when its range is empty). The caller sums over K afterwards.
//
// Shapes and layouts (counts and strides in ELEMENTS):
//   x, y, h, x_out, grad_h, grad_x_out, x_ln, grad_x, grad_y: [B, N, C], strides (stride_b, stride_row = stride_n),
//     last dimension contiguous (stride 1).
//   shift, scale, gate: [B, G, C], strides (stride_b, stride_row = stride_g), last dimension contiguous;
//     N % G == 0 and token n of sample b uses modulation row (b, n / (N / G)).
//     G = 1: per sample, G = T: per frame, G = N: per token.
//   mean, rstd: fp32 contiguous [B * N].
// Requirements (checked by the launchers, which return cudaErrorInvalidValue otherwise; nothing is launched):
//   1 <= C <= 8192, C % 8 == 0; every data pointer 16-byte aligned; every stride of a dimension of size > 1 a
//   multiple of 8 elements; B >= 0, N >= 0, G >= 1, N % G == 0; K >= 1; backward: N <= INT_MAX; non-null
//   pointers for every tensor the mode uses (backward with N == 0 needs only scale/gate and the partials, which
//   it zeroes). Outputs must not alias inputs (inputs are read through the non-coherent read-only path).
// Numerics: x_out = round_T(fp32(x) + fp32(gate) * fp32(y)) with the product and the sum each rounded to fp32
// (no fused multiply-add), matching an unfused fp32 reference; mean and the variance divide by C exactly
// (IEEE division) and rstd is the correctly rounded 1/sqrt(var + eps).
// Launchers are asynchronous on `stream` and return the launch status (cudaGetLastError after the launch), or
// cudaSuccess without launching when there is no work.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace openvid {

// A strided 3-D tensor [B, R, C] with a contiguous last dimension: element (b, r, c) is at
// data + b * stride_b + r * stride_row + c (in elements of the tensor's type).
template <typename Ptr>
struct Strided3D {
  Ptr data = nullptr;
  int64_t stride_b = 0;
  int64_t stride_row = 0;
};
using ConstTensor3D = Strided3D<const void*>;
using MutTensor3D = Strided3D<void*>;

constexpr int kAdaLNMaxC = 8192;

struct AdaLNForwardParams {
  DType dtype = DType::kBFloat16;
  bool residual = false;
  int64_t B = 0, N = 0, G = 1, C = 0;
  float eps = 1e-6f;

  ConstTensor3D x;      // [B, N, C]
  ConstTensor3D y;      // [B, N, C], residual mode only
  ConstTensor3D gate;   // [B, G, C], residual mode only
  ConstTensor3D shift;  // [B, G, C]
  ConstTensor3D scale;  // [B, G, C]

  MutTensor3D h;        // [B, N, C] output
  MutTensor3D x_out;    // [B, N, C] output, residual mode only
  float* mean = nullptr;  // [B * N] output
  float* rstd = nullptr;  // [B * N] output
};

struct AdaLNBackwardParams {
  DType dtype = DType::kBFloat16;
  bool residual = false;
  int64_t B = 0, N = 0, G = 1, C = 0;
  int64_t K = 1;  // chunks per modulation group (partial_*.size(2))

  ConstTensor3D grad_h;      // [B, N, C]
  ConstTensor3D grad_x_out;  // [B, N, C], residual mode, optional (data == nullptr: zero)
  ConstTensor3D x_ln;        // [B, N, C]: x (plain) or x_out (residual), the LayerNorm input
  const float* mean = nullptr;  // [B * N]
  const float* rstd = nullptr;  // [B * N]
  ConstTensor3D scale;       // [B, G, C]
  ConstTensor3D y;           // [B, N, C], residual mode only
  ConstTensor3D gate;        // [B, G, C], residual mode only

  MutTensor3D grad_x;        // [B, N, C] output
  MutTensor3D grad_y;        // [B, N, C] output, residual mode only
  float* partial_shift = nullptr;  // [B, G, K, C] fp32 contiguous output
  float* partial_scale = nullptr;  // [B, G, K, C] fp32 contiguous output
  float* partial_gate = nullptr;   // [B, G, K, C] fp32 contiguous output, residual mode only
};

// Kernel configuration picked for rows of C elements of `dtype` (for tests and benchmarks): threads_per_row
// threads share a row, each holding up to vecs_per_thread 16-byte vectors of it; a block of `threads` threads
// works on threads / threads_per_row rows at a time. valid is false for an unsupported C.
struct AdaLNKernelConfig {
  int threads_per_row = 0;
  int vecs_per_thread = 0;
  int threads = 0;  // per block
  bool valid = false;
};

AdaLNKernelConfig adaln_forward_config(DType dtype, int64_t C, bool residual);
AdaLNKernelConfig adaln_backward_config(DType dtype, int64_t C);

cudaError_t adaln_forward(const AdaLNForwardParams& params, cudaStream_t stream);
cudaError_t adaln_backward(const AdaLNBackwardParams& params, cudaStream_t stream);

// How many backward blocks (one per partial slot) fit on one multiprocessor of the current device at once
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor), to size K so that B*G*K is about this times the number of
// multiprocessors (one full wave). 0 on error.
int adaln_backward_blocks_per_sm(DType dtype, int64_t C, bool residual);

}  // namespace openvid
