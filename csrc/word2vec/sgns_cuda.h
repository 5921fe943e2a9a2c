// The CUDA word2vec trainer's entry point (csrc/word2vec/sgns_cuda.cu), bound
// to Python next to the CPU trainer in sgns_cpu.cpp when CUDA is built.
// Same arguments and conventions as the CPU train_chunk (word2vec.h), except:
// every tensor is on one CUDA device, there is no `workers` (the GPU runs many
// sentences at once, Hogwild), and skip-gram always shares one draw of
// negatives per window (pWord2Vec's HogBatch; the per-pair loop is CPU only).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace llmkit::word2vec {

struct ChunkStats {
  int64_t raw_words = 0;      // words in the chunk before subsampling
  int64_t trained_words = 0;  // words kept by subsampling
  int64_t examples = 0;       // (input, target) pairs with label 1
  double loss = 0.0;          // sum of the negative-sampling losses (0 unless compute_loss)
};

// Trains syn0 / syn1neg (float32, (vocab, dim), contiguous, CUDA) in place on
// one chunk: ids int32 (n,), offsets int64 (sentences + 1,) with offsets[0] = 0
// and offsets[-1] = n, keep int32 thresholds (vocab,) (keep a word when a
// 32-bit uniform draw < keep as uint32; 0xFFFFFFFF always), cum_table int32
// (vocab,) gensim's cumulative noise table. The learning rate decays linearly
// from alpha_start to alpha_end over the chunk's words. Synchronises at the end
// (the stats are copied to the host).
ChunkStats train_chunk_cuda(at::Tensor syn0, at::Tensor syn1neg, const at::Tensor& ids, const at::Tensor& offsets,
                            const at::Tensor& keep, const at::Tensor& cum_table, int64_t window, int64_t negative,
                            double alpha_start, double alpha_end, uint64_t seed, bool skip_gram, bool cbow_mean,
                            bool compute_loss);

}  // namespace llmkit::word2vec
