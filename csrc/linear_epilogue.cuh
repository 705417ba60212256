// A linear layer whose epilogue is the adaLN gated residual (STDiT/MVDiT's attention output projection and
// second MLP linear): torch-free parameter struct and launcher of a Hopper (sm_90a) CUTLASS GEMM.
//
//   out[l, m, :] = residual[l, m, :] + gate[l, :] * (input[l, m, :] @ weight^T + bias)     (gate null: 1)
//
// computed in one pass: the product accumulates in fp32 and the epilogue reads the residual tile, adds the bias,
// multiplies by the gate and adds the residual in fp32, rounding once to the element type. The unfused sequence
// (a linear, then a gated-residual pass) writes the projection and reads it back: two passes over [L*M, N]
// elements that this saves.
//
// Shapes and layouts (counts and strides in ELEMENTS; l is the batch index, e.g. the sample):
//   input:    [L, M, K], element (l, m, k) at input + l*input_stride_l + m*input_stride_m + k
//   weight:   [N, K] row-major (nn.Linear's layout), element (n, k) at weight + n*K + k, shared by all l
//   bias:     [N] contiguous, or null (no bias)
//   gate:     [L, N], element (l, n) at gate + l*gate_stride_l + n, or null (no gate: a plain residual)
//   residual: [L, M, N], element (l, m, n) at residual + l*residual_stride_l + m*residual_stride_m + n
//   out:      [L, M, N], element (l, m, n) at out + l*out_stride_l + m*out_stride_m + n
// Requirements (linear_gated_residual_supported says whether they hold; the launcher returns
// cudaErrorInvalidValue otherwise and launches nothing): an sm_90 device and a build with the sm_90a kernels;
// dtype fp16 or bf16 (all tensors of one dtype); L, M, N, K >= 1 and < 2^31; N % 8 == 0 and K % 8 == 0; every
// pointer used 16-byte aligned; every stride a multiple of 8 elements; out does not overlap any input.
// The launcher is asynchronous on `stream` and returns the launch status, or cudaSuccess without launching when
// there is no work.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace openvid {

struct LinearGatedResidualParams {
  DType dtype = DType::kBFloat16;
  int64_t L = 0, M = 0, N = 0, K = 0;
  const void* input = nullptr;
  int64_t input_stride_l = 0, input_stride_m = 0;
  const void* weight = nullptr;
  const void* bias = nullptr;
  const void* gate = nullptr;
  int64_t gate_stride_l = 0;
  const void* residual = nullptr;
  int64_t residual_stride_l = 0, residual_stride_m = 0;
  void* out = nullptr;
  int64_t out_stride_l = 0, out_stride_m = 0;
};

// Whether the launcher can run these parameters on `device` (the requirements above).
bool linear_gated_residual_supported(const LinearGatedResidualParams& p, int device);

// Bytes of device scratch the launch needs (the caller allocates them; 0 is possible).
size_t linear_gated_residual_workspace_bytes(const LinearGatedResidualParams& p, int device);

cudaError_t linear_gated_residual(const LinearGatedResidualParams& p, void* workspace, int device,
                                  cudaStream_t stream);

}  // namespace openvid
