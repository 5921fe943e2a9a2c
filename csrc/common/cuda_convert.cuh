// Device-side conversions between torch's element types and float, for the
// CUDA kernels (torch's Half/BFloat16 operators are compiled out in nvcc here:
// -D__CUDA_NO_HALF_OPERATORS__ and friends). Convert<T>::Device is the CUDA
// type with T's bits.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace llmkit {

template <typename T> struct Convert;
template <> struct Convert<float> {
  using Device = float;
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};
template <> struct Convert<at::Half> {
  using Device = __half;
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Convert<at::BFloat16> {
  using Device = __nv_bfloat16;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

}  // namespace llmkit
