// Attention over many short sequences (STDiT/MVDiT temporal attention): torch-free parameter structs and
// launchers.
//
// The tensors are 5-D [B, T, S, H, D] strided views; attention runs over T (the frames) independently for every
// (b, s, h): B * S * H sequences of length T, head dim D. This is the model's own token order read in place:
// the packed output of the qkv projection [B, T*S, 3, H, D] (token t*S + s) gives q = qkv[:, :, 0] viewed as
// [B, T, S, H, D] with strides (T*S*3*H*D, S*3*H*D, 3*H*D, D, 1), and k, v likewise, with no copy.
//
// Forward:   P = softmax(softmax_scale * q k^T) (over keys, per row), out = P v,
//            lse[b, s, h, t] = log(sum_j exp(softmax_scale * q_t . k_j))   (natural log, fp32)
// Backward:  with P recomputed from lse and delta_t = sum_d dout[t, d] * out[t, d] (fp32, from out as stored):
//            dv = P^T dout,  dP = dout v^T,  dS = P * (dP - delta),
//            dq = softmax_scale * dS k,  dk = softmax_scale * dS^T q.
// Scores, softmax statistics and all accumulations are fp32; the matrix products take fp16/bf16 operands
// (P and dS are rounded to the element type before their products, as in FlashAttention).
//
// Shapes and layouts (counts and strides in ELEMENTS):
//   q, k, v, out, dout, dq, dk, dv: [B, T, S, H, D], element (b, t, s, h, d) at
//     data + b*stride_b + t*stride_t + s*stride_s + h*stride_h + d   (head dim contiguous).
//   lse: fp32 contiguous [B, S, H, T]: element (b, s, h, t) at lse[((b*S + s)*H + h)*T + t].
// Requirements (checked by the launchers, which return cudaErrorInvalidValue otherwise; nothing is launched):
//   dtype fp16 or bf16; 1 <= T <= kTemporalAttentionMaxT; 8 <= D <= kTemporalAttentionMaxD, D % 8 == 0;
//   B, S, H >= 0; every data pointer 16-byte aligned; every stride a multiple of 8 elements; non-null pointers.
//   dq, dk, dv may be views of one packed buffer but must not overlap each other or any input.
// Launchers are asynchronous on `stream` and return the launch status (cudaGetLastError after the launch), or
// cudaSuccess without launching when there is no work (B * S * H == 0).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace openvid {

constexpr int kTemporalAttentionMaxT = 128;
constexpr int kTemporalAttentionMaxD = 128;

// A strided [B, T, S, H, D] tensor with a contiguous head dim.
template <typename Ptr>
struct Strided5D {
  Ptr data = nullptr;
  int64_t stride_b = 0;
  int64_t stride_t = 0;
  int64_t stride_s = 0;
  int64_t stride_h = 0;
};
using ConstTensor5D = Strided5D<const void*>;
using MutTensor5D = Strided5D<void*>;

struct TemporalAttentionForwardParams {
  DType dtype = DType::kBFloat16;
  int64_t B = 0, T = 0, S = 0, H = 0, D = 0;
  float softmax_scale = 1.0f;

  ConstTensor5D q, k, v;
  MutTensor5D out;
  float* lse = nullptr;  // [B, S, H, T] output
};

struct TemporalAttentionBackwardParams {
  DType dtype = DType::kBFloat16;
  int64_t B = 0, T = 0, S = 0, H = 0, D = 0;
  float softmax_scale = 1.0f;

  ConstTensor5D q, k, v, out, dout;
  const float* lse = nullptr;  // [B, S, H, T]
  MutTensor5D dq, dk, dv;
};

cudaError_t temporal_attention_forward(const TemporalAttentionForwardParams& params, cudaStream_t stream);
cudaError_t temporal_attention_backward(const TemporalAttentionBackwardParams& params, cudaStream_t stream);

}  // namespace openvid
