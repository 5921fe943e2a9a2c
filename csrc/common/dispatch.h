// Dispatch over the floating dtypes llmkit kernels accept (float32, float16,
// bfloat16) — and only those, so no kernel is instantiated for double.
#pragma once

#include <ATen/Dispatch.h>

#define LLMKIT_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
