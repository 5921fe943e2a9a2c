// CUDA kernel of lora_dropout (lora.h): out = x * keep / (1 - p), the mask a
// pure function of (seed, flat index), so the backward regenerates it.
//
// lora_dropout_kernel: grid-stride over groups of 8 consecutive elements of
// the contiguous input; a full group whose input and output are 16-byte
// aligned moves with 16-byte loads/stores (two for float32), the tail and
// unaligned buffers element by element. Per element: keep from
// dropout_keep(seed, flat index, threshold), then float(x) * scale rounded to
// the dtype, or float(x) * 0 when dropped (0, or NaN for a NaN / inf x, as
// torch's dropout): the CPU kernel's float operations in its order.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/dispatch.h"
#include "common/cuda_convert.cuh"
#include "lora/lora.h"

namespace llmkit::lora {
namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 8;  // elements per thread step: 16 bytes of fp16/bf16

using llmkit::Convert;  // common/cuda_convert.cuh

template <typename T>
__device__ __forceinline__ typename Convert<T>::Device dropout_one(typename Convert<T>::Device v, uint64_t seed,
                                                                   uint64_t index, uint32_t threshold, float scale) {
  using C = Convert<T>;
  // x * (keep ? scale : 0), as the CPU kernel: a dropped NaN / inf stays NaN.
  return C::from_float(__fmul_rn(C::to_float(v), dropout_keep(seed, index, threshold) ? scale : 0.0f));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_dropout_kernel(const T* __restrict__ x, int64_t n, uint64_t seed, uint32_t threshold, float scale,
                        bool vector_ok, T* __restrict__ out) {
  using D = typename Convert<T>::Device;
  // 16-byte chunks per group: one for fp16/bf16, two for float32.
  constexpr int kChunks = kGroup * static_cast<int>(sizeof(D)) / 16;
  const D* xd = reinterpret_cast<const D*>(x);
  D* od = reinterpret_cast<D*>(out);
  const int64_t groups = (n + kGroup - 1) / kGroup;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e0 = g * kGroup;
    if (vector_ok && e0 + kGroup <= n) {
      uint4 in[kChunks];
#pragma unroll
      for (int c = 0; c < kChunks; ++c) in[c] = reinterpret_cast<const uint4*>(xd + e0)[c];
      uint4 res[kChunks];
      const D* vals = reinterpret_cast<const D*>(in);
      D* outs = reinterpret_cast<D*>(res);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        outs[j] = dropout_one<T>(vals[j], seed, static_cast<uint64_t>(e0 + j), threshold, scale);
      }
#pragma unroll
      for (int c = 0; c < kChunks; ++c) reinterpret_cast<uint4*>(od + e0)[c] = res[c];
    } else {
      const int64_t end = e0 + kGroup < n ? e0 + kGroup : n;
      for (int64_t e = e0; e < end; ++e) {
        od[e] = dropout_one<T>(xd[e], seed, static_cast<uint64_t>(e), threshold, scale);
      }
    }
  }
}

at::Tensor lora_dropout_cuda(const at::Tensor& x_, double p, int64_t seed) {
  const auto dt = x_.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "lora_dropout: x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "lora_dropout: dropout p must be in [0, 1), got ", p);
  TORCH_CHECK_VALUE(x_.is_cuda(), "lora_dropout: expected a CUDA tensor, got ", x_.device());
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  if (p == 0.0) return x.clone();
  at::Tensor out = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return out;
  const uint32_t threshold = dropout_threshold(p);
  const float scale = 1.0f / (1.0f - static_cast<float>(p));  // host float math, as the CPU kernel
  const bool vector_ok = reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  const int64_t groups = (n + kGroup - 1) / kGroup;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const auto ctas = static_cast<unsigned>(std::clamp<int64_t>((groups + kThreads - 1) / kThreads, 1, sms * 16));
  auto stream = at::cuda::getCurrentCUDAStream();
  LLMKIT_DISPATCH_FLOAT_HALF_BF16(dt, "lora_dropout_cuda", [&] {
    lora_dropout_kernel<scalar_t><<<ctas, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), n,
                                                                 static_cast<uint64_t>(seed), threshold, scale,
                                                                 vector_ok, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkit, CUDA, m) { m.impl("lora_dropout", &lora_dropout_cuda); }

}  // namespace llmkit::lora
