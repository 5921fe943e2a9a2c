// Decode-time linear layer on the CPU: y = x W^T + b for a handful of rows
// (one token per sequence), W (out, in) fp32 in nn.Linear's layout.
//
// A decode step is a chain of GEMVs whose weights come from DRAM, so the
// only number that matters is read bandwidth. MKL's sgemm / sgemv take this
// shape single-threaded and, on AMD, through their generic ("def") GEMV code:
// about 10 GB/s here, where two cores stream 28 GB/s (torch.sum of 56 MB).
// This kernel splits the output rows across the threads and reads each
// weight row once for all the input rows, with 4 output rows in flight per
// thread for memory-level parallelism.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMKIT_GEMV_X86 1
#endif

#include "common/cpu_features.h"

namespace llmkit::linear {
namespace {

constexpr const char* kOp = "linear_gemv";
constexpr int64_t kMaxRows = 8;  // more rows than this is a GEMM: leave it to the BLAS

// y[r, o] for o in [o_begin, o_end): portable build.
void gemv_scalar(const float* w, int64_t in, const float* x, int64_t rows, const float* bias, float* y,
                 int64_t out, int64_t o_begin, int64_t o_end) {
  for (int64_t o = o_begin; o < o_end; ++o) {
    const float* wr = w + o * in;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * in;
      float acc = 0.f;
      for (int64_t i = 0; i < in; ++i) acc += wr[i] * xr[i];
      y[r * out + o] = acc + (bias ? bias[o] : 0.f);
    }
  }
}

#ifdef LLMKIT_GEMV_X86
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Four weight rows against one input row: four independent streams in flight.
__attribute__((target("avx2,fma"))) void dot4(const float* w0, int64_t in, const float* x, float* res) {
  const float* w1 = w0 + in;
  const float* w2 = w1 + in;
  const float* w3 = w2 + in;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + i), xv, a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + i), xv, a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + i), xv, a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + i), xv, a3);
  }
  float t0 = hsum(a0), t1 = hsum(a1), t2 = hsum(a2), t3 = hsum(a3);
  for (; i < in; ++i) {
    t0 += w0[i] * x[i];
    t1 += w1[i] * x[i];
    t2 += w2[i] * x[i];
    t3 += w3[i] * x[i];
  }
  res[0] = t0, res[1] = t1, res[2] = t2, res[3] = t3;
}

__attribute__((target("avx2,fma"))) void gemv_avx2(const float* w, int64_t in, const float* x, int64_t rows,
                                                  const float* bias, float* y, int64_t out, int64_t o_begin,
                                                  int64_t o_end) {
  int64_t o = o_begin;
  float res[4];
  for (; o + 4 <= o_end; o += 4) {
    // The four weight rows (4 * in floats) stay in L1 while every input row passes.
    for (int64_t r = 0; r < rows; ++r) {
      dot4(w + o * in, in, x + r * in, res);
      for (int64_t j = 0; j < 4; ++j) y[r * out + o + j] = res[j] + (bias ? bias[o + j] : 0.f);
    }
  }
  if (o < o_end) gemv_scalar(w, in, x, rows, bias, y, out, o, o_end);
}
#endif

at::Tensor linear_gemv_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, kOp,
                   ": x and weight must be float32, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.is_contiguous(), kOp,
                    ": weight must be a contiguous (out_features, in_features) matrix, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(weight.device() == x.device(), kOp, ": weight is on ", weight.device(), " but x is on ",
                    x.device());
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == in, kOp, ": x must end in in_features = ", in, ", got shape ",
                    x.sizes());
  // The rows are the leading dimensions (not numel / in: in_features may be 0).
  const int64_t rows = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  TORCH_CHECK_VALUE(rows <= kMaxRows, kOp, ": at most ", kMaxRows, " rows (a decode step), got ", rows,
                    "; use torch.nn.functional.linear for more");
  const float* b = nullptr;
  at::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out && bias->scalar_type() == at::kFloat, kOp,
                      ": bias must be float32 (", out, "), got ", bias->sizes(), " ", bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), kOp, ": bias is on ", bias->device(), " but x is on ",
                      x.device());
    bias_c = bias->contiguous();
    b = bias_c.data_ptr<float>();
  }
  const at::Tensor xc = x.contiguous();
  auto out_shape = x.sizes().vec();
  out_shape.back() = out;
  at::Tensor y = at::empty(out_shape, x.options());
  if (rows == 0 || out == 0) return y;
  if (in == 0) return b != nullptr ? y.copy_(bias_c.expand_as(y)) : y.zero_();  // an empty sum: F.linear's 0 + bias
  const float* w = weight.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const bool avx2 = use_avx2_fma();
  // Chunks of >= 64 KiB of weights: enough to amortise a task, many for the threads.
  const int64_t grain = std::max<int64_t>(4, ((64 << 10) / (4 * std::max<int64_t>(in, 1))) & ~int64_t{3});
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) {
#ifdef LLMKIT_GEMV_X86
    if (avx2) return gemv_avx2(w, in, xp, rows, b, yp, out, begin, end);
#endif
    gemv_scalar(w, in, xp, rows, b, yp, out, begin, end);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkit, CPU, m) { m.impl("linear_gemv", &linear_gemv_cpu); }

}  // namespace llmkit::linear
