// Attention over long sequences (STDiT/MVDiT spatial attention, cross-attention to text, the video queries of MVDiT
// joint attention, or any non-causal attention): torch-free parameter struct and launcher of a Hopper (sm_90a)
// forward kernel.
//
// The tensors are 4-D [B, S, H, D] strided views with a contiguous head dim. The packed output of the qkv
// projection [B, S, 3, H, D] gives q = qkv[:, :, 0] with strides (S*3*H*D, 3*H*D, D, 1), and k, v likewise
// (pointers H*D elements apart), read in place.
//
// Keys: for every (b, h) the keys of a query row are the Sk rows k[b, 0:Sk, h] followed, when text keys are given,
// by the first len_b = text_lens[b] rows of k_text[b, :, h] (values from v and v_text likewise). text_lens lives
// on the device and is read by the kernel (no host synchronisation); values outside [0, L] are clamped to it.
// Text rows at or past len_b are never read, so they may hold anything (NaN, Inf).
//
// Forward:   out[b, s, h] = softmax(softmax_scale * q[b, s, h] . keys^T) values   (non-causal),
//            lse[b, h, s] = log(sum_j exp(softmax_scale * q[b, s, h] . key_j))   (natural log, fp32).
// A query row with no keys at all (Sk == 0 and len_b == 0) gets out = 0 and lse = -inf.
// Scores, softmax statistics and accumulations are fp32; the products take fp16/bf16 operands (P is rounded to
// the element type before the P v product, as in FlashAttention).
//
// Shapes and layouts (counts and strides in ELEMENTS):
//   q, out: [B, Sq, H, D]; k, v: [B, Sk, H, D]; k_text, v_text: [B, L, H, D]; element (b, s, h, d) of each at
//   data + b*stride_b + s*stride_s + h*stride_h + d.
//   text_lens: int32 [B], contiguous, device memory (null: no text keys).
//   lse: fp32 [B, H, Sq]: element (b, h, s) at lse[b*lse_stride_b + h*lse_stride_h + s] (unit stride over the
//   queries, any other non-negative strides, e.g. lse_full[:, :, :Sq] of a [B, H, Sq + L] buffer).
// Requirements (spatial_attention_forward_supported says whether they hold; the launcher returns
// cudaErrorInvalidValue otherwise and launches nothing):
//   an sm_90 device (Hopper: wgmma and the tensor-memory accelerator) and a build that has the sm_90a kernels;
//   dtype fp16 or bf16; 8 <= D <= kSpatialAttentionMaxD, D % 8 == 0; 0 <= Sq, Sk, L < 2^30 (Sk may be 0),
//   B, H >= 1 and < 2^31, B * H * ceil(Sq / 64) < 2^31; softmax_scale finite and >= 0; every data pointer that
//   is used 16-byte aligned and non-null (k, v only when Sk > 0; k_text, v_text only when text_lens is given and
//   L > 0; text_lens 4-byte aligned); strides of q, k, v, k_text, v_text, out positive multiples of 8 elements
//   (dimensions of size 1 may have any stride), below 2^36 elements. out may not overlap any input.
// Head dims are computed in buckets (64, 80, 96, 128): the head dim is zero-padded up to the bucket inside the
// kernel (the tensor-memory accelerator zero-fills the columns past D), nothing is read or written past D.
// The launcher is asynchronous on `stream` and returns the launch status (cudaGetLastError after the launch),
// or cudaSuccess without launching when there is no work (B * H * Sq == 0).
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
  int64_t B = 0, Sq = 0, Sk = 0, H = 0, D = 0;
  int64_t L = 0;  // rows of k_text / v_text (looked at only with text_lens)
  float softmax_scale = 1.0f;

  ConstTensor4D q, k, v;                // q [B, Sq, H, D]; k, v [B, Sk, H, D]
  ConstTensor4D k_text, v_text;         // [B, L, H, D], only with text_lens
  const int32_t* text_lens = nullptr;   // [B] on the device; null: no text keys
  MutTensor4D out;                      // [B, Sq, H, D] output
  float* lse = nullptr;                 // [B, H, Sq] output, unit stride over Sq
  int64_t lse_stride_b = 0, lse_stride_h = 0;
};

// Launches the forward kernel (see the requirements above).
cudaError_t spatial_attention_forward(const SpatialAttentionForwardParams& params, cudaStream_t stream);

// True when spatial_attention_forward takes these parameters on the current device (false: use another backend).
// lse and the contents of text_lens are not looked at (lse may still be null); everything else is, including
// building the tensor maps.
bool spatial_attention_forward_supported(const SpatialAttentionForwardParams& params);

}  // namespace openvid
