// Argument checks shared by the CPU and CUDA kernels of the quant family.
// TORCH_CHECK_TYPE raises TypeError, TORCH_CHECK_VALUE ValueError in Python.
#include "quant/nf4.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <utility>

namespace llmkit::quant {

void check_blocksize(int64_t blocksize, int64_t lo, int64_t hi, const char* op) {
  TORCH_CHECK_VALUE(blocksize >= lo && blocksize <= hi && (blocksize & (blocksize - 1)) == 0, op,
                    ": blocksize must be a power of two in [", lo, ", ", hi, "], got ", blocksize);
}

void check_quantize_nf4_args(const at::Tensor& input, int64_t blocksize) {
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "quantize_nf4: input must be float32, float16 or bfloat16, got ", dt);
  check_blocksize(blocksize, 32, 4096, "quantize_nf4");
  TORCH_CHECK_VALUE(input.numel() > 0, "quantize_nf4: cannot quantize an empty tensor");
}

int64_t check_dequantize_nf4_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                  at::IntArrayRef shape, at::ScalarType dtype,
                                  const std::optional<at::Tensor>& nested_absmax,
                                  const std::optional<at::Tensor>& nested_code,
                                  const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  int64_t numel = 1;
  for (int64_t d : shape) {
    TORCH_CHECK_VALUE(d >= 0, "dequantize_nf4: negative dimension in shape ", shape);
    numel *= d;
  }
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "dequantize_nf4: packed must be uint8, got ",
                   packed.scalar_type());
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "dequantize_nf4: output dtype must be float32, float16 or bfloat16, got ", dtype);
  check_blocksize(blocksize, 32, 4096, "dequantize_nf4");
  TORCH_CHECK_VALUE(numel > 0, "dequantize_nf4: the shape must have at least one element");
  TORCH_CHECK_VALUE(packed.numel() == (numel + 1) / 2, "dequantize_nf4: packed holds ", packed.numel(),
                    " bytes but a tensor of ", numel, " elements needs ", (numel + 1) / 2,
                    " (is the state from another tensor?)");
  const int64_t blocks = ceil_div(numel, blocksize);
  TORCH_CHECK_VALUE(absmax.numel() == blocks, "dequantize_nf4: absmax has ", absmax.numel(),
                    " entries but ", numel, " elements in blocks of ", blocksize, " need ", blocks);
  TORCH_CHECK_VALUE(absmax.device() == packed.device(), "dequantize_nf4: absmax is on ", absmax.device(),
                    " but packed is on ", packed.device());
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK_VALUE(nested == nested_code.has_value() && nested == offset.has_value(),
                    "dequantize_nf4: nested_absmax, nested_code and offset go together (double quant)");
  if (!nested) {
    TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, "dequantize_nf4: absmax must be float32, got ",
                     absmax.scalar_type());
    return numel;
  }
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kByte,
                   "dequantize_nf4: with double quant, absmax holds uint8 codes, got ", absmax.scalar_type());
  check_blocksize(nested_blocksize, 32, 4096, "dequantize_nf4 (nested)");
  const at::Tensor& absmax2 = *nested_absmax;
  const at::Tensor& code2 = *nested_code;
  const at::Tensor& off = *offset;
  TORCH_CHECK_TYPE(absmax2.scalar_type() == at::kFloat && code2.scalar_type() == at::kFloat &&
                       off.scalar_type() == at::kFloat,
                   "dequantize_nf4: nested_absmax, nested_code and offset must be float32");
  TORCH_CHECK_VALUE(absmax2.numel() == ceil_div(blocks, nested_blocksize), "dequantize_nf4: nested_absmax has ",
                    absmax2.numel(), " entries but ", blocks, " absmax codes in blocks of ", nested_blocksize,
                    " need ", ceil_div(blocks, nested_blocksize));
  TORCH_CHECK_VALUE(code2.numel() == 256, "dequantize_nf4: nested_code must have 256 entries, got ",
                    code2.numel());
  TORCH_CHECK_VALUE(off.numel() == 1, "dequantize_nf4: offset must hold one value, got ", off.numel());
  for (const at::Tensor* t : {&absmax2, &code2, &off}) {
    TORCH_CHECK_VALUE(t->device() == packed.device(), "dequantize_nf4: the nested state is on ", t->device(),
                      " but packed is on ", packed.device());
  }
  return numel;
}

void check_dequantize_out(const at::Tensor& out, at::IntArrayRef shape, at::ScalarType dtype,
                          const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset) {
  TORCH_CHECK_TYPE(out.scalar_type() == dtype, "dequantize_nf4: out has dtype ", out.scalar_type(),
                   " but the output dtype is ", dtype);
  TORCH_CHECK_VALUE(out.sizes() == shape, "dequantize_nf4: out has shape ", out.sizes(), " but the state says ",
                    shape);
  TORCH_CHECK_VALUE(out.is_contiguous(), "dequantize_nf4: out must be contiguous");
  TORCH_CHECK_VALUE(out.device() == packed.device(), "dequantize_nf4: out is on ", out.device(),
                    " but packed is on ", packed.device());
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"packed", &packed},
      {"absmax", &absmax},
      {"nested_absmax", nested_absmax.has_value() ? &*nested_absmax : nullptr},
      {"nested_code", nested_code.has_value() ? &*nested_code : nullptr},
      {"offset", offset.has_value() ? &*offset : nullptr}};
  for (const auto& [name, t] : inputs) {
    if (t == nullptr) continue;
    const auto status = at::get_overlap_status(out, *t);
    TORCH_CHECK_VALUE(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
                      "dequantize_nf4: out shares memory with ", name,
                      " (an input); give a separate output buffer");
  }
}

void check_quantize_8bit_args(const at::Tensor& input, const at::Tensor& code, int64_t blocksize) {
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat, "quantize_blockwise_8bit: input must be float32, got ",
                   input.scalar_type());
  TORCH_CHECK_TYPE(code.scalar_type() == at::kFloat, "quantize_blockwise_8bit: code must be float32, got ",
                   code.scalar_type());
  TORCH_CHECK_VALUE(code.numel() == 256, "quantize_blockwise_8bit: code must have 256 entries, got ",
                    code.numel());
  TORCH_CHECK_VALUE(code.device() == input.device(), "quantize_blockwise_8bit: code is on ", code.device(),
                    " but input is on ", input.device());
  check_blocksize(blocksize, 32, 4096, "quantize_blockwise_8bit");
  TORCH_CHECK_VALUE(input.numel() > 0, "quantize_blockwise_8bit: cannot quantize an empty tensor");
}

NF4LinearShape check_nf4_linear_args(const char* op, const at::Tensor& input, bool is_grad_out,
                                     const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                     at::IntArrayRef shape, const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                                     const std::optional<at::Tensor>& bias) {
  const char* name = is_grad_out ? "grad_out" : "x";
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(shape.size() == 2, op, ": the NF4 weight must be 2-D (out_features, in_features), its state says ",
                    shape);
  check_dequantize_nf4_args(packed, absmax, blocksize, shape, at::kFloat, nested_absmax, nested_code, offset,
                            nested_blocksize);
  const NF4LinearShape s{shape[0], shape[1]};
  TORCH_CHECK_VALUE(input.dim() >= 1, op, ": ", name, " must have at least one dimension");
  const int64_t features = is_grad_out ? s.out_features : s.in_features;
  TORCH_CHECK_VALUE(input.size(-1) == features, op, ": ", name, " has ", input.size(-1),
                    " features in its last dimension but the weight ", shape, " needs ", features);
  TORCH_CHECK_VALUE(input.device() == packed.device(), op, ": ", name, " is on ", input.device(),
                    " but the NF4 weight is on ", packed.device());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_TYPE(b.scalar_type() == dt, op, ": bias has dtype ", b.scalar_type(), " but x has ", dt);
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == s.out_features, op, ": bias must have shape (",
                      s.out_features, ",), got ", b.sizes());
    TORCH_CHECK_VALUE(b.device() == packed.device(), op, ": bias is on ", b.device(), " but the NF4 weight is on ",
                      packed.device());
  }
  return s;
}

}  // namespace llmkit::quant
