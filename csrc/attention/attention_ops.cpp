// The attention ops' entry points for both backends: argument checks (one
// place, so CPU and CUDA reject the same inputs with the same message),
// output allocation, the problem description handed to the kernels, and the
// registration of torch.ops.llmkit.flash_attention_{forward,backward}.
// TORCH_CHECK_TYPE raises TypeError, TORCH_CHECK_VALUE ValueError in Python.
#include "attention/attention.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#ifdef LLMKIT_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace llmkit::attention {
namespace {

bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// The kernels index rows and heads by stride but read head_dim contiguously.
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// One row of fp16 / bf16 to fp32, in loops the compiler vectorises (c10's
// scalar conversions do not: they cost more than the attention at small sizes).
void widen_row(const c10::BFloat16* __restrict src, float* __restrict dst, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
  auto* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t e = 0; e < n; ++e) out[e] = static_cast<uint32_t>(bits[e]) << 16;  // bf16 = top half of fp32
}

#if defined(__x86_64__)
__attribute__((target("avx2,f16c"))) void widen_half_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t e = 0;
  for (; e + 8 <= n; e += 8)
    _mm256_storeu_ps(dst + e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + e))));
  for (; e < n; ++e) dst[e] = static_cast<float>(c10::Half(src[e], c10::Half::from_bits()));
}
#endif

void widen_row(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
#if defined(__x86_64__)
  static const bool f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  if (f16c) return widen_half_f16c(reinterpret_cast<const uint16_t*>(src), dst, n);
#endif
  for (int64_t e = 0; e < n; ++e) dst[e] = static_cast<float>(src[e]);
}

// The CPU kernel computes in fp32: fp16/bf16 inputs are widened once, in
// one parallel pass, into a head-major copy (each head one contiguous
// (rows x head_dim) matrix, which sgemm packs fastest); the result is a view
// with the input's shape. fp32 inputs are read in place, whatever their
// strides (measured: copying them head-major first costs more than it saves).
at::Tensor cpu_operand(const at::Tensor& t) {
  if (t.scalar_type() == at::kFloat) return t;
  const at::Tensor t4 = t.dim() == 4 ? t : t.unsqueeze(0);  // varlen: one "batch"
  const int64_t batch = t4.size(0), rows = t4.size(1), heads = t4.size(2), d = t4.size(3);
  at::Tensor packed = at::empty({batch, heads, rows, d}, t.options().dtype(at::kFloat));
  float* dst = packed.data_ptr<float>();
  const int64_t sb = t4.stride(0), sr = t4.stride(1), sh = t4.stride(2);
  auto pack = [&](auto* src) {  // src: the input's first element, as c10::Half* or c10::BFloat16*
    at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const auto* head = src + (bh / heads) * sb + (bh % heads) * sh;
        float* out = dst + bh * rows * d;
        for (int64_t r = 0; r < rows; ++r) widen_row(head + r * sr, out + r * d, d);
      }
    });
  };
  if (t.scalar_type() == at::kHalf) pack(t4.const_data_ptr<c10::Half>());
  else pack(t4.const_data_ptr<c10::BFloat16>());  // the checks admit only fp32, fp16, bf16
  const at::Tensor view = packed.transpose(1, 2);
  return t.dim() == 4 ? view : view.squeeze(0);
}

// Host copy of int32 offsets, validated: starts at 0, never decreases, ends
// within `rows`, and no sequence is longer than `max_seqlen`.
std::vector<int32_t> checked_offsets(const at::Tensor& cu, const char* name, int64_t rows, int64_t max_seqlen) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "flash_attention_varlen: ", name, " must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, "flash_attention_varlen: ", name,
                    " must be 1-D with batch + 1 entries, got shape ", cu.sizes());
  const at::Tensor host = cu.to(at::kCPU).contiguous();
  const int32_t* p = host.const_data_ptr<int32_t>();
  std::vector<int32_t> offsets(p, p + host.numel());
  TORCH_CHECK_VALUE(offsets[0] == 0, "flash_attention_varlen: ", name, " must start at 0, got ", offsets[0]);
  for (size_t b = 1; b < offsets.size(); ++b) {
    const int64_t len = int64_t(offsets[b]) - offsets[b - 1];
    TORCH_CHECK_VALUE(len >= 0, "flash_attention_varlen: ", name, " must not decrease, but entry ", b, " (",
                      offsets[b], ") < entry ", b - 1, " (", offsets[b - 1], ")");
    TORCH_CHECK_VALUE(len <= max_seqlen, "flash_attention_varlen: sequence ", b - 1, " has ", len,
                      " rows in ", name, " but max_seqlen is ", max_seqlen);
  }
  TORCH_CHECK_VALUE(offsets.back() <= rows, "flash_attention_varlen: ", name, " ends at ", offsets.back(),
                    " but the packed tensor has ", rows, " rows");
  return offsets;
}

}  // namespace

// Points `p` at q, k, v (already validated) with their strides.
static void point_at_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, AttentionParams& p) {
  const bool varlen = q.dim() == 3;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  if (varlen) {  // rows of all sequences back to back: no batch stride
    p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = 0;
    p.q_row_stride = q.stride(0), p.q_head_stride = q.stride(1);
    p.k_row_stride = k.stride(0), p.k_head_stride = k.stride(1);
    p.v_row_stride = v.stride(0), p.v_head_stride = v.stride(1);
  } else {
    p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
    p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
    p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  }
}

void check_and_describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& cu_seqlens_q,
                        const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                        int64_t max_seqlen_k, double softmax_scale, int64_t window_left, int64_t window_right,
                        const c10::optional<at::Tensor>& global_tokens, AttentionParams& p) {
  const bool varlen = cu_seqlens_q.has_value();
  const char* op = varlen ? "flash_attention_varlen" : "flash_attention";
  TORCH_CHECK_VALUE(varlen == cu_seqlens_k.has_value(), op, ": give both cu_seqlens_q and cu_seqlens_k or neither");
  TORCH_CHECK_TYPE(is_float_type(q.scalar_type()), op, ": q must be float32, float16 or bfloat16, got ",
                   q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), op,
                    ": q, k and v must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  const int64_t rank = varlen ? 3 : 4;
  const char* layout = varlen ? "(total, heads, head_dim)" : "(batch, seqlen, heads, head_dim)";
  TORCH_CHECK_VALUE(q.dim() == rank && k.dim() == rank && v.dim() == rank, op, ": q, k and v must be ", rank,
                    "-D ", layout, ", got shapes ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have one shape, got ", k.sizes(), " and ",
                    v.sizes());
  const int64_t d = q.size(-1);
  TORCH_CHECK_VALUE(k.size(-1) == d, op, ": q and k must have one head_dim, got ", d, " and ", k.size(-1));
  TORCH_CHECK_VALUE(d > 0 && d % 8 == 0 && d <= kMaxHeadDim, op,
                    ": head_dim must be a multiple of 8 up to ", kMaxHeadDim, ", got ", d);
  const int64_t hq = q.size(-2), hk = k.size(-2);
  TORCH_CHECK_VALUE(hq > 0 && hk > 0, op, ": q, k and v need at least one head, got ", hq, " query and ", hk,
                    " key/value heads");
  TORCH_CHECK_VALUE(hq % hk == 0, op, ": the query heads (", hq, ") must be a multiple of the key/value heads (", hk,
                    ")");
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1, op,
                    ": window sizes must be >= -1 (-1 = unbounded), got (", window_left, ", ", window_right, ")");
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), op, ": softmax_scale must be finite, got ", softmax_scale);

  p = AttentionParams{};
  p.heads_q = hq;
  p.heads_kv = hk;
  p.head_dim = d;
  p.scale = static_cast<float>(softmax_scale);
  p.window_left = window_left;
  p.window_right = window_right;
  if (varlen) {
    const at::Tensor& cu_q = *cu_seqlens_q;
    const at::Tensor& cu_k = *cu_seqlens_k;
    TORCH_CHECK_VALUE(cu_q.device() == q.device() && cu_k.device() == q.device(), op,
                      ": cu_seqlens must be on q's device (", q.device(), ")");
    TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, ": max_seqlen must be >= 0");
    const auto offsets_q = checked_offsets(cu_q, "cu_seqlens_q", q.size(0), max_seqlen_q);
    const auto offsets_k = checked_offsets(cu_k, "cu_seqlens_k", k.size(0), max_seqlen_k);
    TORCH_CHECK_VALUE(offsets_q.size() == offsets_k.size(), op,
                      ": cu_seqlens_q and cu_seqlens_k must have one length (batch + 1), got ", offsets_q.size(),
                      " and ", offsets_k.size());
    TORCH_CHECK_VALUE(cu_q.is_contiguous() && cu_k.is_contiguous(), op, ": cu_seqlens must be contiguous");
    p.batch = static_cast<int64_t>(offsets_q.size()) - 1;
    p.seqlen_q = max_seqlen_q;
    p.seqlen_k = max_seqlen_k;
    p.cu_seqlens_q = cu_q.const_data_ptr<int32_t>();
    p.cu_seqlens_k = cu_k.const_data_ptr<int32_t>();
    if (global_tokens.has_value()) {
      TORCH_CHECK_VALUE(offsets_q == offsets_k, op,
                        ": global_tokens need self-attention: cu_seqlens_q must equal cu_seqlens_k");
      const at::Tensor& g = *global_tokens;
      TORCH_CHECK_TYPE(g.scalar_type() == at::kBool, op, ": global_tokens must be bool, got ", g.scalar_type());
      TORCH_CHECK_VALUE(g.dim() == 1 && g.size(0) == q.size(0) && g.device() == q.device() && g.is_contiguous(),
                        op, ": global_tokens must be a contiguous bool (total_q,) = (", q.size(0),
                        ",) on q's device, got shape ", g.sizes(), " on ", g.device());
      p.global_tokens = g.const_data_ptr<bool>();
    }
  } else {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), op, ": q and k must have one batch size, got ", q.size(0), " and ",
                      k.size(0));
    p.batch = q.size(0);
    p.seqlen_q = q.size(1);
    p.seqlen_k = k.size(1);
    if (global_tokens.has_value()) {
      TORCH_CHECK_VALUE(p.seqlen_q == p.seqlen_k, op,
                        ": global_tokens need self-attention (seqlen_q == seqlen_k), got ", p.seqlen_q, " and ",
                        p.seqlen_k);
      const at::Tensor& g = *global_tokens;
      TORCH_CHECK_TYPE(g.scalar_type() == at::kBool, op, ": global_tokens must be bool, got ", g.scalar_type());
      TORCH_CHECK_VALUE(g.dim() == 2 && g.size(0) == p.batch && g.size(1) == p.seqlen_q &&
                            g.device() == q.device() && g.is_contiguous(),
                        op, ": global_tokens must be a contiguous bool (batch, seqlen) = (", p.batch, ", ",
                        p.seqlen_q, ") on q's device, got shape ", g.sizes(), " on ", g.device());
      p.global_tokens = g.const_data_ptr<bool>();
      p.global_batch_stride = p.seqlen_q;
    }
  }
  point_at_qkv(q, k, v, p);
}

at::Tensor describe_bias(const c10::optional<at::Tensor>& attn_bias, const at::Tensor& q, bool varlen,
                         AttentionParams& p) {
  if (!attn_bias.has_value()) return at::Tensor();
  const at::Tensor& bias = *attn_bias;
  TORCH_CHECK_VALUE(!varlen, "flash_attention_varlen: attn_bias is not supported for packed sequences "
                    "(use the 4-D flash_attention)");
  const char* op = "flash_attention";
  TORCH_CHECK_TYPE(at::isFloatingType(bias.scalar_type()), op,
                   ": attn_bias must be a floating-point tensor (it is added to the scores in float32), got ",
                   bias.scalar_type());
  TORCH_CHECK_VALUE(bias.device() == q.device(), op, ": attn_bias must be on q's device (", q.device(), "), got ",
                    bias.device());
  TORCH_CHECK_VALUE(bias.dim() == 4 && (bias.size(0) == 1 || bias.size(0) == p.batch) &&
                        (bias.size(1) == 1 || bias.size(1) == p.heads_q) && bias.size(2) == p.seqlen_q &&
                        bias.size(3) == p.seqlen_k,
                    op, ": attn_bias must have shape (batch or 1, heads_q or 1, seqlen_q, seqlen_k) = (", p.batch,
                    " or 1, ", p.heads_q, " or 1, ", p.seqlen_q, ", ", p.seqlen_k, "), got ", bias.sizes());
  at::Tensor f = bias.to(at::kFloat);
  if (f.stride(3) != 1) f = f.contiguous();  // the kernels read a bias row contiguously
  p.bias = f.const_data_ptr<float>();
  p.bias_batch_stride = f.size(0) == 1 ? 0 : f.stride(0);  // broadcast: stride 0
  p.bias_head_stride = f.size(1) == 1 ? 0 : f.stride(1);
  p.bias_row_stride = f.stride(2);
  return f;
}

std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& q, bool varlen, AttentionParams& p) {
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse;
  if (varlen) {
    lse = at::empty({p.heads_q, q.size(0)}, q.options().dtype(at::kFloat));
    p.out_row_stride = out.stride(0), p.out_head_stride = out.stride(1);
    p.lse_head_stride = lse.stride(0);
  } else {
    lse = at::empty({p.batch, p.heads_q, p.seqlen_q}, q.options().dtype(at::kFloat));
    p.out_batch_stride = out.stride(0), p.out_row_stride = out.stride(1), p.out_head_stride = out.stride(2);
    p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  return {out, lse};
}

static void check_backward_args(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                         bool varlen, const AttentionParams& p) {
  const char* op = "flash_attention_backward";
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), op,
                    ": dout and out must have q's shape ", q.sizes(), ", got ", dout.sizes(), " and ", out.sizes());
  TORCH_CHECK_TYPE(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
                   ": dout and out must have q's dtype ", q.scalar_type(), ", got ", dout.scalar_type(), " and ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(dout.device() == q.device() && out.device() == q.device() && lse.device() == q.device(), op,
                    ": dout, out and lse must be on q's device");
  const std::vector<int64_t> lse_shape = varlen ? std::vector<int64_t>{p.heads_q, q.size(0)}
                                                : std::vector<int64_t>{p.batch, p.heads_q, p.seqlen_q};
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.sizes() == at::IntArrayRef(lse_shape) &&
                        lse.stride(-1) == 1,
                    op, ": lse must be the forward's float32 ", at::IntArrayRef(lse_shape), ", got ",
                    lse.scalar_type(), " ", lse.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> describe_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                 const at::Tensor& k, const at::Tensor& v,
                                                                 const at::Tensor& out, const at::Tensor& lse,
                                                                 bool varlen, AttentionGradParams& p) {
  check_backward_args(dout, q, out, lse, varlen, p);
  p.out = const_cast<void*>(out.const_data_ptr());
  p.lse = const_cast<float*>(lse.const_data_ptr<float>());
  p.dout = dout.const_data_ptr();
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  if (varlen) {
    p.out_row_stride = out.stride(0), p.out_head_stride = out.stride(1);
    p.dout_row_stride = dout.stride(0), p.dout_head_stride = dout.stride(1);
    p.lse_head_stride = lse.stride(0);
    p.dq_row_stride = dq.stride(0), p.dq_head_stride = dq.stride(1);
    p.dk_row_stride = dk.stride(0), p.dk_head_stride = dk.stride(1);
    p.dv_row_stride = dv.stride(0), p.dv_head_stride = dv.stride(1);
  } else {
    p.out_batch_stride = out.stride(0), p.out_row_stride = out.stride(1), p.out_head_stride = out.stride(2);
    p.dout_batch_stride = dout.stride(0), p.dout_row_stride = dout.stride(1), p.dout_head_stride = dout.stride(2);
    p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
    p.dq_batch_stride = dq.stride(0), p.dq_row_stride = dq.stride(1), p.dq_head_stride = dq.stride(2);
    p.dk_batch_stride = dk.stride(0), p.dk_row_stride = dk.stride(1), p.dk_head_stride = dk.stride(2);
    p.dv_batch_stride = dv.stride(0), p.dv_row_stride = dv.stride(1), p.dv_head_stride = dv.stride(2);
  }
  return {dq, dk, dv};
}

namespace {

// Varlen rows past cu_seqlens[-1] belong to no sequence: give them 0 (lse -inf)
// rather than leaving them uninitialised.
void clear_unowned_rows(const at::Tensor& rows_first, const c10::optional<at::Tensor>& cu, int64_t dim,
                        double fill = 0.0) {
  if (!cu.has_value()) return;
  const int64_t end = cu->to(at::kCPU)[-1].item<int32_t>();
  const int64_t total = rows_first.size(dim);
  if (end < total) rows_first.narrow(dim, end, total - end).fill_(fill);
}

std::tuple<at::Tensor, at::Tensor> flash_attention_forward(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    int64_t window_left, int64_t window_right, const c10::optional<at::Tensor>& global_tokens,
    const c10::optional<at::Tensor>& attn_bias) {
  at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  AttentionParams p;
  check_and_describe(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                     window_right, global_tokens, p);
  const bool varlen = cu_seqlens_q.has_value();
  const at::Tensor bias = describe_bias(attn_bias, q, varlen, p);  // kept alive through the kernel
  const at::ScalarType dtype = q.scalar_type();
  if (!q.is_cuda()) {
    q = cpu_operand(q), k = cpu_operand(k), v = cpu_operand(v);
    point_at_qkv(q, k, v, p);
  }
  auto [out, lse] = allocate_outputs(q, varlen, p);
  if (q.is_cuda()) {
    TORCH_CHECK_NOT_IMPLEMENTED(!bias.defined(),
                                "flash_attention: attn_bias has no CUDA kernel yet (CPU only); on CUDA, add the "
                                "bias yourself with torch.nn.functional.scaled_dot_product_attention(attn_mask=...)");
#ifdef LLMKIT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    flash_forward_cuda(p, dtype);
#else
    TORCH_CHECK(false, "flash_attention: this llmkit build has no CUDA kernels");
#endif
  } else {
    flash_forward_cpu(p, at::kFloat);
    if (dtype != at::kFloat) out = out.to(dtype);
  }
  clear_unowned_rows(out, cu_seqlens_q, 0);
  clear_unowned_rows(lse, cu_seqlens_q, 1, -INFINITY);
  return {out, lse};
}

// dS summed over the dimensions the bias broadcasts, in the bias's dtype.
at::Tensor reduce_dbias(const at::Tensor& dbias_full, const at::Tensor& bias) {
  std::vector<int64_t> dims;
  for (int64_t dim : {0, 1})
    if (bias.size(dim) == 1 && dbias_full.size(dim) != 1) dims.push_back(dim);
  const at::Tensor reduced = dims.empty() ? dbias_full : dbias_full.sum(dims, /*keepdim=*/true);
  return reduced.to(bias.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> flash_attention_backward(
    const at::Tensor& dout_, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& out_,
    const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    int64_t window_left, int64_t window_right, const c10::optional<at::Tensor>& global_tokens, bool deterministic,
    const c10::optional<at::Tensor>& attn_bias, bool bias_requires_grad) {
  at::Tensor q = last_dim_contiguous(q_), k = last_dim_contiguous(k_), v = last_dim_contiguous(v_);
  at::Tensor dout = last_dim_contiguous(dout_), out = last_dim_contiguous(out_);
  AttentionGradParams p;
  check_and_describe(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                     window_right, global_tokens, p);
  p.deterministic = deterministic;
  const bool varlen = cu_seqlens_q.has_value();
  const at::Tensor bias = describe_bias(attn_bias, q, varlen, p);  // kept alive through the kernel
  // dS for the whole (batch, heads_q, seqlen_q, seqlen_k), reduced below to
  // the bias's broadcast shape; pairs never visited (invisible) keep their 0.
  at::Tensor dbias_full;
  if (bias.defined() && bias_requires_grad) {
    dbias_full = at::zeros({p.batch, p.heads_q, p.seqlen_q, p.seqlen_k}, q.options().dtype(at::kFloat));
    p.dbias = dbias_full.data_ptr<float>();
  }
  const at::ScalarType dtype = q.scalar_type();
  if (!q.is_cuda()) {
    check_backward_args(dout, q, out, lse, varlen, p);  // before converting: errors name the inputs
    q = cpu_operand(q), k = cpu_operand(k), v = cpu_operand(v), dout = cpu_operand(dout), out = cpu_operand(out);
    point_at_qkv(q, k, v, p);
  }
  auto [dq, dk, dv] = describe_backward(dout, q, k, v, out, lse, varlen, p);
  if (q.is_cuda()) {
    TORCH_CHECK_NOT_IMPLEMENTED(!bias.defined(),
                                "flash_attention: attn_bias has no CUDA kernel yet (CPU only); on CUDA, add the "
                                "bias yourself with torch.nn.functional.scaled_dot_product_attention(attn_mask=...)");
#ifdef LLMKIT_WITH_CUDA
    const c10::cuda::CUDAGuard guard(q.device());
    flash_backward_cuda(p, dtype);
#else
    TORCH_CHECK(false, "flash_attention: this llmkit build has no CUDA kernels");
#endif
  } else {
    flash_backward_cpu(p, at::kFloat);
    if (dtype != at::kFloat) dq = dq.to(dtype), dk = dk.to(dtype), dv = dv.to(dtype);
  }
  clear_unowned_rows(dq, cu_seqlens_q, 0);
  clear_unowned_rows(dk, cu_seqlens_k, 0);
  clear_unowned_rows(dv, cu_seqlens_k, 0);
  at::Tensor dbias = dbias_full.defined() ? reduce_dbias(dbias_full, *attn_bias)
                                          : at::empty({0}, q_.options().dtype(at::kFloat));
  return {dq, dk, dv, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkit, CPU, m) {
  m.impl("flash_attention_forward", &flash_attention_forward);
  m.impl("flash_attention_backward", &flash_attention_backward);
}

#ifdef LLMKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(llmkit, CUDA, m) {
  m.impl("flash_attention_forward", &flash_attention_forward);
  m.impl("flash_attention_backward", &flash_attention_backward);
}
#endif

}  // namespace llmkit::attention
