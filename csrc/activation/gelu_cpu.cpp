// GELU, tanh approximation (GPT-2's "gelu_new"), forward and backward, fp32:
//   y = x/2 (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
//   dy/dx = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),  t = tanh(u)
// ATen's CPU gelu(approximate="tanh") spends ~8 ms on a 2048 x 1536 MLP
// activation on 2 cores, 10x a copy of it: its vectorised tanh is slow.
// Here tanh(u) = 1 - 2 / (1 + exp(2u)) with the flash kernel's exp8 (~2 ulp,
// saturating: exp -> 0 gives -1, exp -> 2^127 gives 1). Other dtypes and
// devices use ATen's kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common/cpu_softmax.h"

namespace llmkit::activation {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

inline void gelu_scalar(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    y[i] = 0.5f * v * (1.f + std::tanh(kSqrt2OverPi * (v + kCubic * v * v * v)));
  }
}

// du/dx grows as x^2, which overflows float32 past |x| ~ 1.8e19 and would make
// 0 (the saturated 1 - t^2) times inf = NaN where the derivative is 1 or 0.
// Beyond |x| = 100, 1 - t^2 is exactly 0 in float32, so du is computed from x
// clamped there: the same value below, the right 0 term above (inf and NaN
// inputs still give NaN through the other factors, as the reference does).
constexpr float kDuClamp = 100.f;

inline void gelu_backward_scalar(const float* g, const float* x, float* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const float t = std::tanh(kSqrt2OverPi * (v + kCubic * v * v * v));
    const float vc = std::min(std::max(v, -kDuClamp), kDuClamp);
    const float du = kSqrt2OverPi * (1.f + 3.f * kCubic * vc * vc);
    dx[i] = g[i] * (0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * du);
  }
}

#ifdef LLMKIT_X86
LLMKIT_AVX2 inline __m256 tanh8(__m256 u) {
  const __m256 e = softmax::exp8(_mm256_add_ps(u, u));
  return _mm256_sub_ps(_mm256_set1_ps(1.f), _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(_mm256_set1_ps(1.f), e)));
}

LLMKIT_AVX2 inline __m256 inner8(__m256 v) {  // sqrt(2/pi) (v + 0.044715 v^3)
  const __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
  return _mm256_mul_ps(_mm256_set1_ps(kSqrt2OverPi), _mm256_fmadd_ps(_mm256_set1_ps(kCubic), v3, v));
}

LLMKIT_AVX2 void gelu_avx2(const float* x, float* y, int64_t n) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 t = tanh8(inner8(v));
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(half, v), _mm256_add_ps(one, t)));
  }
  gelu_scalar(x + i, y + i, n - i);
}

LLMKIT_AVX2 void gelu_backward_avx2(const float* g, const float* x, float* dx, int64_t n) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.f);
  const __m256 c = _mm256_set1_ps(kSqrt2OverPi), c3 = _mm256_set1_ps(3.f * kCubic * kSqrt2OverPi);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 t = tanh8(inner8(v));
    const __m256 vc = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-kDuClamp)), _mm256_set1_ps(kDuClamp));
    const __m256 du = _mm256_fmadd_ps(c3, _mm256_mul_ps(vc, vc), c);  // sqrt(2/pi) (1 + 3 * 0.044715 v^2)
    const __m256 sech2 = _mm256_fnmadd_ps(t, t, one);                // 1 - t^2
    const __m256 d = _mm256_fmadd_ps(_mm256_mul_ps(half, v), _mm256_mul_ps(sech2, du),
                                     _mm256_mul_ps(half, _mm256_add_ps(one, t)));
    _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_loadu_ps(g + i), d));
  }
  gelu_backward_scalar(g + i, x + i, dx + i, n - i);
}
#endif

constexpr int64_t kGrain = 1 << 14;

at::Tensor gelu_tanh_cpu(const at::Tensor& x) {
  if (x.scalar_type() != at::kFloat) return at::gelu(x, "tanh");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const softmax::Simd simd;
  at::parallel_for(0, xc.numel(), kGrain, [&](int64_t begin, int64_t end) {
#ifdef LLMKIT_X86
    if (simd.avx2) return gelu_avx2(xp + begin, yp + begin, end - begin);
#endif
    gelu_scalar(xp + begin, yp + begin, end - begin);
  });
  return y;
}

at::Tensor gelu_tanh_backward_cpu(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "gelu_tanh_backward: grad ", grad.sizes(), " and x ", x.sizes(),
                    " must have one shape");
  if (x.scalar_type() != at::kFloat || grad.scalar_type() != at::kFloat) return at::gelu_backward(grad, x, "tanh");
  const at::Tensor xc = x.contiguous(), gc = grad.contiguous();
  at::Tensor dx = at::empty_like(xc);
  const float* xp = xc.data_ptr<float>();
  const float* gp = gc.data_ptr<float>();
  float* dp = dx.data_ptr<float>();
  const softmax::Simd simd;
  at::parallel_for(0, xc.numel(), kGrain, [&](int64_t begin, int64_t end) {
#ifdef LLMKIT_X86
    if (simd.avx2) return gelu_backward_avx2(gp + begin, xp + begin, dp + begin, end - begin);
#endif
    gelu_backward_scalar(gp + begin, xp + begin, dp + begin, end - begin);
  });
  return dx;
}

#ifdef LLMKIT_WITH_CUDA
// CUDA: ATen's own kernels (already bandwidth-bound there).
at::Tensor gelu_tanh_cuda(const at::Tensor& x) { return at::gelu(x, "tanh"); }
at::Tensor gelu_tanh_backward_cuda(const at::Tensor& grad, const at::Tensor& x) {
  return at::gelu_backward(grad, x, "tanh");
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(llmkit, CPU, m) {
  m.impl("gelu_tanh", &gelu_tanh_cpu);
  m.impl("gelu_tanh_backward", &gelu_tanh_backward_cpu);
}

#ifdef LLMKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(llmkit, CUDA, m) {
  m.impl("gelu_tanh", &gelu_tanh_cuda);
  m.impl("gelu_tanh_backward", &gelu_tanh_backward_cuda);
}
#endif

}  // namespace llmkit::activation
