// Small torch-free helpers shared by the openvid CUDA kernels.
//
// Host-visible part (usable from plain C++): the element-type enum.
// Device part (only under __CUDACC__): 16-byte vector load/store, conversion of a 16-byte vector to and from
// fp32, and sub-warp sum reductions.
//
// Everything here compiles with torch's default nvcc defines (__CUDA_NO_HALF_OPERATORS__,
// __CUDA_NO_HALF_CONVERSIONS__, __CUDA_NO_BFLOAT16_CONVERSIONS__, __CUDA_NO_HALF2_OPERATORS__): only explicit
// intrinsics and bit manipulation are used, never the implicit half/bfloat16 operators.
#pragma once

#include <cstdint>

namespace openvid {

// Element type of the [B, N, C] / [B, G, C] tensors. Statistics and partial sums are always fp32.
enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

inline int dtype_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace openvid

#ifdef __CUDACC__

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace openvid {
namespace detail {

// One 16-byte vector of elements of type T: 8 half/bfloat16 or 4 float.
template <typename T>
struct VecTraits {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "16-bit or 32-bit element types only");
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
};

// Streaming 16-byte load of data read once (non-coherent path, no L1 allocation). The data must not be
// written by the same kernel.
__device__ __forceinline__ uint4 ld_stream(const void* ptr) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(ptr));
  return r;
}

// Cached 16-byte load of read-only data that is reused across rows (modulation vectors): stays in L1.
__device__ __forceinline__ uint4 ld_cached(const void* ptr) { return __ldg(static_cast<const uint4*>(ptr)); }

// 16-byte store (st.global.wb.v4: the builtin keeps it one 128-bit store, where the compiler sometimes splits a
// plain uint4 assignment into four 32-bit stores).
__device__ __forceinline__ void st_vec(void* ptr, const uint4& v) { __stwb(static_cast<uint4*>(ptr), v); }

// ---- asynchronous global -> shared copies (cp.async, sm_80+) --------------------------------------------------
// A thread that waits for its own groups (cp_async_wait) may read what its own copies wrote without a barrier;
// other threads' copies need a __syncthreads() after their wait as well. The "memory" clobbers keep the compiler
// from moving shared-memory accesses across these statements.

// 16 bytes, cached in L2 only. Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}

// 4 bytes (cp.async only caches sizes below 16 in L1). Both addresses 4-byte aligned.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem) : "memory");
}

// Closes the group of this thread's copies issued since the previous commit (an empty group is fine).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void st_float4(float* ptr, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(ptr) = make_float4(a, b, c, d);
}

// ---- 16-byte vector <-> fp32 --------------------------------------------------------------------------------
// to_float: f[0..kElems) = elements of v in memory order. from_float: the inverse, round-to-nearest-even.

template <typename T>
struct Cvt;

template <>
struct Cvt<float> {
  static constexpr int kElems = 4;
  static __device__ __forceinline__ void to_float(const uint4& v, float (&f)[4]) {
    f[0] = __uint_as_float(v.x);
    f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z);
    f[3] = __uint_as_float(v.w);
  }
  static __device__ __forceinline__ uint4 from_float(const float (&f)[4]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
  }
};

template <>
struct Cvt<__nv_bfloat16> {
  static constexpr int kElems = 8;
  // bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits.
  static __device__ __forceinline__ void word_to_float(uint32_t w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  static __device__ __forceinline__ uint32_t float_to_word(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x = lo (low 16 bits), .y = hi
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void to_float(const uint4& v, float (&f)[8]) {
    word_to_float(v.x, f[0], f[1]);
    word_to_float(v.y, f[2], f[3]);
    word_to_float(v.z, f[4], f[5]);
    word_to_float(v.w, f[6], f[7]);
  }
  static __device__ __forceinline__ uint4 from_float(const float (&f)[8]) {
    return make_uint4(float_to_word(f[0], f[1]), float_to_word(f[2], f[3]), float_to_word(f[4], f[5]),
                      float_to_word(f[6], f[7]));
  }
};

template <>
struct Cvt<__half> {
  static constexpr int kElems = 8;
  static __device__ __forceinline__ void word_to_float(uint32_t w, float& lo, float& hi) {
    __half2 h = *reinterpret_cast<__half2*>(&w);
    float2 f = __half22float2(h);
    lo = f.x;
    hi = f.y;
  }
  static __device__ __forceinline__ uint32_t float_to_word(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);  // .x = lo (low 16 bits), .y = hi
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void to_float(const uint4& v, float (&f)[8]) {
    word_to_float(v.x, f[0], f[1]);
    word_to_float(v.y, f[2], f[3]);
    word_to_float(v.z, f[4], f[5]);
    word_to_float(v.w, f[6], f[7]);
  }
  static __device__ __forceinline__ uint4 from_float(const float (&f)[8]) {
    return make_uint4(float_to_word(f[0], f[1]), float_to_word(f[2], f[3]), float_to_word(f[4], f[5]),
                      float_to_word(f[6], f[7]));
  }
};

// ---- reductions ---------------------------------------------------------------------------------------------

// Sum over aligned groups of kWidth consecutive lanes (kWidth a power of two <= 32); every lane of the warp
// must call it (full-warp shuffle mask). Each lane gets its group's sum.
template <int kWidth>
__device__ __forceinline__ float group_sum(float v) {
  static_assert(kWidth >= 1 && kWidth <= 32 && (kWidth & (kWidth - 1)) == 0, "kWidth: power of two <= 32");
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace detail
}  // namespace openvid

#endif  // __CUDACC__
