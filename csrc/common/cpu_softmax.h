// Softmax row primitives shared by the CPU kernels (flash attention, the
// fused cross-entropy): exp(x - shift) in place with its sum, and the row
// max, each as an AVX2 + FMA build (chosen at run time, cpu_features.h) and a
// portable one.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#ifndef LLMKIT_X86
#define LLMKIT_X86 1
#endif
#endif

#include "common/cpu_features.h"

namespace llmkit::softmax {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// P[j] = exp(S[j] - shift) in place, returning the sum. exp underflows to 0
// below -87.3, so masked scores (-inf) give exactly 0; a NaN score or shift
// gives a NaN P[j] and so a NaN sum (as std::exp and torch's softmax do).

inline float exp_shift_sum_scalar(float* s, int64_t n, float shift) {
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float e = std::exp(s[j] - shift);
    s[j] = e;
    sum += e;
  }
  return sum;
}

// The max of the non-NaN elements (-inf if there is none). Callers learn of
// a NaN from exp_shift_sum, whose sum it makes NaN: tracking NaNs here
// would cost the attention rows ~40% of this loop (measured), for a case
// the sums already reveal.
inline float row_max_scalar(const float* s, int64_t n) {
  float m = kNegInf;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// Whether any of s[0 .. n) is NaN: for the rare rows whose max is +-inf,
// where the sum cannot tell a NaN from inf - inf.
inline bool any_nan(const float* s, int64_t n) {
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) nan |= s[j] != s[j];
  return nan;
}

#ifdef LLMKIT_X86
#define LLMKIT_AVX2 __attribute__((target("avx2,fma")))
#define LLMKIT_INLINE inline __attribute__((always_inline))

// exp for 8 floats as 2^t, t = x log2(e): 2^round(t) goes straight into
// the exponent bits, 2^f (|f| <= 1/2) is a degree-6 polynomial; ~2 ulp for
// the scores that matter (|x| small), and 16 instructions. t < -125 -> 0,
// so masked scores (-inf) give exactly 0. NaN stays NaN: max/min return
// their SECOND operand when one is NaN, so t goes second in the clamp (the
// other order would turn NaN into 2^-125 and a NaN score into a weight ~0).
LLMKIT_AVX2 LLMKIT_INLINE __m256 exp8(__m256 x) {
  __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 underflow = _mm256_cmp_ps(t, _mm256_set1_ps(-125.f), _CMP_LT_OQ);
  t = _mm256_min_ps(_mm256_set1_ps(127.f), _mm256_max_ps(_mm256_set1_ps(-125.f), t));
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.54035303933816e-4f);  // ln2^k / k!, k = 6 .. 0
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.33335581464284e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.61812910762848e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.55041086648216e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.40226506959101e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.93147180559945e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i scaled = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
  return _mm256_andnot_ps(underflow, _mm256_castsi256_ps(scaled));
}

LLMKIT_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LLMKIT_AVX2 inline float exp_shift_sum_avx2(float* s, int64_t n, float shift) {
  const __m256 vshift = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vshift));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum8(acc);
  if (j < n) {  // the tail through the same exp, for identical rounding
    alignas(32) float tail[8];
    for (int64_t t = 0; t < 8; ++t) tail[t] = j + t < n ? s[j + t] - shift : kNegInf;
    _mm256_store_ps(tail, exp8(_mm256_load_ps(tail)));
    for (int64_t t = 0; j + t < n; ++t) {
      s[j + t] = tail[t];
      sum += tail[t];
    }
  }
  return sum;
}

// As row_max_scalar: the max of the non-NaN elements.
LLMKIT_AVX2 inline float row_max_avx2(const float* s, int64_t n) {
  __m256 m = _mm256_set1_ps(kNegInf);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(_mm256_loadu_ps(s + j), m);  // m second: a NaN x is skipped
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  float r = kNegInf;
  for (float x : lanes) r = std::max(r, x);
  for (; j < n; ++j) r = std::max(r, s[j]);
  return r;
}
#endif

struct Simd {
  bool avx2 = false;
  Simd() {
#ifdef LLMKIT_X86
    avx2 = use_avx2_fma();
#endif
  }
  float exp_shift_sum(float* s, int64_t n, float shift) const {
#ifdef LLMKIT_X86
    if (avx2) return exp_shift_sum_avx2(s, n, shift);
#endif
    return exp_shift_sum_scalar(s, n, shift);
  }
  float row_max(const float* s, int64_t n) const {
#ifdef LLMKIT_X86
    if (avx2) return row_max_avx2(s, n);
#endif
    return row_max_scalar(s, n);
  }
};

}  // namespace llmkit::softmax
