// Fused LoRA: y = base(x) + s * dropout(x) A^T B^T over a dense or an NF4
// frozen base, and its hand-derived backward. The heavy products are GEMMs
// (BLAS / cuBLAS through ATen, the NF4 base through nf4_linear); what makes it
// fast is what is NOT done, compared with composing nn.Linear modules:
//   * the LoRA product is accumulated into the base output by the GEMM itself
//     (addmm_ with beta = 1, alpha = s): no separate scale and add passes;
//   * the backward saves only x and the dropout seed: dropout(x) and x A^T are
//     recomputed (O(M K r) of work, r << N), no mask or activation is kept;
//   * dx = dy W + s (dy B) A is one accumulating GEMM pair into one buffer.
//   * no gradient is ever formed for the frozen base weight.
// The same composite code serves CPU and CUDA; the dropout mask is the only
// elementwise kernel (lora_dropout: CPU here, CUDA in lora_cuda.cu).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_features.h"
#include "common/dispatch.h"
#include "lora/lora.h"

namespace llmkit::lora {
namespace {

void check_dropout_p(double p, const char* op) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, op, ": dropout p must be in [0, 1), got ", p);
}

// ------------------------------------------------------ dropout (CPU) --

// One range of elements; the hash is plain uint32 arithmetic, so the same
// source compiled for AVX2 vectorises 8 lanes wide and gives identical bits.
template <typename T>
inline __attribute__((always_inline)) void dropout_range(const T* in, T* out, int64_t i0, int64_t i1, uint64_t seed,
                                                         uint32_t threshold, float scale) {
  for (int64_t run = i0; run < i1;) {  // runs where the index's high 32 bits are constant
    const int64_t run_end = std::min<int64_t>(i1, ((run >> 32) + 1) << 32);
    const uint32_t high = dropout_high_term(seed, static_cast<uint64_t>(run));
    const uint32_t seed_low = static_cast<uint32_t>(seed);
    const uint32_t first = static_cast<uint32_t>(run);
    const int64_t len = run_end - run;
    const T* src = in + run;
    T* dst = out + run;
    for (int64_t j = 0; j < len; ++j) {
      // x * (keep ? 1/(1-p) : 0), a product as torch's dropout and the
      // reference: a dropped NaN / inf stays NaN (0 * NaN), not 0.
      const bool keep = dropout_mix(first + static_cast<uint32_t>(j), seed_low, high) >= threshold;
      dst[j] = static_cast<T>(static_cast<float>(src[j]) * (keep ? scale : 0.0f));
    }
    run = run_end;
  }
}

template <typename T>
void dropout_range_portable(const T* in, T* out, int64_t i0, int64_t i1, uint64_t seed, uint32_t threshold,
                            float scale) {
  dropout_range(in, out, i0, i1, seed, threshold, scale);
}

#if defined(__x86_64__)
// fp32, 8 lanes: the same uint32 hash as dropout_mix, bit for bit.
__attribute__((target("avx2"))) void dropout_range_avx2(const float* in, float* out, int64_t i0, int64_t i1,
                                                        uint64_t seed, uint32_t threshold, float scale) {
  for (int64_t run = i0; run < i1;) {
    const int64_t run_end = std::min<int64_t>(i1, ((run >> 32) + 1) << 32);
    const uint32_t first = static_cast<uint32_t>(run);
    const __m256i high = _mm256_set1_epi32(static_cast<int>(dropout_high_term(seed, static_cast<uint64_t>(run))));
    const __m256i seed_low = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed)));
    // bits are 24-bit, so a signed compare against threshold - 1 is bits >= threshold
    const __m256i below = _mm256_set1_epi32(static_cast<int>(threshold) - 1);
    const __m256 vscale = _mm256_set1_ps(scale);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int64_t len = run_end - run;
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
      __m256i z = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first + static_cast<uint32_t>(j))), lanes);
      z = _mm256_add_epi32(_mm256_mullo_epi32(z, _mm256_set1_epi32(static_cast<int>(0x9E3779B1u))), seed_low);
      z = _mm256_xor_si256(z, high);
      z = _mm256_xor_si256(z, _mm256_srli_epi32(z, 16));
      z = _mm256_mullo_epi32(z, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
      z = _mm256_xor_si256(z, _mm256_srli_epi32(z, 13));
      z = _mm256_mullo_epi32(z, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
      z = _mm256_xor_si256(z, _mm256_srli_epi32(z, 16));
      const __m256i keep = _mm256_cmpgt_epi32(_mm256_srli_epi32(z, 8), below);
      const __m256 factor = _mm256_and_ps(vscale, _mm256_castsi256_ps(keep));  // 1/(1-p) or 0
      _mm256_storeu_ps(out + run + j, _mm256_mul_ps(_mm256_loadu_ps(in + run + j), factor));
    }
    dropout_range(in, out, run + j, run_end, seed, threshold, scale);
    run = run_end;
  }
}
#endif

// fp16/bf16 take the portable loop; fp32 the AVX2 one when the CPU has it.
template <typename T>
void dropout_range_dispatch(const T* in, T* out, int64_t i0, int64_t i1, uint64_t seed, uint32_t threshold,
                            float scale, bool /*avx2*/) {
  dropout_range_portable(in, out, i0, i1, seed, threshold, scale);
}

void dropout_range_dispatch(const float* in, float* out, int64_t i0, int64_t i1, uint64_t seed, uint32_t threshold,
                            float scale, bool avx2) {
#if defined(__x86_64__)
  if (avx2) return dropout_range_avx2(in, out, i0, i1, seed, threshold, scale);
#endif
  dropout_range_portable(in, out, i0, i1, seed, threshold, scale);
}

at::Tensor lora_dropout_cpu(const at::Tensor& x_, double p, int64_t seed) {
  const auto dt = x_.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "lora_dropout: x must be float32, float16 or bfloat16, got ", dt);
  check_dropout_p(p, "lora_dropout");
  const at::Tensor x = x_.contiguous();
  if (p == 0.0) return x.clone();
  at::Tensor out = at::empty_like(x);
  const uint32_t threshold = dropout_threshold(p);
  const float scale = 1.0f / (1.0f - static_cast<float>(p));
  const uint64_t s = static_cast<uint64_t>(seed);
#if defined(__x86_64__)
  // LLMKIT_FORCE_SCALAR=1 takes the portable build of the same loop (tests compare them).
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") && !force_scalar();
#else
  constexpr bool avx2 = false;
#endif
  LLMKIT_DISPATCH_FLOAT_HALF_BF16(dt, "lora_dropout_cpu", [&] {
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, x.numel(), 1 << 15, [&](int64_t i0, int64_t i1) {
      dropout_range_dispatch(in, o, i0, i1, s, threshold, scale, avx2);
    });
  });
  return out;
}

// ------------------------------------------------------------ helpers --

// Our own ops, called through the dispatcher so each device gets its kernel.
at::Tensor call_lora_dropout(const at::Tensor& x, double p, int64_t seed) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("llmkit::lora_dropout", "")
                             .typed<at::Tensor(const at::Tensor&, double, int64_t)>();
  return op.call(x, p, seed);
}

using OptT = std::optional<at::Tensor>;

at::Tensor call_nf4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                           c10::SymIntArrayRef shape, const OptT& nested_absmax, const OptT& nested_code,
                           const OptT& offset, int64_t nested_blocksize, const OptT& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("llmkit::nf4_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                               c10::SymIntArrayRef, const OptT&, const OptT&, const OptT&, int64_t,
                                               const OptT&)>();
  return op.call(x, packed, absmax, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize, bias);
}

at::Tensor call_nf4_linear_grad_input(const at::Tensor& dy, const at::Tensor& packed, const at::Tensor& absmax,
                                      int64_t blocksize, c10::SymIntArrayRef shape, const OptT& nested_absmax,
                                      const OptT& nested_code, const OptT& offset, int64_t nested_blocksize) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("llmkit::nf4_linear_grad_input", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                               c10::SymIntArrayRef, const OptT&, const OptT&, const OptT&,
                                               int64_t)>();
  return op.call(dy, packed, absmax, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize);
}

// The frozen base: a dense weight or an NF4 one (exactly one is given).
struct Base {
  const OptT& weight;
  const OptT& packed;
  const OptT& absmax;
  int64_t blocksize;
  c10::SymIntArrayRef shape;
  const OptT& nested_absmax;
  const OptT& nested_code;
  const OptT& offset;
  int64_t nested_blocksize;

  bool dense() const { return weight.has_value(); }
  int64_t out_features() const { return dense() ? weight->size(0) : shape[0].expect_int(); }
  int64_t in_features() const { return dense() ? weight->size(1) : shape[1].expect_int(); }

  at::Tensor forward(const at::Tensor& x2, const OptT& bias) const {
    if (dense()) return bias.has_value() ? at::addmm(*bias, x2, weight->t()) : at::mm(x2, weight->t());
    return call_nf4_linear(x2, *packed, *absmax, blocksize, shape, nested_absmax, nested_code, offset,
                           nested_blocksize, bias);
  }
  at::Tensor grad_input(const at::Tensor& dy2) const {
    if (dense()) return at::mm(dy2, *weight);
    return call_nf4_linear_grad_input(dy2, *packed, *absmax, blocksize, shape, nested_absmax, nested_code, offset,
                                      nested_blocksize);
  }
};

void check_lora_args(const char* op, const at::Tensor& x, const Base& base, const OptT& bias, const at::Tensor& A,
                     const at::Tensor& B, double scaling, double dropout_p) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
                   ": x must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(base.weight.has_value() != base.packed.has_value(), op,
                    ": give exactly one base weight: a dense `weight` or an NF4 `packed` + state");
  if (base.dense()) {
    const at::Tensor& w = *base.weight;
    TORCH_CHECK_VALUE(w.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got ", w.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == dt, op, ": weight has dtype ", w.scalar_type(), " but x has ", dt);
    TORCH_CHECK_VALUE(w.device() == x.device(), op, ": weight is on ", w.device(), " but x is on ", x.device());
  } else {
    TORCH_CHECK_VALUE(base.absmax.has_value() && base.shape.size() == 2, op,
                      ": an NF4 base needs absmax and a 2-D shape (out_features, in_features)");
  }
  const int64_t K = base.in_features(), N = base.out_features();
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, op, ": x has ", x.dim() >= 1 ? x.size(-1) : 0,
                    " features in its last dimension but the base layer takes ", K);
  TORCH_CHECK_VALUE(A.dim() == 2 && A.size(1) == K, op, ": lora_A must be (r, ", K, "), got ", A.sizes());
  const int64_t r = A.size(0);
  // As PEFT (LoraConfig checks r > 0): a rank-0 adapter is a configuration mistake, not a no-op.
  TORCH_CHECK_VALUE(r >= 1, op, ": the LoRA rank r (lora_A.shape[0]) must be >= 1, got ", r);
  TORCH_CHECK_VALUE(B.dim() == 2 && B.size(0) == N && B.size(1) == r, op, ": lora_B must be (", N, ", ", r,
                    ") for lora_A of rank ", r, ", got ", B.sizes());
  TORCH_CHECK_TYPE(A.scalar_type() == dt && B.scalar_type() == dt, op, ": lora_A and lora_B must have x's dtype ", dt,
                   ", got ", A.scalar_type(), " and ", B.scalar_type());
  TORCH_CHECK_VALUE(A.device() == x.device() && B.device() == x.device(), op,
                    ": lora_A and lora_B must be on x's device ", x.device());
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape (", N, ",), got ",
                      bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == dt, op, ": bias has dtype ", bias->scalar_type(), " but x has ", dt);
    TORCH_CHECK_VALUE(bias->device() == x.device(), op, ": bias is on ", bias->device(), " but x is on ",
                      x.device());
  }
  TORCH_CHECK_VALUE(std::isfinite(scaling), op, ": scaling must be finite, got ", scaling);
  check_dropout_p(dropout_p, op);
}

int64_t seed_value(const at::Tensor& seed, const char* op) {
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), op,
                    ": seed must be a one-element int64 CPU tensor, got ", seed.scalar_type(), " ", seed.sizes(),
                    " on ", seed.device());
  return seed.item<int64_t>();
}

// Rows of a (..., features) tensor: the product of its leading dimensions
// (not numel / features, which divides by zero when features is 0).
int64_t leading_rows(const at::Tensor& t) { return c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1); }

std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  sizes.back() = last;
  return sizes;
}

// dropout(x) as the forward saw it: regenerated from the seed.
at::Tensor dropped(const at::Tensor& x2, double p, int64_t seed) {
  return p > 0.0 ? call_lora_dropout(x2, p, seed) : x2;
}

// ---------------------------------------------------------------- ops --

at::Tensor lora_linear(const at::Tensor& x, const OptT& weight, const OptT& packed, const OptT& absmax,
                       int64_t blocksize, c10::SymIntArrayRef shape, const OptT& nested_absmax,
                       const OptT& nested_code, const OptT& offset, int64_t nested_blocksize, const OptT& bias,
                       const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout_p,
                       const at::Tensor& seed_tensor) {
  const Base base{weight, packed, absmax, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize};
  check_lora_args("lora_linear", x, base, bias, lora_A, lora_B, scaling, dropout_p);
  const int64_t seed = seed_value(seed_tensor, "lora_linear");
  const at::Tensor x2 = x.reshape({leading_rows(x), base.in_features()});
  at::Tensor y = base.forward(x2, bias);
  const at::Tensor u = at::mm(dropped(x2, dropout_p, seed), lora_A.t());  // M x r
  y.addmm_(u, lora_B.t(), 1.0, scaling);                                  // y += s u B^T, in the GEMM
  return y.reshape(with_last_dim(x, base.out_features()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const OptT& weight, const OptT& packed, const OptT& absmax,
    int64_t blocksize, c10::SymIntArrayRef shape, const OptT& nested_absmax, const OptT& nested_code,
    const OptT& offset, int64_t nested_blocksize, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scaling, double dropout_p, const at::Tensor& seed_tensor, bool compute_grad_x) {
  const Base base{weight, packed, absmax, blocksize, shape, nested_absmax, nested_code, offset, nested_blocksize};
  check_lora_args("lora_linear_backward", x, base, std::nullopt, lora_A, lora_B, scaling, dropout_p);
  const int64_t seed = seed_value(seed_tensor, "lora_linear_backward");
  const int64_t K = base.in_features(), N = base.out_features();
  const int64_t M = leading_rows(x);
  TORCH_CHECK_VALUE(grad_out.scalar_type() == x.scalar_type() && grad_out.dim() >= 1 && grad_out.size(-1) == N &&
                        leading_rows(grad_out) == M,
                    "lora_linear_backward: grad_out must have x's dtype and shape (..., ", N, ") with x's ", M,
                    " rows, got ", grad_out.scalar_type(), " ", grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.device() == x.device(), "lora_linear_backward: grad_out is on ", grad_out.device(),
                    " but x is on ", x.device());
  const at::Tensor x2 = x.reshape({M, K});
  const at::Tensor dy = grad_out.reshape({M, N});
  const at::Tensor xd = dropped(x2, dropout_p, seed);
  const at::Tensor u = at::mm(xd, lora_A.t());  // M x r, recomputed
  const at::Tensor g = at::mm(dy, lora_B);      // M x r
  at::Tensor grad_B = at::mm(dy.t(), u).mul_(scaling);
  at::Tensor grad_A = at::mm(g.t(), xd).mul_(scaling);
  at::Tensor grad_x = at::empty({0}, x.options());
  if (compute_grad_x) {
    grad_x = base.grad_input(dy);
    if (dropout_p > 0.0) {
      grad_x.add_(call_lora_dropout(at::mm(g, lora_A), dropout_p, seed), scaling);
    } else {
      grad_x.addmm_(g, lora_A, 1.0, scaling);  // dx = dy W + s g A, accumulated by the GEMM
    }
    grad_x = grad_x.reshape(x.sizes());
  }
  return {grad_x, grad_A, grad_B};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkit, CPU, m) {
  m.impl("lora_dropout", &lora_dropout_cpu);
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
}

#ifdef LLMKIT_WITH_CUDA
// The composite runs on CUDA unchanged (cuBLAS through ATen, our CUDA
// nf4_linear and lora_dropout kernels through the dispatcher).
TORCH_LIBRARY_IMPL(llmkit, CUDA, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
}
#endif

}  // namespace llmkit::lora
