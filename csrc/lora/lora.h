// Fused LoRA: y = base(x) + scaling * dropout(x) A^T B^T, over a dense or an
// NF4 frozen base, with a backward that keeps only x and a dropout seed.
//
// Dropout mask: a pure function of (seed, flat element index), identical on
// CPU and CUDA, so the backward regenerates it instead of saving a T x in
// mask (or the dropped activations). Element i is kept when the top 24 bits
// of splitmix64(seed + i * golden) are >= round_down(p * 2^24); kept elements
// are scaled by 1 / (1 - p) (inverted dropout, as torch.nn.Dropout).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LLMKIT_LORA_HD __host__ __device__ __forceinline__
#else
#define LLMKIT_LORA_HD inline
#endif

namespace llmkit::lora {

LLMKIT_LORA_HD uint32_t dropout_bits(uint64_t seed, uint64_t index) {
  uint64_t z = seed + index * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<uint32_t>(z >> 40);  // 24 uniform bits
}

// Elements whose bits fall below this threshold are dropped.
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0); }

LLMKIT_LORA_HD bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) {
  return dropout_bits(seed, index) >= threshold;
}

}  // namespace llmkit::lora
