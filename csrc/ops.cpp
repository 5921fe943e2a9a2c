// The one place where every llmkit op schema is declared (torch.ops.llmkit.*).
// Kernels register per backend next to their code (TORCH_LIBRARY_IMPL in
// csrc/<family>/*_cpu.cpp and *_cuda.cu); fake (meta) kernels and autograd
// live in python/llmkit/ops/. pybind11 binds only what is not a tensor op.
#include <torch/extension.h>
#include <torch/library.h>

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
}
