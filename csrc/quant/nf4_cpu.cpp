// CPU kernels of the quant family: NF4 quantize / dequantize (with double
// quant) and 8-bit blockwise quantize. Threads: at::parallel_for over blocks
// (a block is never split, so threads never share an output byte). SIMD: an
// AVX2 path chosen at run time, and a portable scalar path that computes the
// same float32 operations in the same order (results are bit-identical).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/dispatch.h"
#include "quant/nf4.h"
#include "common/cpu_memory.h"
#include "quant/nf4_cpu_simd.h"

namespace llmkit::quant {
namespace {

constexpr int64_t kMaxBlock = 4096;
// Elements a thread takes at once: enough to amortise scheduling.
constexpr int64_t kGrainElements = 1 << 15;

int64_t grain_blocks(int64_t blocksize) { return std::max<int64_t>(1, kGrainElements / blocksize); }


// ------------------------------------------------------------- scalar path --

LLMKIT_INLINE uint8_t pack_pair(uint8_t first, uint8_t second) { return static_cast<uint8_t>((first << 4) | second); }

// Codes of x[from .. len) (from even), scaled as the format says (see nf4.h).
LLMKIT_INLINE void quantize_pairs_scalar(const float* x, int64_t from, int64_t len, float clamped, bool full_block, uint8_t* out) {
  const float inv = 1.0f / clamped;
  auto code = [&](float v) { return nf4_code_of_scaled(full_block ? v * inv : v / clamped); };
  int64_t i = from;
  for (; i + 1 < len; i += 2) out[i / 2] = pack_pair(code(x[i]), code(x[i + 1]));
  if (i < len) out[i / 2] = pack_pair(code(x[i]), kNF4PadCode);
}

// |x| as its bit pattern: for non-negative floats the unsigned integer order
// is the float order, with +inf above every finite value and every NaN above
// +inf. A max of these is therefore max |x| that comes out NaN when any x is
// NaN (torch.amax, which bitsandbytes' quantize_4bit takes), where a float
// max would drop the NaN; and it vectorises (vpmaxud / vpmaxsd).
LLMKIT_INLINE uint32_t abs_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits & 0x7FFFFFFFu;
}

LLMKIT_INLINE float float_of_bits(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

// Quantize `len` floats of one block (already converted to float32) into
// out[0 .. ceil(len/2)); returns the absmax to store.
LLMKIT_INLINE float quantize_block_scalar(const float* x, int64_t len, bool full_block, uint8_t* out) {
  uint32_t amax_bits = 0;
  for (int64_t i = 0; i < len; ++i) amax_bits = std::max(amax_bits, abs_bits(x[i]));
  const float amax = float_of_bits(amax_bits);
  const float clamped = clamp_absmax(amax);
  quantize_pairs_scalar(x, 0, len, clamped, full_block, out);
  return full_block ? amax : clamped;
}


// --------------------------------------------------------------- AVX2 path --
#ifdef LLMKIT_X86

// nf4_code_of_scaled, 8 lanes: 15 minus the midpoints at or above the value
// (an ordered compare is false for NaN, which so gets 15). No clamp: min/max
// would turn NaN into -1 or 1, and the midpoints lie inside (-1, 1) anyway.
LLMKIT_AVX2 LLMKIT_INLINE __m256i nf4_codes_avx2(__m256 scaled) {
  __m256i code = _mm256_set1_epi32(15);
  for (int k = 0; k < 15; ++k) {  // a true compare is -1
    const __m256 le = _mm256_cmp_ps(scaled, _mm256_set1_ps(nf4_midpoint(k)), _CMP_LE_OQ);
    code = _mm256_add_epi32(code, _mm256_castps_si256(le));
  }
  return code;
}

// 16 codes (two vectors of 8 int32) -> 8 bytes, first of each pair high.
LLMKIT_AVX2 LLMKIT_INLINE void store_packed16_avx2(__m256i a, __m256i b, uint8_t* out) {
  // In each 64-bit lane (first, second): (first << 4) | second lands in the low 32 bits.
  const __m256i pa = _mm256_or_si256(_mm256_slli_epi64(a, 4), _mm256_srli_epi64(a, 32));
  const __m256i pb = _mm256_or_si256(_mm256_slli_epi64(b, 4), _mm256_srli_epi64(b, 32));
  const __m256i even = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m128i la = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(pa, even));
  const __m128i lb = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(pb, even));
  const __m128i mask = _mm_set1_epi32(0xFF);
  const __m128i w16 = _mm_packus_epi32(_mm_and_si128(la, mask), _mm_and_si128(lb, mask));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packus_epi16(w16, w16));
}

LLMKIT_AVX2 LLMKIT_INLINE float quantize_block_avx2(const float* x, int64_t len, bool full_block, uint8_t* out) {
  // max |x| on the bit patterns (abs_bits): NaN-propagating, as the scalar path.
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
  __m256i vmax = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256i bits = _mm256_and_si256(_mm256_castps_si256(_mm256_loadu_ps(x + i)), magnitude);
    vmax = _mm256_max_epu32(vmax, bits);
  }
  alignas(32) uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), vmax);
  uint32_t amax_bits = 0;
  for (uint32_t v : lanes) amax_bits = std::max(amax_bits, v);
  for (; i < len; ++i) amax_bits = std::max(amax_bits, abs_bits(x[i]));
  const float amax = float_of_bits(amax_bits);

  const float clamped = clamp_absmax(amax);
  const __m256 vinv = _mm256_set1_ps(1.0f / clamped);
  const __m256 vdiv = _mm256_set1_ps(clamped);
  i = 0;
  for (; i + 16 <= len; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    const __m256 s0 = full_block ? _mm256_mul_ps(x0, vinv) : _mm256_div_ps(x0, vdiv);
    const __m256 s1 = full_block ? _mm256_mul_ps(x1, vinv) : _mm256_div_ps(x1, vdiv);
    store_packed16_avx2(nf4_codes_avx2(s0), nf4_codes_avx2(s1), out + i / 2);
  }
  quantize_pairs_scalar(x, i, len, clamped, full_block, out);
  return full_block ? amax : clamped;
}
#endif  // LLMKIT_X86



// Block loops, one per ISA, so the ISA switch happens once per thread chunk.
template <typename T>
void quantize_range_scalar(const T* x, int64_t n, int64_t blocksize, int64_t b0, int64_t b1, uint8_t* out,
                           float* amax) {
  alignas(64) float buffer[kMaxBlock];  // fp16/bf16 blocks are widened here first
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
    const float* xs = buffer;
    if constexpr (std::is_same_v<T, float>) {
      xs = x + start;
    } else {
      for (int64_t i = 0; i < len; ++i) buffer[i] = static_cast<float>(x[start + i]);
    }
    amax[b] = quantize_block_scalar(xs, len, len == blocksize, out + start / 2);
  }
}

template <typename T>
void dequantize_range_scalar(const uint8_t* in, int64_t n, int64_t blocksize, int64_t b0, int64_t b1,
                             const BlockScales& scales, T* out) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    dequantize_bytes_scalar(in + start / 2, std::min(blocksize, n - start), scales(b), out + start);
  }
}

#ifdef LLMKIT_X86
template <typename T>
LLMKIT_AVX2 void quantize_range_avx2(const T* x, int64_t n, int64_t blocksize, int64_t b0, int64_t b1, uint8_t* out,
                                     float* amax) {
  alignas(64) float buffer[kMaxBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize, len = std::min(blocksize, n - start);
    const float* xs = buffer;
    if constexpr (std::is_same_v<T, float>) {
      xs = x + start;
    } else {
      to_float_avx2(x + start, len, buffer);
    }
    amax[b] = quantize_block_avx2(xs, len, len == blocksize, out + start / 2);
  }
}

template <typename T>
LLMKIT_AVX2 void dequantize_range_avx2(const uint8_t* in, int64_t n, int64_t blocksize, int64_t b0, int64_t b1,
                                       const BlockScales& scales, T* out) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t start = b * blocksize;
    dequantize_bytes_avx2(in + start / 2, std::min(blocksize, n - start), scales(b), out + start);
  }
}
#endif


// ------------------------------------------------------------------- ops --

std::tuple<at::Tensor, at::Tensor> quantize_nf4_cpu(const at::Tensor& input_, int64_t blocksize) {
  check_quantize_nf4_args(input_, blocksize);
  const at::Tensor input = input_.contiguous();
  const int64_t n = input.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, input.options().dtype(at::kFloat));
  uint8_t* out = packed.data_ptr<uint8_t>();
  float* amax = absmax.data_ptr<float>();
  const bool simd = use_simd();

  LLMKIT_DISPATCH_FLOAT_HALF_BF16(input.scalar_type(), "quantize_nf4_cpu", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
#ifdef LLMKIT_X86
      if (simd) return quantize_range_avx2(x, n, blocksize, b0, b1, out, amax);
#endif
      quantize_range_scalar(x, n, blocksize, b0, b1, out, amax);
    });
  });
  return {packed, absmax};
}

void dequantize_nf4_cpu_into(const at::Tensor& packed_, const at::Tensor& absmax_, int64_t blocksize,
                                   c10::SymIntArrayRef shape_, at::ScalarType dtype,
                                   const std::optional<at::Tensor>& nested_absmax,
                                   const std::optional<at::Tensor>& nested_code,
                                   const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                                   at::Tensor& out) {
  const auto shape = C10_AS_INTARRAYREF_SLOW(shape_);
  const int64_t n = check_dequantize_nf4_args(packed_, absmax_, blocksize, shape, dtype, nested_absmax, nested_code, offset,
                            nested_blocksize);
  check_dequantize_out(out, shape, dtype, packed_, absmax_, nested_absmax, nested_code, offset);
  const at::Tensor packed = packed_.contiguous();
  const at::Tensor absmax = absmax_.contiguous();
  const int64_t blocks = absmax.numel();
  const uint8_t* in = packed.const_data_ptr<uint8_t>();
  const bool simd = use_simd();

  BlockScales scales;
  at::Tensor absmax2, code2;
  if (nested_absmax.has_value()) {
    absmax2 = nested_absmax->contiguous();
    code2 = nested_code->contiguous();
    scales.q = absmax.const_data_ptr<uint8_t>();
    scales.absmax2 = absmax2.const_data_ptr<float>();
    scales.code2 = code2.const_data_ptr<float>();
    scales.offset = offset->item<float>();
    scales.nested_blocksize = nested_blocksize;
  } else {
    scales.absmax = absmax.const_data_ptr<float>();
  }

  LLMKIT_DISPATCH_FLOAT_HALF_BF16(dtype, "dequantize_nf4_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
#ifdef LLMKIT_X86
      if (simd) return dequantize_range_avx2(in, n, blocksize, b0, b1, scales, o);
#endif
      dequantize_range_scalar(in, n, blocksize, b0, b1, scales, o);
    });
  });
}

// A fresh output of tens of MiB costs more in first-touch page faults (4 KiB
// each, zeroed by the kernel) than the dequantization itself. Large outputs
// are therefore 2 MiB-aligned and advised as transparent huge pages (what
// torch does under THP_MEM_ALLOC_ENABLE=1): 512x fewer faults.
at::Tensor empty_large_output(at::IntArrayRef shape, at::TensorOptions options) {
  return empty_huge_page_backed(shape, options, int64_t{16} << 20);
}

at::Tensor dequantize_nf4_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                              c10::SymIntArrayRef shape, at::ScalarType dtype,
                              const std::optional<at::Tensor>& nested_absmax,
                              const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                              int64_t nested_blocksize) {
  check_dequantize_nf4_args(packed, absmax, blocksize, C10_AS_INTARRAYREF_SLOW(shape), dtype, nested_absmax,
                            nested_code, offset, nested_blocksize);  // before allocating
  at::Tensor out = empty_large_output(C10_AS_INTARRAYREF_SLOW(shape), packed.options().dtype(dtype));
  dequantize_nf4_cpu_into(packed, absmax, blocksize, shape, dtype, nested_absmax, nested_code, offset,
                                nested_blocksize, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_8bit_cpu(const at::Tensor& input_, const at::Tensor& code_,
                                                               int64_t blocksize) {
  check_quantize_8bit_args(input_, code_, blocksize);
  const at::Tensor input = input_.contiguous();
  const at::Tensor code = code_.contiguous();
  const int64_t n = input.numel();
  const int64_t blocks = ceil_div(n, blocksize);
  at::Tensor q = at::empty(input.sizes(), input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, input.options());
  const float* x = input.const_data_ptr<float>();
  uint8_t* out = q.data_ptr<uint8_t>();
  float* amax = absmax.data_ptr<float>();
  uint8_t lut[kCodeLutSize];
  build_code_lut(code.const_data_ptr<float>(), lut);
  at::parallel_for(0, blocks, grain_blocks(blocksize), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * blocksize, end = std::min(n, start + blocksize);
      float m = 0.0f;
      for (int64_t i = start; i < end; ++i) m = std::max(m, std::fabs(x[i]));
      amax[b] = m;
      if (m == 0.0f) {  // bitsandbytes writes code 0 for an all-zero block
        std::memset(out + start, 0, end - start);
        continue;
      }
      const float inv = 1.0f / m;
      for (int64_t i = start; i < end; ++i) out[i] = lut[code_lut_index(x[i] * inv)];
    }
  });
  return {q, absmax};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkit, CPU, m) {
  m.impl("quantize_nf4", &quantize_nf4_cpu);
  m.impl("dequantize_nf4", &dequantize_nf4_cpu);
  m.impl("dequantize_nf4_into", &dequantize_nf4_cpu_into);
  m.impl("quantize_blockwise_8bit", &quantize_blockwise_8bit_cpu);
}

}  // namespace llmkit::quant
