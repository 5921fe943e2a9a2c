// CUDA kernels of the quant family, on the current stream. Same float32
// operations in the same order as the CPU kernels (nf4.h); the build passes
// --fmad=false so code * scale + offset is never fused into one rounding.
//
// quantize_nf4:   one warp per quantization block (max-reduce with shuffles,
//                 then each lane writes whole bytes).
// dequantize_nf4: one thread per 4 packed bytes = 8 outputs, one 16/32-byte
//                 store; the block scale (double-quantized or not) is computed
//                 in registers, so absmax is never materialised.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "common/dispatch.h"
#include "common/cuda_convert.cuh"
#include "quant/nf4.h"

namespace llmkit::quant {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerCta = kThreads / 32;

using llmkit::Convert;  // common/cuda_convert.cuh

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, s));
  return v;
}

__device__ __forceinline__ unsigned warp_max_bits(unsigned v) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, s));
  return v;
}

__constant__ float kDeviceNF4Codes[16] = {
    kNF4Codes[0], kNF4Codes[1], kNF4Codes[2],  kNF4Codes[3],  kNF4Codes[4],  kNF4Codes[5],
    kNF4Codes[6], kNF4Codes[7], kNF4Codes[8],  kNF4Codes[9],  kNF4Codes[10], kNF4Codes[11],
    kNF4Codes[12], kNF4Codes[13], kNF4Codes[14], kNF4Codes[15]};

template <typename T>
__global__ void quantize_nf4_kernel(const T* __restrict__ x, int64_t n, int blocksize, int64_t blocks,
                                    uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  using C = Convert<T>;
  const auto* xd = reinterpret_cast<const typename C::Device*>(x);
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (b >= blocks) return;
  const int64_t start = b * blocksize;
  const int len = static_cast<int>(min(static_cast<int64_t>(blocksize), n - start));
  const bool full_block = len == blocksize;

  // max |x| on the bit patterns, NaN-propagating (see abs_bits in nf4_cpu.cpp):
  // fmaxf would drop a NaN, where bitsandbytes' absmax is NaN.
  unsigned amax_bits = 0;
  for (int i = lane; i < len; i += 32) amax_bits = max(amax_bits, __float_as_uint(fabsf(C::to_float(xd[start + i]))));
  amax_bits = warp_max_bits(amax_bits);
  const float amax = __uint_as_float(amax_bits);
  const float clamped = clamp_absmax(amax);
  const float inv = __fdiv_rn(1.0f, clamped);
  if (lane == 0) absmax[b] = full_block ? amax : clamped;

  auto code = [&](int i) -> uint8_t {
    const float v = C::to_float(xd[start + i]);
    return nf4_code_of_scaled(full_block ? __fmul_rn(v, inv) : __fdiv_rn(v, clamped));
  };
  const int pairs = (len + 1) / 2;
  for (int p = lane; p < pairs; p += 32) {
    const int i = 2 * p;
    const uint8_t second = i + 1 < len ? code(i + 1) : static_cast<uint8_t>(kNF4PadCode);
    packed[start / 2 + p] = static_cast<uint8_t>((code(i) << 4) | second);
  }
}

template <typename T>
__global__ void dequantize_nf4_kernel(const uint8_t* __restrict__ packed, int64_t n, int blocksize,
                                      const float* __restrict__ absmax, const uint8_t* __restrict__ absmax_q,
                                      const float* __restrict__ absmax2, const float* __restrict__ code2,
                                      const float* __restrict__ offset, int nested_blocksize, bool packed_aligned,
                                      bool out_aligned, T* __restrict__ out) {
  using C = Convert<T>;
  using D = typename C::Device;
  D* od = reinterpret_cast<D*>(out);
  const int64_t groups = (n + 7) / 8;  // 8 outputs (4 bytes) per thread; never spans two blocks
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e0 = 8 * g;
    const int64_t b = e0 / blocksize;
    float scale;
    if (absmax_q == nullptr) {
      scale = absmax[b];
    } else {
      scale = __fadd_rn(__fmul_rn(code2[absmax_q[b]], absmax2[b / nested_blocksize]), offset[0]);
    }
    const int count = static_cast<int>(min(static_cast<int64_t>(8), n - e0));
    uint8_t bytes[4];
    if (count == 8 && packed_aligned) {
      const uint32_t word = reinterpret_cast<const uint32_t*>(packed)[g];
#pragma unroll
      for (int k = 0; k < 4; ++k) bytes[k] = static_cast<uint8_t>(word >> (8 * k));
    } else {
      for (int k = 0; k < 4; ++k) bytes[k] = 2 * k < count ? packed[4 * g + k] : 0;
    }
    D vals[8];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      vals[2 * k] = C::from_float(__fmul_rn(kDeviceNF4Codes[bytes[k] >> 4], scale));
      vals[2 * k + 1] = C::from_float(__fmul_rn(kDeviceNF4Codes[bytes[k] & 15], scale));
    }
    if (count == 8 && out_aligned) {  // e0 is a multiple of 8: aligned when the base is 16-byte aligned
      if constexpr (sizeof(D) == 4) {
        reinterpret_cast<float4*>(od + e0)[0] = *reinterpret_cast<float4*>(vals);
        reinterpret_cast<float4*>(od + e0)[1] = *reinterpret_cast<float4*>(vals + 4);
      } else {
        reinterpret_cast<uint4*>(od + e0)[0] = *reinterpret_cast<uint4*>(vals);
      }
    } else {
      for (int k = 0; k < count; ++k) od[e0 + k] = vals[k];
    }
  }
}

// Same grid-point rounding as the CPU table (nf4.h), with the table entry for
// grid point j found by a binary search over the code midpoints in shared memory.
__global__ void quantize_blockwise_8bit_kernel(const float* __restrict__ x, int64_t n, int blocksize,
                                               int64_t blocks, const float* __restrict__ code,
                                               uint8_t* __restrict__ q, float* __restrict__ absmax) {
  __shared__ float mids[255];
  for (int i = threadIdx.x; i < 255; i += blockDim.x) mids[i] = __fmul_rn(0.5f, __fadd_rn(code[i], code[i + 1]));
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
  if (b >= blocks) return;
  const int64_t start = b * blocksize;
  const int len = static_cast<int>(min(static_cast<int64_t>(blocksize), n - start));
  float m = 0.0f;
  for (int i = lane; i < len; i += 32) m = fmaxf(m, fabsf(x[start + i]));
  m = warp_max(m);
  if (lane == 0) absmax[b] = m;
  const float inv = __fdiv_rn(1.0f, m);
  for (int i = lane; i < len; i += 32) {
    if (m == 0.0f) {  // bitsandbytes writes code 0 for an all-zero block
      q[start + i] = 0;
      continue;
    }
    const float g = code_lut_grid(code_lut_index(__fmul_rn(x[start + i], inv)));
    int lo = 0, hi = 255;  // number of midpoints below g
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (mids[mid] < g) lo = mid + 1; else hi = mid;
    }
    q[start + i] = static_cast<uint8_t>(lo);
  }
}

unsigned grid_for(int64_t items, int64_t per_cta) {
  return static_cast<unsigned>(std::max<int64_t>(1, ceil_div(items, per_cta)));
}

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& input_, int64_t blocksize) {
  check_quantize_nf4_args(input_, blocksize);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const int64_t n = input.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, input.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  LLMKIT_DISPATCH_FLOAT_HALF_BF16(input.scalar_type(), "quantize_nf4_cuda", [&] {
    quantize_nf4_kernel<scalar_t><<<grid_for(blocks, kWarpsPerCta), kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), n, static_cast<int>(blocksize), blocks, packed.data_ptr<uint8_t>(),
        absmax.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {packed, absmax};
}

void dequantize_nf4_cuda_into(const at::Tensor& packed_, const at::Tensor& absmax_, int64_t blocksize,
                                    c10::SymIntArrayRef shape_, at::ScalarType dtype,
                                    const std::optional<at::Tensor>& nested_absmax,
                                    const std::optional<at::Tensor>& nested_code,
                                    const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                                    at::Tensor& out) {
  const auto shape = C10_AS_INTARRAYREF_SLOW(shape_);
  const int64_t n = check_dequantize_nf4_args(packed_, absmax_, blocksize, shape, dtype, nested_absmax, nested_code, offset,
                            nested_blocksize);
  const c10::cuda::CUDAGuard guard(packed_.device());
  check_dequantize_out(out, shape, dtype, packed_, absmax_, nested_absmax, nested_code, offset);
  const at::Tensor packed = packed_.contiguous();
  const at::Tensor absmax = absmax_.contiguous();
  at::Tensor absmax2, code2, off;
  const bool nested = nested_absmax.has_value();
  if (nested) {
    absmax2 = nested_absmax->contiguous();
    code2 = nested_code->contiguous();
    off = offset->contiguous();
  }
  const uint8_t* in = packed.const_data_ptr<uint8_t>();
  const bool aligned = reinterpret_cast<uintptr_t>(in) % 4 == 0;
  const int64_t groups = ceil_div(n, 8);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(grid_for(groups, kThreads), 65535 * 8));
  auto stream = at::cuda::getCurrentCUDAStream();
  LLMKIT_DISPATCH_FLOAT_HALF_BF16(dtype, "dequantize_nf4_cuda", [&] {
    dequantize_nf4_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        in, n, static_cast<int>(blocksize), nested ? nullptr : absmax.const_data_ptr<float>(),
        nested ? absmax.const_data_ptr<uint8_t>() : nullptr, nested ? absmax2.const_data_ptr<float>() : nullptr,
        nested ? code2.const_data_ptr<float>() : nullptr, nested ? off.const_data_ptr<float>() : nullptr,
        static_cast<int>(nested_blocksize), aligned, reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dequantize_nf4_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               c10::SymIntArrayRef shape, at::ScalarType dtype,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                               int64_t nested_blocksize) {
  check_dequantize_nf4_args(packed, absmax, blocksize, C10_AS_INTARRAYREF_SLOW(shape), dtype, nested_absmax,
                            nested_code, offset, nested_blocksize);  // before allocating
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(shape), packed.options().dtype(dtype));
  dequantize_nf4_cuda_into(packed, absmax, blocksize, shape, dtype, nested_absmax, nested_code, offset,
                                 nested_blocksize, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cuda(const at::Tensor& input_, const at::Tensor& code_,
                                                                int64_t blocksize) {
  check_quantize_8bit_args(input_, code_, blocksize);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  const at::Tensor code = code_.contiguous();
  const int64_t n = input.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor q = at::empty(input.sizes(), input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, input.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  quantize_blockwise_8bit_kernel<<<grid_for(blocks, kWarpsPerCta), kThreads, 0, stream>>>(
      input.const_data_ptr<float>(), n, static_cast<int>(blocksize), blocks, code.const_data_ptr<float>(),
      q.data_ptr<uint8_t>(), absmax.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, absmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkit, CUDA, m) {
  m.impl("quantize_nf4", &quantize_nf4_cuda);
  m.impl("dequantize_nf4", &dequantize_nf4_cuda);
  m.impl("dequantize_nf4_into", &dequantize_nf4_cuda_into);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cuda);
}

}  // namespace llmkit::quant
