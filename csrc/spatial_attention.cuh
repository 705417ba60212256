// Attention over long sequences (STDiT/MVDiT spatial attention, or any non-causal self-attention): torch-free
// parameter struct and launcher of a Hopper (sm_90a) forward kernel.
//
// The tensors are 4-D [B, S, H, D] strided views with a contiguous head dim; attention runs over S for every
// (b, h). The packed output of the qkv projection [B, S, 3, H, D] gives q = qkv[:, :, 0] with strides
// (S*3*H*D, 3*H*D, D, 1), and k, v likewise (pointers H*D elements apart), read in place.
//
// Forward:   out = softmax(softmax_scale * q k^T) v   (non-causal, softmax over all S keys per query row),
//            lse[b, h, s] = log(sum_j exp(softmax_scale * q_s . k_j))   (natural log, fp32).
// Scores, softmax statistics and accumulations are fp32; the products take fp16/bf16 operands (P is rounded to
// the element type before the P v product, as in FlashAttention).
//
// Shapes and layouts (counts and strides in ELEMENTS):
//   q, k, v, out: [B, S, H, D], element (b, s, h, d) at data + b*stride_b + s*stride_s + h*stride_h + d.
//   lse: fp32 contiguous [B, H, S]: element (b, h, s) at lse[(b*H + h)*S + s].
// Requirements (spatial_attention_forward_supported says whether they hold; the launcher returns
// cudaErrorInvalidValue otherwise and launches nothing):
//   an sm_90 device (Hopper: wgmma and the tensor-memory accelerator) and a build that has the sm_90a kernels;
//   dtype fp16 or bf16; 8 <= D <= kSpatialAttentionMaxD, D % 8 == 0; S >= 1 (any value), B, H >= 1 and each
//   < 2^31; softmax_scale finite and >= 0; every data pointer 16-byte aligned; strides of q, k, v, out
//   positive multiples of 8 elements (dimensions of size 1 may have any stride), below 2^36 elements; non-null
//   pointers. out may not overlap q, k or v.
// Head dims are computed in buckets (64, 80, 96, 128): the head dim is zero-padded up to the bucket inside the
// kernel (the tensor-memory accelerator zero-fills the columns past D), nothing is read or written past D.
// The launcher is asynchronous on `stream` and returns the launch status (cudaGetLastError after the launch),
// or cudaSuccess without launching when there is no work (B * H * S == 0).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"

namespace openvid {

constexpr int kSpatialAttentionMaxD = 128;

// A strided [B, S, H, D] tensor with a contiguous head dim.
template <typename Ptr>
struct Strided4D {
  Ptr data = nullptr;
  int64_t stride_b = 0;
  int64_t stride_s = 0;
  int64_t stride_h = 0;
};
using ConstTensor4D = Strided4D<const void*>;
using MutTensor4D = Strided4D<void*>;

struct SpatialAttentionForwardParams {
  DType dtype = DType::kBFloat16;
  int64_t B = 0, S = 0, H = 0, D = 0;
  float softmax_scale = 1.0f;

  ConstTensor4D q, k, v;
  MutTensor4D out;
  float* lse = nullptr;  // [B, H, S] output
};

// Launches the forward kernel (see the requirements above).
cudaError_t spatial_attention_forward(const SpatialAttentionForwardParams& params, cudaStream_t stream);

// True when spatial_attention_forward takes these parameters on the current device (false: use another backend).
// lse is not looked at (it may still be null); everything else is, including building the tensor maps.
bool spatial_attention_forward_supported(const SpatialAttentionForwardParams& params);

}  // namespace openvid
