// Flash attention with sliding windows and Longformer global tokens.
//
// One problem description (AttentionParams) serves both layouts and both
// backends:
//   fixed length  q (batch, seqlen_q, heads_q, head_dim), k/v (batch, seqlen_k, heads_kv, head_dim)
//   varlen        q (total_q, heads_q, head_dim), k/v (total_k, heads_kv, head_dim),
//                 sequence b owning rows [cu_seqlens_q[b], cu_seqlens_q[b+1]).
// Element (b, i, h, :) of a tensor X lives at
//   X + b * X_batch_stride + (row_start(b) + i) * X_row_stride + h * X_head_stride
// with row_start(b) = cu_seqlens[b] (varlen) or 0 (fixed; batch stride used),
// and the last dimension contiguous.
//
// Visibility of key j to query i in one sequence (sq, sk its lengths),
// flash-attn's convention (causal = window_right 0, bottom-right aligned):
//   in_window(i, j) = (left  < 0 || j >= i + sk - sq - left) &&
//                     (right < 0 || j <= i + sk - sq + right)
//   visible(i, j)   = in_window(i, j) || global[i] || global[j]
// (global tokens only with sq == sk: Longformer's symmetric global attention).
// A query that sees no key outputs 0 and has lse = -inf.
//
// Outputs: out like q; lse float32, (batch, heads_q, seqlen_q) fixed or
// (heads_q, total_q) varlen, natural log, of the scaled scores:
//   lse[b, h, i] = log sum_{visible j} exp(scale * q_i . k_j).
// GQA: query head h reads kv head h / (heads_q / heads_kv).
//
// Additive bias (fixed length only; T5's relative positions, ALiBi, masks):
// float32 bias[b, h, i, j] joins the scaled score before the masks above,
//   s[b, h, i, j] = scale * q_i . k_j + bias[b, h, i, j],
// so a -inf bias hides a key, and lse is the logsumexp of these s. Its
// gradient is dS, the gradient of s, written to a dense fp32
// (batch, heads_q, seqlen_q, seqlen_k) buffer (0 for invisible pairs).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace llmkit::attention {

// Largest head_dim the kernels take; head_dim must be a multiple of 8.
constexpr int64_t kMaxHeadDim = 256;

struct AttentionParams {
  // Type-erased element pointers (dtype = q's; lse always float32).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;

  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  // lse[b * lse_batch_stride + h * lse_head_stride + row_start_q(b) + i]
  int64_t lse_batch_stride = 0, lse_head_stride = 0;

  // Optional: global_tokens[b * global_batch_stride + row_start_q(b) + i] != 0
  const bool* global_tokens = nullptr;
  int64_t global_batch_stride = 0;

  // Optional additive bias (float32; stride 0 over broadcast dims, and the
  // key dimension contiguous): element (b, h, i, j) at
  //   bias[b * bias_batch_stride + h * bias_head_stride + i * bias_row_stride + j]
  const float* bias = nullptr;
  int64_t bias_batch_stride = 0, bias_head_stride = 0, bias_row_stride = 0;

  // Varlen: int32 offsets of batch + 1 entries (on the tensors' device), or
  // nullptr for fixed length (then every sequence has seqlen_q / seqlen_k).
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;

  int64_t batch = 0, heads_q = 0, heads_kv = 0, head_dim = 0;
  int64_t seqlen_q = 0, seqlen_k = 0;  // fixed lengths, or the max lengths (varlen)
  float scale = 1.f;
  int64_t window_left = -1, window_right = -1;  // -1: unbounded
};

struct AttentionGradParams : AttentionParams {
  // Inputs of the backward pass (out and lse as produced by the forward).
  const void* dout = nullptr;
  int64_t dout_batch_stride = 0, dout_row_stride = 0, dout_head_stride = 0;
  // Outputs, laid out like q / k / v (same strides as documented above).
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  bool deterministic = false;
  // Optional: dS written here, dense fp32 (batch, heads_q, seqlen_q, seqlen_k)
  // zeroed by the caller (pairs the kernels never visit stay 0).
  float* dbias = nullptr;
};

// ---- argument checking (attention_ops.cpp), shared by both backends ----

// Validates q/k/v/cu_seqlens/global_tokens/window/scale (raising ValueError /
// TypeError that say what is accepted), and fills the shape, stride, window
// and pointer fields of `params` for q, k, v (not out / lse).
// cu_seqlens must be int32; on CUDA they are copied to the host once to check
// they start at 0, never decrease, end within the rows, and fit max_seqlen.
void check_and_describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const c10::optional<at::Tensor>& cu_seqlens_q,
                        const c10::optional<at::Tensor>& cu_seqlens_k,
                        int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                        int64_t window_left, int64_t window_right,
                        const c10::optional<at::Tensor>& global_tokens,
                        AttentionParams& params);

// Validates attn_bias (a float tensor (batch or 1, heads_q or 1, seqlen_q,
// seqlen_k) on q's device; fixed length only) and points `params` at an fp32
// copy of it (returned, to be kept alive while the kernel runs), broadcast
// through zero strides. Returns an undefined tensor when there is no bias.
at::Tensor describe_bias(const c10::optional<at::Tensor>& attn_bias, const at::Tensor& q, bool varlen,
                         AttentionParams& params);

// Allocates out (like q, contiguous) and lse, and points `params` at them.
std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& q, bool varlen,
                                                    AttentionParams& params);

// Checks the extra backward tensors (dout like q, out like q, lse as the
// forward returns it), allocates dq/dk/dv (contiguous) and fills `params`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> describe_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool varlen, AttentionGradParams& params);

// ---- kernels ----
void flash_forward_cpu(const AttentionParams& params, at::ScalarType dtype);
void flash_backward_cpu(const AttentionGradParams& params, at::ScalarType dtype);
#ifdef LLMKIT_WITH_CUDA
// Run on the current CUDA stream of the tensors' device; the caller holds a
// device guard. out/dq/dk/dv are fully written (rows without keys get 0).
void flash_forward_cuda(const AttentionParams& params, at::ScalarType dtype);
void flash_backward_cuda(const AttentionGradParams& params, at::ScalarType dtype);
#endif

}  // namespace llmkit::attention
