// The one file of openvid_kernels._C that knows torch: argument checks (a second line of defence behind the
// Python wrappers), device guard, current stream, and the launch status turned into a Python exception.
//
// The current stream is at::cuda::getCurrentCUDAStream() (an alias of c10::cuda::getCurrentCUDAStream). It is
// included through c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h, which would also pull in the
// cuSPARSE/cuBLAS/cuSOLVER headers that this extension does not need.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "adaln.cuh"
#include "linear_epilogue.cuh"
#include "spatial_attention.cuh"
#include "temporal_attention.cuh"

namespace {

using OptTensor = std::optional<at::Tensor>;

// Error messages are assembled here from strings and std::to_string, never by TORCH_CHECK's own formatting
// (c10::str, an ostream): on the device machine, formatting a number through an ostream inside this extension
// crashed the process (a segfault instead of the error); strings pass through TORCH_CHECK unharmed.
std::string list_str(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i > 0 ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}

void append(std::string& s, const char* v) { s += v; }
void append(std::string& s, const std::string& v) { s += v; }
void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
void append(std::string& s, const c10::Device& v) { s += v.str(); }
void append(std::string& s, c10::IntArrayRef v) { s += list_str(v); }
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}

template <typename... Parts>
std::string msg(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

openvid::DType to_openvid_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return openvid::DType::kFloat32;
    case at::kHalf: return openvid::DType::kFloat16;
    case at::kBFloat16: return openvid::DType::kBFloat16;
    default:
      TORCH_CHECK(false, msg("openvid adaln: unsupported dtype ", t, " (float32, float16 and bfloat16 only)"));
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0; }

// `op` names the operation in the message ("openvid <op>: ...").
void check_device(const at::Tensor& t, const char* name, const at::Device& device, const char* op = "adaln") {
  TORCH_CHECK(t.is_cuda(), msg("openvid ", op, ": ", name, " must be a CUDA tensor, got one on ", t.device()));
  TORCH_CHECK(t.device() == device, msg("openvid ", op, ": ", name, " must be on ", device, ", got ", t.device()));
}

// A [B, R, C] tensor of the element dtype: shape, contiguous last dimension, 16-byte aligned data, strides of
// dimensions with more than one index multiples of 8 elements.
void check_rows(const at::Tensor& t, const char* name, const at::Device& device, at::ScalarType dtype, int64_t B,
                int64_t R, int64_t C) {
  check_device(t, name, device);
  TORCH_CHECK(t.scalar_type() == dtype,
              msg("openvid adaln: ", name, " must have dtype ", dtype, ", got ", t.scalar_type()));
  TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == R && t.size(2) == C,
              msg("openvid adaln: ", name, " must have shape [", B, ", ", R, ", ", C, "], got ", t.sizes()));
  if (t.numel() == 0) return;
  TORCH_CHECK(t.stride(2) == 1,
              msg("openvid adaln: ", name, " must have a contiguous last dimension, got strides ", t.strides()));
  TORCH_CHECK(aligned16(t), msg("openvid adaln: ", name, " data pointer must be 16-byte aligned"));
  TORCH_CHECK((B <= 1 || t.stride(0) % 8 == 0) && (R <= 1 || t.stride(1) % 8 == 0),
              msg("openvid adaln: ", name, " strides must be multiples of 8 elements, got ", t.strides()));
}

// fp32 contiguous statistics [B * N].
void check_stats(const at::Tensor& t, const char* name, const at::Device& device, int64_t rows) {
  check_device(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kFloat, msg("openvid adaln: ", name, " must be float32, got ", t.scalar_type()));
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.is_contiguous(),
              msg("openvid adaln: ", name, " must be a contiguous 1-D tensor of ", rows, " elements, got sizes ",
                  t.sizes(), " strides ", t.strides()));
}

// fp32 contiguous partial sums [B, G, K, C].
void check_partial(const at::Tensor& t, const char* name, const at::Device& device, int64_t B, int64_t G, int64_t K,
                   int64_t C) {
  check_device(t, name, device);
  TORCH_CHECK(t.scalar_type() == at::kFloat, msg("openvid adaln: ", name, " must be float32, got ", t.scalar_type()));
  TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == G && t.size(2) == K && t.size(3) == C && t.is_contiguous(),
              msg("openvid adaln: ", name, " must be a contiguous [", B, ", ", G, ", ", K, ", ", C,
                  "] tensor, got sizes ", t.sizes(), " strides ", t.strides()));
  TORCH_CHECK(t.numel() == 0 || aligned16(t), msg("openvid adaln: ", name, " data pointer must be 16-byte aligned"));
}

void check_c(int64_t C) {
  TORCH_CHECK(C >= 1 && C <= openvid::kAdaLNMaxC && C % 8 == 0,
              msg("openvid adaln: C must be a multiple of 8 in [8, ", openvid::kAdaLNMaxC, "], got ", C));
}

template <typename P>
openvid::Strided3D<P> rows_of(const at::Tensor& t) {
  return openvid::Strided3D<P>{static_cast<P>(t.data_ptr()), t.stride(0), t.stride(1)};
}

void raise_on_error(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess,
              msg("openvid: ", kernel, " failed: ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

void adaln_forward(const at::Tensor& x, const OptTensor& y, const OptTensor& gate, const at::Tensor& shift,
                   const at::Tensor& scale, const at::Tensor& h, const OptTensor& x_out, const at::Tensor& mean,
                   const at::Tensor& rstd, double eps) {
  const bool residual = y.has_value();
  TORCH_CHECK(gate.has_value() == residual && x_out.has_value() == residual,
              "openvid adaln_forward: y, gate and x_out must be given together (residual mode) or all be None");
  TORCH_CHECK(x.dim() == 3, msg("openvid adaln_forward: x must be 3-D [B, N, C], got sizes ", x.sizes()));
  TORCH_CHECK(shift.dim() == 3, msg("openvid adaln_forward: shift must be 3-D [B, G, C], got sizes ", shift.sizes()));
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), G = shift.size(1);
  check_c(C);
  TORCH_CHECK(G >= 1 && N % G == 0, msg("openvid adaln_forward: N (", N, ") must be a multiple of G (", G, ")"));
  TORCH_CHECK(eps >= 0.0, msg("openvid adaln_forward: eps must be >= 0, got ", eps));
  const at::Device device = x.device();
  const at::ScalarType dtype = x.scalar_type();
  to_openvid_dtype(dtype);  // rejects other dtypes
  check_rows(x, "x", device, dtype, B, N, C);
  check_rows(shift, "shift", device, dtype, B, G, C);
  check_rows(scale, "scale", device, dtype, B, G, C);
  check_rows(h, "h", device, dtype, B, N, C);
  check_stats(mean, "mean", device, B * N);
  check_stats(rstd, "rstd", device, B * N);
  if (residual) {
    check_rows(*y, "y", device, dtype, B, N, C);
    check_rows(*gate, "gate", device, dtype, B, G, C);
    check_rows(*x_out, "x_out", device, dtype, B, N, C);
  }
  if (B * N == 0) return;

  openvid::AdaLNForwardParams p;
  p.dtype = to_openvid_dtype(dtype);
  p.residual = residual;
  p.B = B;
  p.N = N;
  p.G = G;
  p.C = C;
  p.eps = static_cast<float>(eps);
  p.x = rows_of<const void*>(x);
  p.shift = rows_of<const void*>(shift);
  p.scale = rows_of<const void*>(scale);
  p.h = rows_of<void*>(h);
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  if (residual) {
    p.y = rows_of<const void*>(*y);
    p.gate = rows_of<const void*>(*gate);
    p.x_out = rows_of<void*>(*x_out);
  }
  const c10::cuda::CUDAGuard device_guard(device);
  raise_on_error(openvid::adaln_forward(p, at::cuda::getCurrentCUDAStream().stream()), "adaln_forward_kernel");
}

void adaln_backward(const at::Tensor& grad_h, const OptTensor& grad_x_out, const at::Tensor& x_ln,
                    const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& scale, const OptTensor& y,
                    const OptTensor& gate, const at::Tensor& grad_x, const OptTensor& grad_y,
                    const at::Tensor& partial_shift, const at::Tensor& partial_scale, const OptTensor& partial_gate) {
  const bool residual = y.has_value();
  TORCH_CHECK(gate.has_value() == residual && grad_y.has_value() == residual && partial_gate.has_value() == residual,
              "openvid adaln_backward: y, gate, grad_y and partial_gate must be given together (residual mode) or "
              "all be None");
  TORCH_CHECK(residual || !grad_x_out.has_value(), "openvid adaln_backward: grad_x_out is only for residual mode");
  TORCH_CHECK(grad_h.dim() == 3,
              msg("openvid adaln_backward: grad_h must be 3-D [B, N, C], got sizes ", grad_h.sizes()));
  TORCH_CHECK(scale.dim() == 3, msg("openvid adaln_backward: scale must be 3-D [B, G, C], got sizes ", scale.sizes()));
  TORCH_CHECK(partial_shift.dim() == 4,
              msg("openvid adaln_backward: partial_shift must be 4-D [B, G, K, C], got sizes ", partial_shift.sizes()));
  const int64_t B = grad_h.size(0), N = grad_h.size(1), C = grad_h.size(2), G = scale.size(1);
  const int64_t K = partial_shift.size(2);
  check_c(C);
  TORCH_CHECK(G >= 1 && N % G == 0, msg("openvid adaln_backward: N (", N, ") must be a multiple of G (", G, ")"));
  TORCH_CHECK(K >= 1, msg("openvid adaln_backward: partial_*.size(2) (K) must be >= 1, got ", K));
  TORCH_CHECK(N <= INT32_MAX, msg("openvid adaln_backward: N must fit in 32 bits, got ", N));
  const at::Device device = grad_h.device();
  const at::ScalarType dtype = grad_h.scalar_type();
  to_openvid_dtype(dtype);
  check_rows(grad_h, "grad_h", device, dtype, B, N, C);
  check_rows(x_ln, "x_ln", device, dtype, B, N, C);
  check_stats(mean, "mean", device, B * N);
  check_stats(rstd, "rstd", device, B * N);
  check_rows(scale, "scale", device, dtype, B, G, C);
  check_rows(grad_x, "grad_x", device, dtype, B, N, C);
  check_partial(partial_shift, "partial_shift", device, B, G, K, C);
  check_partial(partial_scale, "partial_scale", device, B, G, K, C);
  if (residual) {
    if (grad_x_out.has_value()) check_rows(*grad_x_out, "grad_x_out", device, dtype, B, N, C);
    check_rows(*y, "y", device, dtype, B, N, C);
    check_rows(*gate, "gate", device, dtype, B, G, C);
    check_rows(*grad_y, "grad_y", device, dtype, B, N, C);
    check_partial(*partial_gate, "partial_gate", device, B, G, K, C);
  }
  if (B * G * K == 0) return;  // no slot to write (B == 0)

  openvid::AdaLNBackwardParams p;
  p.dtype = to_openvid_dtype(dtype);
  p.residual = residual;
  p.B = B;
  p.N = N;
  p.G = G;
  p.C = C;
  p.K = K;
  p.grad_h = rows_of<const void*>(grad_h);
  p.x_ln = rows_of<const void*>(x_ln);
  p.mean = mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.scale = rows_of<const void*>(scale);
  p.grad_x = rows_of<void*>(grad_x);
  p.partial_shift = partial_shift.data_ptr<float>();
  p.partial_scale = partial_scale.data_ptr<float>();
  if (residual) {
    if (grad_x_out.has_value()) p.grad_x_out = rows_of<const void*>(*grad_x_out);
    p.y = rows_of<const void*>(*y);
    p.gate = rows_of<const void*>(*gate);
    p.grad_y = rows_of<void*>(*grad_y);
    p.partial_gate = partial_gate->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard device_guard(device);
  raise_on_error(openvid::adaln_backward(p, at::cuda::getCurrentCUDAStream().stream()), "adaln_backward_kernel");
}

// ---- temporal attention ---------------------------------------------------------------------------------

constexpr const char* kTA = "temporal_attention";

openvid::DType to_temporal_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return openvid::DType::kFloat16;
    case at::kBFloat16: return openvid::DType::kBFloat16;
    default:
      TORCH_CHECK(false, msg("openvid temporal_attention: unsupported dtype ", t, " (float16 and bfloat16 only)"));
  }
}

// A [B, T, S, H, D] tensor of the element dtype: shape, contiguous head dim, 16-byte aligned data, strides of
// dimensions with more than one index multiples of 8 elements (any other strides, e.g. views of a packed qkv).
void check_frames(const at::Tensor& t, const char* name, const at::Device& device, at::ScalarType dtype, int64_t B,
                  int64_t T, int64_t S, int64_t H, int64_t D) {
  check_device(t, name, device, kTA);
  TORCH_CHECK(t.scalar_type() == dtype,
              msg("openvid temporal_attention: ", name, " must have dtype ", dtype, ", got ", t.scalar_type()));
  TORCH_CHECK(t.dim() == 5 && t.size(0) == B && t.size(1) == T && t.size(2) == S && t.size(3) == H && t.size(4) == D,
              msg("openvid temporal_attention: ", name, " must have shape [B, T, S, H, D] = [", B, ", ", T, ", ", S,
                  ", ", H, ", ", D, "], got ", t.sizes()));
  if (t.numel() == 0) return;
  TORCH_CHECK(t.stride(4) == 1, msg("openvid temporal_attention: ", name,
                                    " must have a contiguous head dim (stride(4) == 1), got strides ", t.strides()));
  TORCH_CHECK(aligned16(t), msg("openvid temporal_attention: ", name, " data pointer must be 16-byte aligned"));
  for (int d = 0; d < 4; ++d) {
    TORCH_CHECK(
        t.size(d) <= 1 || t.stride(d) % 8 == 0,
        msg("openvid temporal_attention: ", name, " strides must be multiples of 8 elements, got ", t.strides()));
  }
}

// fp32 contiguous softmax statistics [B, S, H, T].
void check_lse(const at::Tensor& t, const at::Device& device, int64_t B, int64_t S, int64_t H, int64_t T) {
  check_device(t, "lse", device, kTA);
  TORCH_CHECK(t.scalar_type() == at::kFloat,
              msg("openvid temporal_attention: lse must be float32, got ", t.scalar_type()));
  TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == S && t.size(2) == H && t.size(3) == T && t.is_contiguous(),
              msg("openvid temporal_attention: lse must be a contiguous [B, S, H, T] = [", B, ", ", S, ", ", H, ", ", T,
                  "] tensor, got sizes ", t.sizes(), " strides ", t.strides()));
}

// Shape [B, T, S, H, D] of q; checks T and D against the kernels' limits and the scale.
std::array<int64_t, 5> temporal_shape(const at::Tensor& q, double softmax_scale) {
  TORCH_CHECK(q.dim() == 5, msg("openvid temporal_attention: q must be 5-D [B, T, S, H, D], got sizes ", q.sizes()));
  const int64_t T = q.size(1), D = q.size(4);
  TORCH_CHECK(
      T >= 1 && T <= openvid::kTemporalAttentionMaxT,
      msg("openvid temporal_attention: T (q.size(1)) must be in [1, ", openvid::kTemporalAttentionMaxT, "], got ", T));
  TORCH_CHECK(D >= 8 && D <= openvid::kTemporalAttentionMaxD && D % 8 == 0,
              msg("openvid temporal_attention: D (q.size(4)) must be a multiple of 8 in [8, ",
                  openvid::kTemporalAttentionMaxD, "], got ", D));
  TORCH_CHECK(std::isfinite(softmax_scale),
              msg("openvid temporal_attention: softmax_scale must be finite, got ", softmax_scale));
  return {q.size(0), T, q.size(2), q.size(3), D};
}

template <typename P>
openvid::Strided5D<P> frames_of(const at::Tensor& t) {
  return openvid::Strided5D<P>{static_cast<P>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

void temporal_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse, double softmax_scale) {
  const auto [B, T, S, H, D] = temporal_shape(q, softmax_scale);
  const at::Device device = q.device();
  const at::ScalarType dtype = q.scalar_type();
  const openvid::DType dt = to_temporal_dtype(dtype);
  check_frames(q, "q", device, dtype, B, T, S, H, D);
  check_frames(k, "k", device, dtype, B, T, S, H, D);
  check_frames(v, "v", device, dtype, B, T, S, H, D);
  check_frames(out, "out", device, dtype, B, T, S, H, D);
  check_lse(lse, device, B, S, H, T);
  if (B * S * H == 0) return;

  openvid::TemporalAttentionForwardParams p;
  p.dtype = dt;
  p.B = B;
  p.T = T;
  p.S = S;
  p.H = H;
  p.D = D;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.q = frames_of<const void*>(q);
  p.k = frames_of<const void*>(k);
  p.v = frames_of<const void*>(v);
  p.out = frames_of<void*>(out);
  p.lse = lse.data_ptr<float>();
  const c10::cuda::CUDAGuard device_guard(device);
  raise_on_error(openvid::temporal_attention_forward(p, at::cuda::getCurrentCUDAStream().stream()),
                 "temporal_attention_forward_kernel");
}

void temporal_attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                 double softmax_scale) {
  const auto [B, T, S, H, D] = temporal_shape(q, softmax_scale);
  const at::Device device = q.device();
  const at::ScalarType dtype = q.scalar_type();
  const openvid::DType dt = to_temporal_dtype(dtype);
  check_frames(dout, "dout", device, dtype, B, T, S, H, D);
  check_frames(q, "q", device, dtype, B, T, S, H, D);
  check_frames(k, "k", device, dtype, B, T, S, H, D);
  check_frames(v, "v", device, dtype, B, T, S, H, D);
  check_frames(out, "out", device, dtype, B, T, S, H, D);
  check_lse(lse, device, B, S, H, T);
  check_frames(dq, "dq", device, dtype, B, T, S, H, D);
  check_frames(dk, "dk", device, dtype, B, T, S, H, D);
  check_frames(dv, "dv", device, dtype, B, T, S, H, D);
  if (B * S * H == 0) return;

  openvid::TemporalAttentionBackwardParams p;
  p.dtype = dt;
  p.B = B;
  p.T = T;
  p.S = S;
  p.H = H;
  p.D = D;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.q = frames_of<const void*>(q);
  p.k = frames_of<const void*>(k);
  p.v = frames_of<const void*>(v);
  p.out = frames_of<const void*>(out);
  p.dout = frames_of<const void*>(dout);
  p.lse = lse.data_ptr<float>();
  p.dq = frames_of<void*>(dq);
  p.dk = frames_of<void*>(dk);
  p.dv = frames_of<void*>(dv);
  const c10::cuda::CUDAGuard device_guard(device);
  raise_on_error(openvid::temporal_attention_backward(p, at::cuda::getCurrentCUDAStream().stream()),
                 "temporal_attention_backward_kernel");
}

// ---- spatial attention ----------------------------------------------------------------------------------


// The problem with a tensor's device (a CUDA tensor on `device`), or an empty string.
std::string spatial_device_problem(const at::Tensor& t, const char* name, const at::Device& device) {
  if (t.is_cuda() && t.device() == device) return {};
  return std::string("openvid spatial_attention: ") + name + " must be a CUDA tensor on " + device.str() +
         " (the device of q), got one on " + t.device().str();
}

// A [B, S, H, D] tensor of the element dtype (`dims` spells the expected shape, e.g. "[B, Sk, H, D]"): shape,
// contiguous head dim, 16-byte aligned data, strides of dimensions with more than one index positive multiples
// of 8 elements (e.g. views of a packed [B, S, 3, H, D]). Returns an error message, or an empty string when the
// tensor is fine.
std::string spatial_tensor_problem(const at::Tensor& t, const char* name, const char* dims, const at::Device& device,
                                   at::ScalarType dtype, int64_t B, int64_t S, int64_t H, int64_t D) {
  std::string problem = spatial_device_problem(t, name, device);
  if (!problem.empty()) return problem;
  const std::string prefix = std::string("openvid spatial_attention: ") + name + " ";
  if (t.scalar_type() != dtype) {
    return prefix + "must have the dtype of q, " + c10::toString(dtype) + ", got " + c10::toString(t.scalar_type());
  }
  if (t.dim() != 4 || t.size(0) != B || t.size(1) != S || t.size(2) != H || t.size(3) != D) {
    return prefix + "must have shape " + dims + " = " + list_str({B, S, H, D}) + ", got " + list_str(t.sizes());
  }
  if (t.numel() == 0) return {};
  if (t.stride(3) != 1) {
    return prefix + "must have a contiguous head dim (stride(3) == 1), got strides " + list_str(t.strides());
  }
  if (!aligned16(t)) return prefix + "data pointer must be 16-byte aligned";
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && (t.stride(d) <= 0 || t.stride(d) % 8 != 0)) {
      return prefix + "strides must be positive multiples of 8 elements, got " + list_str(t.strides());
    }
  }
  return {};
}

template <typename P>
openvid::Strided4D<P> seq_of(const at::Tensor& t) {
  return openvid::Strided4D<P>{static_cast<P>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// text_lens: int32 [B], contiguous, on the device of q. Returns an error message, or an empty string.
std::string text_lens_problem(const at::Tensor& lens, const at::Device& device, int64_t B) {
  std::string problem = spatial_device_problem(lens, "text_lens", device);
  if (!problem.empty()) return problem;
  const std::string prefix = "openvid spatial_attention: text_lens ";
  if (lens.scalar_type() != at::kInt) return prefix + "must have dtype int32, got " + c10::toString(lens.scalar_type());
  if (lens.dim() != 1 || lens.size(0) != B) {
    return prefix + "must have shape [B] = " + list_str({B}) + ", got " + list_str(lens.sizes());
  }
  if (B > 1 && lens.stride(0) != 1) return prefix + "must be contiguous, got strides " + list_str(lens.strides());
  return {};
}

// lse: fp32 [B, H, Sq] with unit stride over the queries. Returns an error message, or an empty string.
std::string lse_problem(const at::Tensor& lse, const at::Device& device, int64_t B, int64_t H, int64_t Sq) {
  std::string problem = spatial_device_problem(lse, "lse", device);
  if (!problem.empty()) return problem;
  const std::string prefix = "openvid spatial_attention: lse ";
  if (lse.scalar_type() != at::kFloat) return prefix + "must be float32, got " + c10::toString(lse.scalar_type());
  if (lse.dim() != 3 || lse.size(0) != B || lse.size(1) != H || lse.size(2) != Sq) {
    return prefix + "must have shape [B, H, Sq] = " + list_str({B, H, Sq}) + ", got " + list_str(lse.sizes());
  }
  if (Sq > 1 && lse.stride(2) != 1) {
    return prefix + "must have unit stride over the queries (stride(2) == 1; e.g. lse_full[:, :, :Sq] of a "
           "[B, H, Sq + L] buffer), got strides " + list_str(lse.strides());
  }
  return {};
}

// Parameters for q, k, v, out and the optional text keys after the shape/layout checks (problems are returned,
// not thrown). q and out are [B, Sq, H, D], k and v [B, Sk, H, D] (Sk may differ from Sq, and may be 0), k_text
// and v_text [B, L, H, D] with text_lens int32 [B] (all three given or none).
std::string spatial_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                           double softmax_scale, const OptTensor& k_text, const OptTensor& v_text,
                           const OptTensor& text_lens, openvid::SpatialAttentionForwardParams& p) {
  const std::string op = "openvid spatial_attention: ";
  if (q.dim() != 4) return op + "q must be 4-D [B, Sq, H, D], got sizes " + list_str(q.sizes());
  if (k.dim() != 4) return op + "k must be 4-D [B, Sk, H, D], got sizes " + list_str(k.sizes());
  const int64_t B = q.size(0), Sq = q.size(1), H = q.size(2), D = q.size(3), Sk = k.size(1);
  if (D < 8 || D > openvid::kSpatialAttentionMaxD || D % 8 != 0) {
    return op + "D (q.size(3)) must be a multiple of 8 in [8, " + std::to_string(openvid::kSpatialAttentionMaxD) +
           "], got " + std::to_string(D);
  }
  if (!std::isfinite(softmax_scale) || softmax_scale < 0.0) {
    return op + "softmax_scale must be finite and >= 0, got " + std::to_string(softmax_scale);
  }
  const at::ScalarType dtype = q.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    return op + "unsupported dtype " + c10::toString(dtype) + " for q (float16 and bfloat16 only)";
  }
  const at::Device device = q.device();
  struct Expected {
    const at::Tensor* t;
    const char* name;
    const char* dims;
    int64_t rows;
  };
  const Expected tensors[] = {{&q, "q", "[B, Sq, H, D]", Sq},
                              {&k, "k", "[B, Sk, H, D]", Sk},
                              {&v, "v", "[B, Sk, H, D]", Sk},
                              {&out, "out", "[B, Sq, H, D]", Sq}};
  for (const Expected& e : tensors) {
    std::string problem = spatial_tensor_problem(*e.t, e.name, e.dims, device, dtype, B, e.rows, H, D);
    if (!problem.empty()) return problem;
  }
  const int given = k_text.has_value() + v_text.has_value() + text_lens.has_value();
  if (given != 0 && given != 3) {
    return op + "k_text, v_text and text_lens must be given together or not at all, got k_text " +
           (k_text ? "given" : "None") + ", v_text " + (v_text ? "given" : "None") + ", text_lens " +
           (text_lens ? "given" : "None");
  }
  int64_t L = 0;
  if (given == 3) {
    if (k_text->dim() != 4) return op + "k_text must be 4-D [B, L, H, D], got sizes " + list_str(k_text->sizes());
    L = k_text->size(1);
    const Expected text[] = {{&*k_text, "k_text", "[B, L, H, D]", L},
                             {&*v_text, "v_text", "[B, L, H, D]", L}};
    for (const Expected& e : text) {
      std::string problem = spatial_tensor_problem(*e.t, e.name, e.dims, device, dtype, B, e.rows, H, D);
      if (!problem.empty()) return problem;
    }
    std::string problem = text_lens_problem(*text_lens, device, B);
    if (!problem.empty()) return problem;
  }
  p.dtype = dtype == at::kHalf ? openvid::DType::kFloat16 : openvid::DType::kBFloat16;
  p.B = B;
  p.Sq = Sq;
  p.Sk = Sk;
  p.H = H;
  p.D = D;
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.q = seq_of<const void*>(q);
  p.k = seq_of<const void*>(k);
  p.v = seq_of<const void*>(v);
  p.out = seq_of<void*>(out);
  if (given == 3) {
    p.L = L;
    p.k_text = seq_of<const void*>(*k_text);
    p.v_text = seq_of<const void*>(*v_text);
    p.text_lens = text_lens->data_ptr<int32_t>();
  }
  return {};
}

void spatial_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               const at::Tensor& lse, double softmax_scale, const OptTensor& k_text,
                               const OptTensor& v_text, const OptTensor& text_lens) {
  openvid::SpatialAttentionForwardParams p;
  const std::string problem = spatial_params(q, k, v, out, softmax_scale, k_text, v_text, text_lens, p);
  TORCH_CHECK(problem.empty(), problem);
  const std::string lse_msg = lse_problem(lse, q.device(), p.B, p.H, p.Sq);
  TORCH_CHECK(lse_msg.empty(), lse_msg);
  if (p.B * p.Sq * p.H == 0) return;
  p.lse = lse.data_ptr<float>();
  p.lse_stride_b = lse.stride(0);
  p.lse_stride_h = lse.stride(1);
  const c10::cuda::CUDAGuard device_guard(q.device());
  TORCH_CHECK(openvid::spatial_attention_forward_supported(p),
              "openvid spatial_attention: this call is not supported by the CUDA kernel (needs an sm_90 GPU, a build "
              "with the 90a architecture and the CUTLASS headers, and tensor-map-compatible strides); check "
              "spatial_attention_forward_supported first");
  raise_on_error(openvid::spatial_attention_forward(p, at::cuda::getCurrentCUDAStream().stream()),
                 "spatial_attention_forward_kernel");
}

bool spatial_attention_forward_supported(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& out, double softmax_scale, const OptTensor& k_text,
                                         const OptTensor& v_text, const OptTensor& text_lens) {
  openvid::SpatialAttentionForwardParams p;
  if (!spatial_params(q, k, v, out, softmax_scale, k_text, v_text, text_lens, p).empty()) return false;
  if (p.B * p.Sq * p.H == 0) return true;
  const c10::cuda::CUDAGuard device_guard(q.device());
  return openvid::spatial_attention_forward_supported(p);
}

// [L, M, K] input, [N, K] weight, optional [N] bias, optional [L, N] gate, [L, M, N] residual and out ->
// params, or the first problem found (empty string: none).
std::string linear_params(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                          const OptTensor& gate, const at::Tensor& residual, const at::Tensor& out,
                          openvid::LinearGatedResidualParams& p) {
  const std::string op = "openvid linear_gated_residual: ";
  if (input.dim() != 3) return op + "input must be 3-D [L, M, K], got sizes " + list_str(input.sizes());
  if (weight.dim() != 2) return op + "weight must be 2-D [N, K], got sizes " + list_str(weight.sizes());
  const int64_t L = input.size(0), M = input.size(1), K = input.size(2), N = weight.size(0);
  const at::ScalarType dtype = input.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16) {
    return op + "unsupported dtype " + c10::toString(dtype) + " for input (float16 and bfloat16 only)";
  }
  struct Expected {
    const at::Tensor* t;
    const char* name;
    std::vector<int64_t> sizes;
  };
  std::vector<Expected> tensors = {{&input, "input", {L, M, K}},
                                   {&weight, "weight", {N, K}},
                                   {&residual, "residual", {L, M, N}},
                                   {&out, "out", {L, M, N}}};
  if (bias) tensors.push_back({&*bias, "bias", {N}});
  if (gate) tensors.push_back({&*gate, "gate", {L, N}});
  for (const Expected& e : tensors) {
    const at::Tensor& t = *e.t;
    if (!t.is_cuda() || t.device() != input.device()) {
      return op + e.name + " must be a CUDA tensor on " + input.device().str() + ", got one on " + t.device().str();
    }
    if (t.scalar_type() != dtype) {
      return op + e.name + " must have dtype " + c10::toString(dtype) + ", got " + c10::toString(t.scalar_type());
    }
    if (t.sizes() != c10::IntArrayRef(e.sizes)) {
      return op + e.name + " must have sizes " + list_str(e.sizes) + ", got " + list_str(t.sizes());
    }
    if (t.stride(-1) != 1) return op + e.name + " must have a contiguous last dimension";
  }
  if (weight.stride(0) != K) return op + "weight must be contiguous [N, K]";
  p.dtype = to_openvid_dtype(dtype);
  p.L = L, p.M = M, p.N = N, p.K = K;
  p.input = input.data_ptr(), p.input_stride_l = input.stride(0), p.input_stride_m = input.stride(1);
  p.weight = weight.data_ptr();
  p.bias = bias ? bias->data_ptr() : nullptr;
  p.gate = gate ? gate->data_ptr() : nullptr, p.gate_stride_l = gate ? gate->stride(0) : 0;
  p.residual = residual.data_ptr(), p.residual_stride_l = residual.stride(0);
  p.residual_stride_m = residual.stride(1);
  p.out = out.data_ptr(), p.out_stride_l = out.stride(0), p.out_stride_m = out.stride(1);
  return "";
}

void linear_gated_residual(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                           const OptTensor& gate, const at::Tensor& residual, const at::Tensor& out) {
  openvid::LinearGatedResidualParams p;
  const std::string problem = linear_params(input, weight, bias, gate, residual, out, p);
  TORCH_CHECK(problem.empty(), problem);
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard device_guard(input.device());
  const int device = input.get_device();
  TORCH_CHECK(openvid::linear_gated_residual_supported(p, device),
              "openvid linear_gated_residual: this call is not supported by the CUDA kernel (needs an sm_90 GPU, a "
              "build with the 90a architecture and the CUTLASS headers, N and K multiples of 8, 16-byte aligned "
              "data and strides that are multiples of 8 elements); check linear_gated_residual_supported first");
  at::Tensor workspace;
  const size_t workspace_bytes = openvid::linear_gated_residual_workspace_bytes(p, device);
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, input.options().dtype(at::kByte));
  }
  raise_on_error(openvid::linear_gated_residual(p, workspace_bytes > 0 ? workspace.data_ptr() : nullptr, device,
                                                at::cuda::getCurrentCUDAStream().stream()),
                 "linear_gated_residual_kernel");
}

bool linear_gated_residual_supported(const at::Tensor& input, const at::Tensor& weight, const OptTensor& bias,
                                     const OptTensor& gate, const at::Tensor& residual, const at::Tensor& out) {
  openvid::LinearGatedResidualParams p;
  if (!linear_params(input, weight, bias, gate, residual, out, p).empty()) return false;
  if (out.numel() == 0) return true;
  const c10::cuda::CUDAGuard device_guard(input.device());
  return openvid::linear_gated_residual_supported(p, input.get_device());
}

int64_t adaln_backward_blocks_per_sm(int64_t C, at::ScalarType dtype, bool residual) {
  check_c(C);
  const int blocks = openvid::adaln_backward_blocks_per_sm(to_openvid_dtype(dtype), C, residual);
  TORCH_CHECK(blocks > 0, "openvid: cudaOccupancyMaxActiveBlocksPerMultiprocessor failed for adaln_backward_kernel");
  return blocks;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "openvid-kernels CUDA extension: fused adaLN modulation and temporal attention over many short sequences "
      "(forward and backward)";
  m.def("adaln_forward", &adaln_forward,
        "adaln_forward(x, y, gate, shift, scale, h, x_out, mean, rstd, eps) -> None\n\n"
        "plain (y, gate, x_out None): h = LayerNorm(x) * (1 + scale) + shift;\n"
        "residual: x_out = x + gate * y (rounded once), h = LayerNorm(x_out) * (1 + scale) + shift.\n"
        "x, y, h, x_out: [B, N, C]; shift, scale, gate: [B, G, C]; mean, rstd: fp32 [B*N] (written).",
        pybind11::arg("x"), pybind11::arg("y"), pybind11::arg("gate"), pybind11::arg("shift"),
        pybind11::arg("scale"), pybind11::arg("h"), pybind11::arg("x_out"), pybind11::arg("mean"),
        pybind11::arg("rstd"), pybind11::arg("eps"));
  m.def("adaln_backward", &adaln_backward,
        "adaln_backward(grad_h, grad_x_out, x_ln, mean, rstd, scale, y, gate, grad_x, grad_y, partial_shift, "
        "partial_scale, partial_gate) -> None\n\n"
        "Writes grad_x (and grad_y in residual mode) and fp32 partial sums [B, G, K, C] of the shift, scale "
        "(and gate) gradients; sum them over dim 2.",
        pybind11::arg("grad_h"), pybind11::arg("grad_x_out"), pybind11::arg("x_ln"), pybind11::arg("mean"),
        pybind11::arg("rstd"), pybind11::arg("scale"), pybind11::arg("y"), pybind11::arg("gate"),
        pybind11::arg("grad_x"), pybind11::arg("grad_y"), pybind11::arg("partial_shift"),
        pybind11::arg("partial_scale"), pybind11::arg("partial_gate"));
  m.def("adaln_backward_blocks_per_sm", &adaln_backward_blocks_per_sm,
        "adaln_backward_blocks_per_sm(C, dtype, residual) -> int: backward blocks (one per partial slot) resident "
        "per multiprocessor of the current device, to choose K so that B*G*K fills the GPU",
        pybind11::arg("C"), pybind11::arg("dtype"), pybind11::arg("residual"));
  m.def("temporal_attention_forward", &temporal_attention_forward,
        "temporal_attention_forward(q, k, v, out, lse, softmax_scale) -> None\n\n"
        "Attention over T for every (b, s, h): out = softmax(softmax_scale * q k^T) v, lse = logsumexp of the "
        "scaled scores (natural log).\n"
        "q, k, v, out: fp16/bf16 [B, T, S, H, D] (any strides that are multiples of 8 elements, stride(4) == 1, "
        "e.g. views of a packed [B, T*S, 3, H, D] qkv); 1 <= T <= 128, D % 8 == 0, 8 <= D <= 128; "
        "lse: fp32 contiguous [B, S, H, T] (written).",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("lse"),
        pybind11::arg("softmax_scale"));
  m.def("temporal_attention_backward", &temporal_attention_backward,
        "temporal_attention_backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale) -> None\n\n"
        "Writes dq, dk, dv ([B, T, S, H, D], e.g. views of one packed gradient buffer; they must not overlap each "
        "other or any input) from the forward's out and lse.",
        pybind11::arg("dout"), pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"),
        pybind11::arg("lse"), pybind11::arg("dq"), pybind11::arg("dk"), pybind11::arg("dv"),
        pybind11::arg("softmax_scale"));
  m.def("spatial_attention_forward", &spatial_attention_forward,
        "spatial_attention_forward(q, k, v, out, lse, softmax_scale, k_text=None, v_text=None, text_lens=None) "
        "-> None\n\n"
        "Non-causal attention for every (b, h) (Hopper sm_90a kernel: wgmma, TMA, warp specialisation): "
        "out = softmax(softmax_scale * q keys^T) values, lse = logsumexp of the scaled scores (natural log). The "
        "keys of (b, h) are k[b, :, h] followed by the first text_lens[b] rows of k_text[b, :, h] (values: v, "
        "v_text); text rows at or past text_lens[b] are never read (lengths read on the device, clamped to "
        "[0, L]). A query row without keys gets out = 0, lse = -inf.\n"
        "q, out: fp16/bf16 [B, Sq, H, D]; k, v: [B, Sk, H, D] (Sk may differ from Sq, and may be 0); "
        "k_text, v_text: [B, L, H, D]; all with stride(3) == 1 and other strides positive multiples of 8 elements "
        "(e.g. views of a packed [B, S, 3, H, D] qkv); D % 8 == 0, 8 <= D <= 128; softmax_scale >= 0; "
        "text_lens: int32 [B] contiguous (k_text, v_text, text_lens all given or all None); "
        "lse: fp32 [B, H, Sq] with stride(2) == 1 (written; e.g. lse_full[:, :, :Sq]). "
        "Raises if spatial_attention_forward_supported is false.",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("lse"),
        pybind11::arg("softmax_scale"), pybind11::arg("k_text") = pybind11::none(),
        pybind11::arg("v_text") = pybind11::none(), pybind11::arg("text_lens") = pybind11::none());
  m.def("spatial_attention_forward_supported", &spatial_attention_forward_supported,
        "spatial_attention_forward_supported(q, k, v, out, softmax_scale=1.0, k_text=None, v_text=None, "
        "text_lens=None) -> bool\n\n"
        "True when spatial_attention_forward takes these tensors on their device (an sm_90 GPU with the 90a build, "
        "dtypes, shapes, strides and alignment as documented there; text_lens is not read); False means: use "
        "another backend.",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"),
        pybind11::arg("softmax_scale") = 1.0, pybind11::arg("k_text") = pybind11::none(),
        pybind11::arg("v_text") = pybind11::none(), pybind11::arg("text_lens") = pybind11::none());
  m.def("linear_gated_residual", &linear_gated_residual,
        "linear_gated_residual(input, weight, bias, gate, residual, out) -> None\n\n"
        "out = residual + gate * (input @ weight^T + bias) in one Hopper GEMM (CUTLASS, wgmma, TMA) whose epilogue "
        "reads the residual (fp32 accumulation and epilogue, rounded once).\n"
        "input: fp16/bf16 [L, M, K]; weight: [N, K] contiguous; bias: [N] or None; gate: [L, N] or None (1); "
        "residual, out: [L, M, N]; all of one dtype with contiguous last dimensions, strides multiples of 8 "
        "elements, N and K multiples of 8. Raises if linear_gated_residual_supported is false.",
        pybind11::arg("input"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("gate"),
        pybind11::arg("residual"), pybind11::arg("out"));
  m.def("linear_gated_residual_supported", &linear_gated_residual_supported,
        "linear_gated_residual_supported(input, weight, bias, gate, residual, out) -> bool\n\n"
        "True when linear_gated_residual takes these tensors on their device; False means: use another backend.",
        pybind11::arg("input"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("gate"),
        pybind11::arg("residual"), pybind11::arg("out"));
}
