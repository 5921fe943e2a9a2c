// CPU building blocks of the NF4 kernels (quantize / dequantize in
// nf4_cpu.cpp, the fused matmul in nf4_linear_cpu.cpp): NF4 decoding, scalar
// and AVX2, and the per-block scale (plain or double-quantized absmax).
// Header-only and force-inlined: these run per 16 elements, and a call from
// AVX2 code into baseline-ISA code per block costs more than the block.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMKIT_X86 1
#endif

#include "quant/nf4.h"

#define LLMKIT_INLINE inline __attribute__((always_inline))

namespace llmkit::quant {

// ------------------------------------------------------------- scalar path --

template <typename T>
LLMKIT_INLINE void dequantize_bytes_scalar(const uint8_t* in, int64_t len, float scale, T* out) {
  int64_t i = 0;
  for (; i + 1 < len; i += 2) {
    const uint8_t byte = in[i / 2];
    out[i] = static_cast<T>(kNF4Codes[byte >> 4] * scale);
    out[i + 1] = static_cast<T>(kNF4Codes[byte & 15] * scale);
  }
  if (i < len) out[i] = static_cast<T>(kNF4Codes[in[i / 2] >> 4] * scale);
}

// --------------------------------------------------------------- AVX2 path --
#ifdef LLMKIT_X86
#define LLMKIT_AVX2 __attribute__((target("avx2,f16c")))

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}

// 16-entry table lookup: permutevar uses the low 3 bits, a blend picks the half by bit 3.
LLMKIT_AVX2 LLMKIT_INLINE __m256 nf4_lookup_avx2(__m256 lut_lo, __m256 lut_hi, __m256i idx) {
  const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 -> sign bit
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx), _mm256_permutevar8x32_ps(lut_hi, idx), upper);
}

// 8 packed bytes -> 16 scaled floats in element order.
LLMKIT_AVX2 LLMKIT_INLINE void dequant8_avx2(const uint8_t* in, __m256 scale, __m256& out0, __m256& out1) {
  const __m256 lut_lo = _mm256_loadu_ps(kNF4Codes);
  const __m256 lut_hi = _mm256_loadu_ps(kNF4Codes + 8);
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in)));
  const __m256i hi = _mm256_srli_epi32(bytes, 4);
  const __m256i lo = _mm256_and_si256(bytes, _mm256_set1_epi32(15));
  const __m256 vh = _mm256_mul_ps(nf4_lookup_avx2(lut_lo, lut_hi, hi), scale);
  const __m256 vl = _mm256_mul_ps(nf4_lookup_avx2(lut_lo, lut_hi, lo), scale);
  const __m256 a = _mm256_unpacklo_ps(vh, vl);  // h0 l0 h1 l1 | h4 l4 h5 l5
  const __m256 b = _mm256_unpackhi_ps(vh, vl);  // h2 l2 h3 l3 | h6 l6 h7 l7
  out0 = _mm256_permute2f128_ps(a, b, 0x20);
  out1 = _mm256_permute2f128_ps(a, b, 0x31);
}

// Round to nearest even, as c10::BFloat16 does (the scalar path): the
// integer rounding is right for finite values and +-inf, and a NaN becomes
// c10's 0x7FC0 (rounding its bits could carry a NaN into an infinity or -0).
LLMKIT_AVX2 LLMKIT_INLINE __m128i to_bf16_avx2(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);  // per-lane: 0..3 4..7 twice
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

template <typename T>
LLMKIT_AVX2 LLMKIT_INLINE void dequantize_bytes_avx2(const uint8_t* in, int64_t len, float scale, T* out) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) {
    __m256 o0, o1;
    dequant8_avx2(in + i / 2, vscale, o0, o1);
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(out + i, o0);
      _mm256_storeu_ps(out + i + 8, o1);
    } else if constexpr (std::is_same_v<T, at::Half>) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(o0, _MM_FROUND_TO_NEAREST_INT));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 8), _mm256_cvtps_ph(o1, _MM_FROUND_TO_NEAREST_INT));
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), to_bf16_avx2(o0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 8), to_bf16_avx2(o1));
    }
  }
  if (i < len) dequantize_bytes_scalar(in + i / 2, len - i, scale, out + i);
}

// fp16 / bf16 -> float32, 8 at a time.
LLMKIT_AVX2 LLMKIT_INLINE void to_float_avx2(const at::Half* in, int64_t len, float* out) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  for (; i < len; ++i) out[i] = static_cast<float>(in[i]);
}
LLMKIT_AVX2 LLMKIT_INLINE void to_float_avx2(const at::BFloat16* in, int64_t len, float* out) {
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i)));
    _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; i < len; ++i) out[i] = static_cast<float>(in[i]);
}
#else
inline bool cpu_has_avx2() { return false; }
#endif  // LLMKIT_X86

// Per-block absmax, plain or double-quantized (code2[q] * absmax2 + offset as
// two float32 roundings, the order of bitsandbytes' dequantize_blockwise then `+= offset`).
struct BlockScales {
  const float* absmax = nullptr;  // plain
  const uint8_t* q = nullptr;     // double quant
  const float* absmax2 = nullptr;
  const float* code2 = nullptr;
  float offset = 0.0f;
  int64_t nested_blocksize = 256;

  LLMKIT_INLINE float operator()(int64_t b) const {
    if (absmax != nullptr) return absmax[b];
    const float decoded = code2[q[b]] * absmax2[b / nested_blocksize];
    return decoded + offset;
  }
};

// Whether to take the SIMD path; LLMKIT_FORCE_SCALAR=1 makes tests cover the scalar one.
inline bool use_simd() {
  static const bool scalar = [] {
    const char* env = std::getenv("LLMKIT_FORCE_SCALAR");
    return env != nullptr && env[0] == '1';
  }();
  return !scalar && cpu_has_avx2();
}

}  // namespace llmkit::quant
