// Fused LoRA: y = base(x) + scaling * dropout(x) A^T B^T, over a dense or an
// NF4 frozen base, with a backward that keeps only x and a dropout seed.
//
// Dropout mask: a pure function of (seed, flat element index), identical on
// CPU and CUDA, so the backward regenerates it instead of saving a T x in
// mask (or the dropped activations). The hash is 32-bit integer arithmetic
// (murmur3's finalizer over an affine mix of index and seed), which AVX2
// vectorises 8 lanes wide: the mask costs about as much as reading x. Element
// i is kept when the hash's top 24 bits are >= floor(p * 2^24); kept
// elements are scaled by 1 / (1 - p) (inverted dropout, as torch.nn.Dropout).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LLMKIT_LORA_HD __host__ __device__ __forceinline__
#else
#define LLMKIT_LORA_HD inline
#endif

namespace llmkit::lora {

// The hash in two parts: the terms of the index's high 32 bits and of the
// seed are constant over any 2^32-element run, so a loop hoists them and
// runs on 32-bit lanes.
LLMKIT_LORA_HD uint32_t dropout_high_term(uint64_t seed, uint64_t index) {
  return static_cast<uint32_t>(index >> 32) * 0x85EBCA77u + static_cast<uint32_t>(seed >> 32) * 0xC2B2AE3Du;
}

LLMKIT_LORA_HD uint32_t dropout_mix(uint32_t index_low, uint32_t seed_low, uint32_t high_term) {
  uint32_t z = index_low * 0x9E3779B1u + seed_low;
  z ^= high_term;
  z ^= z >> 16;
  z *= 0x85EBCA6Bu;
  z ^= z >> 13;
  z *= 0xC2B2AE35u;
  z ^= z >> 16;
  return z >> 8;  // 24 uniform bits
}

LLMKIT_LORA_HD uint32_t dropout_bits(uint64_t seed, uint64_t index) {
  return dropout_mix(static_cast<uint32_t>(index), static_cast<uint32_t>(seed), dropout_high_term(seed, index));
}

// Elements whose bits fall below this threshold are dropped.
inline uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0); }

LLMKIT_LORA_HD bool dropout_keep(uint64_t seed, uint64_t index, uint32_t threshold) {
  return dropout_bits(seed, index) >= threshold;
}

}  // namespace llmkit::lora
