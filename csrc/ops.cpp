// The one place where every llmkit op schema is declared (torch.ops.llmkit.*).
// Kernels register per backend next to their code (TORCH_LIBRARY_IMPL in
// csrc/<family>/*_cpu.cpp and *_cuda.cu); fake (meta) kernels and autograd
// live in python/llmkit/ops/. pybind11 binds only what is not a tensor op
// (the word2vec trainer, csrc/word2vec/).
#include <torch/extension.h>
#include <torch/library.h>

#include "word2vec/word2vec.h"

TORCH_LIBRARY(llmkit, m) {
  // ---- quant: NF4 4-bit blockwise (bitsandbytes layout), 8-bit blockwise ----
  // packed: uint8 ((n+1)//2, 1), first element in the high nibble; absmax: fp32 (ceil(n/blocksize),)
  m.def("quantize_nf4(Tensor input, int blocksize) -> (Tensor packed, Tensor absmax)");
  // Without nested_*: absmax is fp32. With them (double quant): absmax holds uint8
  // codes of (absmax - offset) under nested_code, scaled per nested block by nested_absmax.
  m.def(
      "dequantize_nf4(Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, ScalarType dtype, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256) -> Tensor");
  // Same, into a caller's buffer (contiguous, `shape`, `dtype`): reusing a
  // buffer skips the page faults of a fresh allocation, which cost more than
  // the kernel on large outputs.
  m.def(
      "dequantize_nf4_into(Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, ScalarType dtype, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256, *, Tensor(a!) out) -> ()");
  // bitsandbytes' quantize_blockwise: nearest of 256 sorted codes of x / absmax(block).
  m.def("quantize_blockwise_8bit(Tensor input, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)");

  // ---- quant: fused NF4 matmul (QLoRA's frozen base) ----
  // W = dequant(packed) of shape (out_features, in_features); x (..., in_features)
  // fp32/fp16/bf16, bias (out_features,) of x's dtype or None; returns
  // x @ W.T + bias in x's dtype without materialising W (fp32 accumulation).
  // A GEMV path for few rows (decode), a tiled path (dequantised tiles + GEMM) for many.
  m.def(
      "nf4_linear(Tensor x, Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, int nested_blocksize=256, "
      "Tensor? bias=None) -> Tensor");
  // The gradient to x of nf4_linear: grad_out (..., out_features) @ W -> (..., in_features).
  m.def(
      "nf4_linear_grad_input(Tensor grad_out, Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256) -> Tensor");

  // ---- lora: fused LoRA over a dense or an NF4 frozen base ----
  // Inverted dropout whose mask is a pure function of (seed, flat index)
  // (lora/lora.h): x * keep / (1 - p). The backward regenerates the mask from
  // the seed instead of saving it.
  m.def("lora_dropout(Tensor x, float p, int seed) -> Tensor");
  // y = base(x) + scaling * dropout(x) @ lora_A.T @ lora_B.T, base = x @ W.T + bias,
  // W dense (`weight`) or NF4 (`packed` + state, as nf4_linear); exactly one is given.
  // lora_A (r, in_features), lora_B (out_features, r); all float tensors share x's dtype.
  // seed: the dropout seed as an int64 scalar tensor on the CPU, so that a
  // compiled graph can draw it (torch.randint) on every call instead of baking one in.
  m.def(
      "lora_linear(Tensor x, Tensor? weight, Tensor? packed, Tensor? absmax, int blocksize, SymInt[] shape, "
      "Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, int nested_blocksize, Tensor? bias, "
      "Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor seed) -> Tensor");
  // (grad_x, grad_A, grad_B) from x and the seed only (the frozen base gets none);
  // grad_x is an empty tensor when compute_grad_x is false.
  m.def(
      "lora_linear_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor? packed, Tensor? absmax, "
      "int blocksize, SymInt[] shape, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
      "int nested_blocksize, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor seed, "
      "bool compute_grad_x) -> (Tensor grad_x, Tensor grad_A, Tensor grad_B)");

  // ---- activation: GELU, tanh approximation (GPT-2's gelu_new) ----
  m.def("gelu_tanh(Tensor x) -> Tensor");
  m.def("gelu_tanh_backward(Tensor grad, Tensor x) -> Tensor");

  // ---- linear: the decode-time GEMV (CPU) ----
  // x (..., in) with at most 8 rows, weight (out, in) contiguous, float32: x W^T + bias.
  m.def("linear_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");

  // ---- loss: softmax cross-entropy fused with its gradient ----
  // losses[i] = logsumexp(logits[i]) - logits[i, targets[i]] (0 where targets[i] == ignore_index);
  // with compute_grad, logits becomes grad_scale * (softmax - onehot) in place (0 on ignored rows).
  m.def(
      "cross_entropy_fused_(Tensor(a!) logits, Tensor targets, int ignore_index, float grad_scale, "
      "bool compute_grad) -> Tensor losses");

  // ---- attention: flash attention, sliding window, Longformer global tokens ----
  // Fixed length: q (b, sq, hq, d), k/v (b, sk, hk, d), cu_seqlens None, lse (b, hq, sq).
  // Varlen: q (total_q, hq, d), k/v (total_k, hk, d), int32 cu_seqlens (b + 1), lse (hq, total_q).
  // window: -1 unbounded; causal is window_right = 0 (bottom-right aligned).
  // global_tokens: bool (b, s) or (total,), symmetric global attention (sq == sk).
  // attn_bias: float (b or 1, hq or 1, sq, sk) added to the scaled scores (fixed length only; CPU).
  m.def(
      "flash_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float softmax_scale, int window_left, int window_right, "
      "Tensor? global_tokens, Tensor? attn_bias=None) -> (Tensor out, Tensor lse)");
  // Gradients from the forward's out and lse (recomputes the probabilities).
  // dbias: like attn_bias when bias_requires_grad, else an empty float32 (0,).
  m.def(
      "flash_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale, "
      "int window_left, int window_right, Tensor? global_tokens, bool deterministic, Tensor? attn_bias=None, "
      "bool bias_requires_grad=False) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)");
}

namespace {

bool built_with_cuda() {
#ifdef LLMKIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llmkit C++/CUDA kernels; the ops are registered under torch.ops.llmkit";
  m.def("built_with_cuda", &built_with_cuda, "Whether the CUDA kernels were compiled in");
  m.attr("torch_version") = LLMKIT_TORCH_VERSION;
  m.attr("cuda_archs") = LLMKIT_CUDA_ARCHS;
  llmkit::word2vec::bind(m);  // _C.word2vec: the trainer (not a tensor op)
  llmkit::word2vec::bind_glove(m);  // _C.glove: co-occurrence counts and the AdaGrad trainer
}
