// Fused softmax cross-entropy over a (tokens, vocab) logits matrix, row by
// row: the per-token loss (logsumexp - target logit) and, in place, the
// gradient scale * (softmax - onehot). One pass to find the row max, one to
// exponentiate and sum, one to scale: the row stays in cache, where ATen's
// log_softmax + nll_loss + their backwards make about eight passes over the
// whole matrix in memory and allocate three more of it. The LM head's
// matmuls stay with the BLAS (llmkit.nn.loss.linear_cross_entropy).
//
// Non-finite logits follow the float64 reference (llmkit.ops.reference):
// a row with a NaN has a NaN loss and a NaN gradient row (the NaN-preserving
// exp makes it so, at no cost in the loops); a row whose max is +inf
// has loss +inf - logits[target] (inf, or NaN when the target is the inf)
// and a NaN gradient row (softmax's inf - inf); an all -inf row has NaN
// loss and gradient. Ignored rows give 0 and a 0 gradient whatever they
// hold (torch's cross_entropy skips them too), so padding never poisons a batch.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_softmax.h"

namespace llmkit::loss {
namespace {

constexpr const char* kOp = "cross_entropy_fused_";

void check_inputs(const at::Tensor& logits, const at::Tensor& targets) {
  TORCH_CHECK_VALUE(logits.dim() == 2, kOp, ": logits must be 2-D (tokens, vocab), got shape ", logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat, kOp, ": logits must be float32, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.is_contiguous(), kOp, ": logits must be contiguous (it is updated in place)");
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, kOp, ": targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0), kOp, ": targets must be (",
                    logits.size(0), "), got shape ", targets.sizes());
  TORCH_CHECK_VALUE(targets.device() == logits.device(), kOp, ": targets are on ", targets.device(),
                    ", logits on ", logits.device());
  TORCH_CHECK_VALUE(logits.size(1) > 0, kOp, ": the vocabulary is empty");
  const auto overlap = at::get_overlap_status(logits, targets);
  TORCH_CHECK_VALUE(overlap != at::MemOverlapStatus::Full && overlap != at::MemOverlapStatus::Partial, kOp,
                    ": logits (written in place) and targets share memory; pass a copy of one of them");
}

at::Tensor cross_entropy_fused_cpu(at::Tensor logits, const at::Tensor& targets, int64_t ignore_index,
                                   double grad_scale, bool compute_grad) {
  check_inputs(logits, targets);
  const at::Tensor t = targets.contiguous();
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const int64_t* target = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {  // before anything is written
    TORCH_CHECK_VALUE(target[i] == ignore_index || (target[i] >= 0 && target[i] < vocab), kOp, ": target ",
                      target[i], " of row ", i, " is outside [0, ", vocab, ") and is not ignore_index (",
                      ignore_index, ")");
  }
  at::Tensor losses = at::empty({rows}, logits.options());
  float* loss = losses.data_ptr<float>();
  float* data = logits.data_ptr<float>();
  const float scale = static_cast<float>(grad_scale);
  const softmax::Simd simd;
  // ~4 rows of a 32k vocabulary per task: enough work to amortise a task.
  const int64_t grain = std::max<int64_t>(1, (1 << 17) / vocab);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(compute_grad ? 0 : vocab);  // without a gradient, logits stay untouched
    for (int64_t i = begin; i < end; ++i) {
      float* row = data + i * vocab;
      if (target[i] == ignore_index) {
        loss[i] = 0.f;
        if (compute_grad) std::memset(row, 0, vocab * sizeof(float));
        continue;
      }
      const float target_logit = row[target[i]];
      const float row_max = simd.row_max(row, vocab);  // of the non-NaN logits
      // A +inf max: logsumexp is +inf unless the row holds a NaN too, which the
      // sum (NaN from inf - inf anyway) cannot tell; a rare row, so a scan.
      const bool inf_lse = row_max == std::numeric_limits<float>::infinity() && !softmax::any_nan(row, vocab);
      float* e = row;
      if (!compute_grad) {
        std::memcpy(scratch.data(), row, vocab * sizeof(float));
        e = scratch.data();
      }
      // e = exp(x - max); the sum is NaN with a NaN logit, a +inf one (inf - inf) or
      // no finite one (-inf - -inf): the gradient row is NaN then, as softmax's.
      const float sum = simd.exp_shift_sum(e, vocab, row_max);
      const float lse = inf_lse ? row_max : row_max + std::log(sum);
      loss[i] = lse - target_logit;
      if (compute_grad) {
        const float s = scale / sum;
        for (int64_t j = 0; j < vocab; ++j) row[j] *= s;  // softmax * scale (vectorised by the compiler)
        row[target[i]] -= scale;
      }
    }
  });
  return losses;
}

#ifdef LLMKIT_WITH_CUDA
// CUDA: the same result from ATen's CUDA kernels (logsumexp, exp, scatter);
// a fused CUDA kernel is future work.
at::Tensor cross_entropy_fused_cuda(at::Tensor logits, const at::Tensor& targets, int64_t ignore_index,
                                    double grad_scale, bool compute_grad) {
  check_inputs(logits, targets);
  const int64_t vocab = logits.size(1);
  const at::Tensor valid = targets != ignore_index;
  const at::Tensor safe = at::where(valid, targets, at::zeros_like(targets));
  TORCH_CHECK_VALUE(!(safe.lt(0) | safe.ge(vocab)).any().item<bool>(), kOp, ": a target is outside [0, ", vocab,
                    ") and is not ignore_index (", ignore_index, ")");
  const at::Tensor lse = at::logsumexp(logits, {1});
  // where, not a product with the mask: an ignored row's NaN must not leak (NaN * 0 = NaN).
  at::Tensor losses = at::where(valid, lse - logits.gather(1, safe.unsqueeze(1)).squeeze(1), at::zeros_like(lse));
  if (compute_grad) {
    logits.copy_(at::softmax(logits, 1)).mul_(grad_scale);  // softmax: NaN rows for +-inf / NaN, as the reference
    logits.scatter_add_(1, safe.unsqueeze(1), at::full({logits.size(0), 1}, -grad_scale, logits.options()));
    logits.masked_fill_(valid.logical_not().unsqueeze(1), 0);
  }
  return losses;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(llmkit, CPU, m) { m.impl("cross_entropy_fused_", &cross_entropy_fused_cpu); }

#ifdef LLMKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(llmkit, CUDA, m) { m.impl("cross_entropy_fused_", &cross_entropy_fused_cuda); }
#endif

}  // namespace llmkit::loss
