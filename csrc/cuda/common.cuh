// Shared by the CUDA kernels: the dtype tag of the plain C++ interfaces and, when compiled
// by nvcc, the fp32 <-> element conversions. Host-only code (bindings.cpp, through the
// kernels' headers) sees just the enum, so it needs no CUDA headers.
#pragma once

namespace cex {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace cuda
}  // namespace cex

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace cex {
namespace cuda {

// Elements are loaded into fp32 for all arithmetic and stored back rounded to nearest even.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

}  // namespace cuda
}  // namespace cex
#endif  // __CUDACC__
