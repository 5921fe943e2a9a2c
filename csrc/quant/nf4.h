// NF4 4-bit blockwise quantization (QLoRA), byte-compatible with bitsandbytes.
//
// Layout (bitsandbytes' quantize_4bit(quant_type="nf4")):
//   * the input is flattened and cut into blocks of `blocksize` elements; the
//     last block may be partial;
//   * absmax[b] = max |x| over block b (fp32);
//   * each element becomes the index of the nearest NF4 code of x / absmax,
//     ties going to the lower code (torch.bucketize against the midpoints);
//   * two codes per byte, the FIRST element in the HIGH nibble; an odd element
//     count pads the last low nibble with the code of 0.0 (index 7).
// Double quantization stores absmax as 8-bit codes of (absmax - offset) in
// blocks of 256 (quantize_blockwise_8bit), offset = mean(absmax).
//
// Rounding is part of the format: full blocks scale by the reciprocal
// (x * (1 / max(absmax, 1e-38))), the partial last block divides by its
// clamped absmax and stores that clamped value, exactly as bitsandbytes does.
// Every kernel (CPU and CUDA) computes with these float32 operations in this
// order, and the build disables FMA contraction so they stay two roundings.
//
// NaN and infinity, as bitsandbytes' quantize_4bit (torch ops: amax, clamp,
// bucketize) gives them, so its dequantize_4bit gives back NaN / inf:
//   * absmax is NaN when the block holds a NaN (torch.amax propagates it),
//     else +inf when it holds +-inf;
//   * a scaled value that is NaN gets code 15 (bucketize puts NaN past every
//     boundary): every element of a NaN block, and each +-inf of an inf
//     block (inf * (1 / inf) is NaN), whose finite elements get code 7 (0.0);
//   * so dequantizing gives NaN for the whole NaN block, and for an inf
//     block +inf at the +-inf elements (code 15 = 1.0 times inf; the sign
//     of -inf is lost, as in bitsandbytes) and NaN elsewhere (0.0 * inf).
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#if defined(__CUDACC__)
#define LLMKIT_HOST_DEVICE __host__ __device__
#else
#define LLMKIT_HOST_DEVICE
#endif

namespace llmkit::quant {

// The 16 NF4 values of bitsandbytes / QLoRA, in code order.
inline constexpr float kNF4Codes[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

// Decision boundaries: midpoints of neighbouring codes, computed in float32
// as bitsandbytes does ((code[i] + code[i+1]) / 2).
inline constexpr float nf4_midpoint(int i) { return (kNF4Codes[i] + kNF4Codes[i + 1]) * 0.5f; }

// Smallest absmax used as a divisor: an all-zero block quantizes to code 7.
inline constexpr float kMinAbsmax = 1e-38f;

// max(absmax, 1e-38) that keeps a NaN absmax NaN (as torch.clamp does; fmaxf would not).
LLMKIT_HOST_DEVICE inline float clamp_absmax(float amax) { return amax < kMinAbsmax ? kMinAbsmax : amax; }

// Code of a scaled value: the number of midpoints below it
// (torch.bucketize(x, midpoints, right=False)), counted as 15 minus the
// midpoints at or above it so that NaN, which compares false with all of
// them, gets 15 as in bucketize. The midpoints lie inside (-1, 1), so a value
// needs no clamp to [-1, 1] first. Branch-free, so it vectorises.
LLMKIT_HOST_DEVICE inline uint8_t nf4_code_of_scaled(float x) {
  int code = 15;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int i = 0; i < 15; ++i) code -= (x <= nf4_midpoint(i)) ? 1 : 0;
  return static_cast<uint8_t>(code);
}

inline constexpr int kNF4PadCode = 7;

// 8-bit blockwise quantization (double quant of absmax), as bitsandbytes' CPU
// kernel does it: v = x * (1 / absmax) is mapped to one of 65536 grid points
// j = trunc(((clamp(v) + 1) * 0.5) * 65535 + 0.5), and grid point j takes the
// code whose midpoint interval holds g_j = -1 + 2j / 65535. This is nearest-code
// up to the grid's resolution (1.5e-5), and it is the format's rounding.
inline constexpr int kCodeLutSize = 65536;

LLMKIT_HOST_DEVICE inline int code_lut_index(float v) {
  v = v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
  float t = (v + 1.0f) * 0.5f;
  t = t * 65535.0f;
  t = t + 0.5f;
  return t >= 0.0f ? static_cast<int>(t) : 0;  // NaN -> grid point 0
}

LLMKIT_HOST_DEVICE inline float code_lut_grid(int j) { return -1.0f + (2.0f * static_cast<float>(j)) / 65535.0f; }

// Host: the whole table for a sorted 256-entry code.
inline void build_code_lut(const float* code, uint8_t* lut) {
  float mids[255];
  for (int i = 0; i < 255; ++i) mids[i] = 0.5f * (code[i] + code[i + 1]);
  int idx = 0;
  for (int j = 0; j < kCodeLutSize; ++j) {
    const float g = code_lut_grid(j);
    while (idx < 255 && mids[idx] < g) ++idx;
    lut[j] = static_cast<uint8_t>(idx);
  }
}  // code of 0.0: fills the low nibble of an odd tail

// Shared argument checks, so CPU and CUDA reject bad input with the same words.
void check_blocksize(int64_t blocksize, int64_t lo, int64_t hi, const char* op);
void check_quantize_nf4_args(const at::Tensor& input, int64_t blocksize);
// Returns the element count of `shape`.
int64_t check_dequantize_nf4_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                  at::IntArrayRef shape, at::ScalarType dtype,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& offset, int64_t nested_blocksize);
// `out` of dequantize_nf4_into: dtype, shape, contiguity, device, and no
// memory shared with any input (the kernel would read what it has written).
void check_dequantize_out(const at::Tensor& out, at::IntArrayRef shape, at::ScalarType dtype,
                          const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset);
void check_quantize_8bit_args(const at::Tensor& input, const at::Tensor& code, int64_t blocksize);

// nf4_linear / nf4_linear_grad_input: checks `input` (x of (..., in_features),
// or grad_out of (..., out_features) when `is_grad_out`) and `bias` against the
// NF4 state of a 2-D weight `shape` = (out_features, in_features).
struct NF4LinearShape {
  int64_t out_features;
  int64_t in_features;
};
NF4LinearShape check_nf4_linear_args(const char* op, const at::Tensor& input, bool is_grad_out,
                                     const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                     at::IntArrayRef shape, const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                                     const std::optional<at::Tensor>& bias);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace llmkit::quant
