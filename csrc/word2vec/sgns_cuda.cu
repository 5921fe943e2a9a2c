// The CUDA word2vec trainer (sgns_cuda.h): skip-gram with the window's
// negatives shared (pWord2Vec's HogBatch) or CBOW, negative sampling, over one
// chunk of an integer-coded corpus. The conventions are the CPU trainer's
// (word2vec.h, sgns_cpu.cpp); only the generator differs (see below).
//
// Kernels on the current stream:
//   subsample_kernel  one warp per sentence: a keep draw per word, the kept
//                     ids compacted (ballot + popc) to compact[offsets[s] ..
//                     offsets[s] + kept[s]), so a sentence's kept words sit at
//                     its own offset and no prefix sum over sentences is needed.
//   train_kernel      warps take pieces of kPiece consecutive "slots" (the
//                     index space of `compact`: slot offsets[s] + i is kept
//                     word i of sentence s) from a global counter, so long
//                     sentences (text8-style 10000-word lines) spread over many
//                     warps and short ones share one; a window may read kept
//                     words outside its warp's piece. Lanes split the vector
//                     dimension (d = lane, lane + 32, ...); dot products are
//                     xor-shuffle reductions, so every lane holds each score.
//   guide_kernel      the noise table's guide (as the CPU trainer's), so a
//                     draw is about one step instead of a binary search.
// Per centre word (skip-gram) the warp snapshots the window's k context rows
// of syn0 and t target rows of syn1neg (the word and the kept noise draws)
// into its scratch, computes the k x t scores, G = alpha (label - sigma(S)),
// then adds dIn = G Out to syn0 and dOut = G^T In to syn1neg: all from the
// values at the window's start, as the CPU's shared_negatives_window. CBOW
// takes one negative-sampling step with the averaged context, as the CPU.
//
// Scratch per warp: shared memory when it fits (a lane only ever touches its
// own columns d of the row copies, so they need no synchronisation), else a
// per-warp slice of a global buffer (same code; large dim / window / negative).
//
// Races (Hogwild, as word2vec.c, gensim and the GPU ports): no locks and no
// atomics on the weights. Updates are plain read-add-store, so two warps
// updating one element at once can lose one of the two deltas; frequent words
// are hit most. Model rows are read with ld.global.cg (L2, the point of
// coherence): L1 is not coherent across SMs and a stale L1 line would turn
// into an overwritten update on the store. A warp's own updates are ordered
// (a lane updates its columns in program order), so a context word repeated
// within a window or a noise word drawn twice gets every delta, as on the CPU.
//
// Random numbers are counter-based (splitmix64's finaliser of key + counter *
// golden ratio, i.e. splitmix64 jumped to `counter`), keyed by the seed: the
// keep draw of raw word i uses counter i; centre slot c uses counters
// c (negative + 1) (window shrink b) and c (negative + 1) + 1 + j (noise draw
// j). So the draws do not depend on scheduling; only the Hogwild races and the
// float summation order of the loss make runs differ.
//
// The learning rate decays linearly over the chunk by the centre's slot:
// alpha_start - (alpha_start - alpha_end) * slot / n (the slot is at most the
// word's raw position and in the same sentence).
//
// The project compiles .cu with --fmad=false (the NF4 rounding needs it);
// nothing here is bit-exact by definition, so dot products and axpys use
// explicit fmaf.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "word2vec/sgns_cuda.h"
#include "word2vec/word2vec.h"

namespace llmkit::word2vec {
namespace {

// ------------------------------------------------------------ kernels --
// Plain CUDA, no ATen below this line up to "launch".

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr int kPiece = 32;             // centre slots per work item of train_kernel
constexpr int kSubsampleThreads = 256;  // subsample_kernel: 8 warps, one sentence each
// Row loops take the lane's columns d0 + 32 q, q < kCols, at once: their
// global loads are issued together (one L2 round trip, not kCols).
constexpr int kCols = 4;
constexpr int kChunk = kCols * kWarp;
// No __launch_bounds__ on the kernels: with it, nvcc 13's ptxas capped the
// registers low (32 - 64) and spilled the loop state; without, it uses 38 - 96
// and spills nothing (blocks are at most 256 threads, so any count fits).
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

__host__ __device__ __forceinline__ uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// 32 uniform bits for (key, counter): the high half of the mixed word.
__host__ __device__ __forceinline__ uint32_t draw32(uint64_t key, uint64_t counter) {
  return static_cast<uint32_t>(mix64(key + counter * kGolden) >> 32);
}

// Counters of a centre slot: the window shrink, then one per noise draw.
__host__ __device__ __forceinline__ uint64_t centre_counter(int64_t slot, int64_t negative) {
  return static_cast<uint64_t>(slot) * static_cast<uint64_t>(negative + 1);
}

// upper_bound(cum, cum + size, x): the first index with cum > x (size when none).
__host__ __device__ __forceinline__ int32_t upper_bound_index(const uint32_t* __restrict__ cum, int32_t size,
                                                              uint64_t x) {
  int32_t lo = 0, hi = size;
  while (lo < hi) {
    const int32_t mid = static_cast<int32_t>((static_cast<uint32_t>(lo) + static_cast<uint32_t>(hi)) >> 1);
    if (cum[mid] <= x) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// gensim's noise draw, upper_bound(cum, r % total), through the CPU trainer's
// guide table (Chen & Asau): guide[b] = upper_bound of the smallest draw of
// bucket b = x vocab / total (capped at vocab - 1), so the draw scans forward
// from there, about one step, instead of a binary search of ~log2(vocab)
// dependent loads. The scan stops at vocab - 1 at the latest (cum[vocab - 1]
// = total > x), also for an unsorted table.
__host__ __device__ __forceinline__ int32_t sample_noise(const uint32_t* __restrict__ cum,
                                                         const int32_t* __restrict__ guide, int32_t vocab, uint32_t r) {
  const uint32_t total = cum[vocab - 1];
  const uint32_t x = r % total;
  int32_t i = guide[static_cast<uint64_t>(x) * static_cast<uint64_t>(vocab) / total];
  while (cum[i] <= x) ++i;
  return i;
}

// The CPU's make_guide, one bucket per thread.
__global__ void guide_kernel(const uint32_t* __restrict__ cum, int32_t vocab, int32_t* __restrict__ guide) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= vocab) return;
  const uint64_t total = cum[vocab - 1];
  const uint64_t size = static_cast<uint64_t>(vocab);
  const uint64_t r_min = (static_cast<uint64_t>(b) * total + size - 1) / size;  // ceil(b total / size)
  guide[b] = std::min(upper_bound_index(cum, vocab, r_min), vocab - 1);
}

// word2vec.c's shrinking window: b = rand % window, reach window - b, capped
// at the sentence length (the reach beyond it changes nothing, and the cap
// keeps pos + reach from overflowing for absurd windows).
__host__ __device__ __forceinline__ int window_reach(int64_t window, uint32_t r, int len) {
  const int64_t b = window <= int64_t{0xFFFFFFFF} ? int64_t{r % static_cast<uint32_t>(window)} : int64_t{r};
  return static_cast<int>(std::min<int64_t>(window - b, len));
}

__host__ __device__ __forceinline__ float clipped_sigmoid(float f) {
  return f > kMaxExp ? 1.0f : (f < -kMaxExp ? 0.0f : 1.0f / (1.0f + expf(-f)));
}

// -log sigma(z), clipped like the sigmoid; the CPU's formula in double.
__host__ __device__ __forceinline__ double pair_loss(float z) {
  return z > kMaxExp ? 0.0 : (z < -kMaxExp ? static_cast<double>(-z) : log1p(exp(-static_cast<double>(z))));
}

// Per-warp scratch, in 4-byte words: a float region then an int region, each
// a multiple of 4 words so every warp's slice stays 16-byte aligned.
//   skip-gram floats: In (kmax x dim), Out (tmax x dim), S / G (kmax x tmax)
//   CBOW floats:      neu1, neu1e (dim each)
//   ints:             context ids (kmax), target ids (tmax, skip-gram)
// kmax = min(2 window, longest sentence - 1) bounds the context of any window.
struct Layout {
  int64_t kmax = 0;
  int64_t tmax = 0;
  int64_t floats = 0;
  int64_t ints = 0;
  int64_t words = 0;  // floats + ints, the per-warp stride
};

__host__ __device__ inline int64_t round4(int64_t x) { return (x + 3) / 4 * 4; }

// Callers bound the arguments first (see check_layout_size) so nothing overflows.
__host__ __device__ inline Layout make_layout(bool skip_gram, int64_t dim, int64_t window, int64_t negative,
                                              int64_t max_len) {
  Layout l;
  l.kmax = max_len <= 1 ? 0 : std::min<int64_t>(2 * std::min<int64_t>(window, max_len), max_len - 1);
  l.tmax = skip_gram ? negative + 1 : 0;
  l.floats = round4(skip_gram ? (l.kmax + l.tmax) * dim + l.kmax * l.tmax : 2 * dim);
  l.ints = round4(l.kmax + l.tmax);
  l.words = l.floats + l.ints;
  return l;
}

struct DeviceStats {  // zero-initialised int64 x 4 on the device
  unsigned long long trained_words;
  unsigned long long examples;
  unsigned long long next_piece;  // train_kernel's work counter
  double loss;
};

struct Params {
  float* syn0;
  float* syn1neg;
  const int32_t* ids;
  const int64_t* offsets;
  const uint32_t* keep;
  const uint32_t* cum;
  const int32_t* guide;  // (vocab,): sample_noise's guide table
  int32_t* compact;  // (n,): kept ids of sentence s at offsets[s] ..
  int32_t* kept;     // (sentences,): kept words per sentence
  float* scratch;    // global per-warp scratch (train_kernel<.., false>), else unused
  DeviceStats* stats;
  int64_t n;
  int64_t sentences;
  int64_t pieces;
  int64_t window;
  int64_t negative;
  Layout layout;
  int32_t vocab;
  int32_t dim;
  double alpha_start;
  double alpha_end;
  double inv_n;
  uint64_t key_keep;
  uint64_t key_centre;
  bool cbow_mean;
  bool compute_loss;
};

__device__ __forceinline__ unsigned lanes_below(int lane) { return (1u << lane) - 1u; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Four independent sums at once: the shuffles of one overlap the others' latency.
__device__ __forceinline__ void warp_sum4(float (&v)[4]) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int q = 0; q < 4; ++q) v[q] += __shfl_xor_sync(kFullMask, v[q], off);
  }
}

// The lane's columns of a model row into the scratch.
__device__ __forceinline__ void copy_row(const float* __restrict__ src, float* __restrict__ dst, int dim, int lane) {
  for (int d0 = lane; d0 < dim; d0 += kChunk) {
    float v[kCols];
#pragma unroll
    for (int q = 0; q < kCols; ++q) v[q] = d0 + q * kWarp < dim ? __ldcg(src + d0 + q * kWarp) : 0.0f;
#pragma unroll
    for (int q = 0; q < kCols; ++q) {
      if (d0 + q * kWarp < dim) dst[d0 + q * kWarp] = v[q];
    }
  }
}

// row[d] += sum_r coef[r * coef_stride] * src[r * dim + d] over the lane's
// columns: the row is read (L2) and written once, its kCols loads issued together.
__device__ __forceinline__ void add_combination(float* row, const float* coef, int coef_stride, const float* src,
                                                int count, int dim, int lane) {
  for (int d0 = lane; d0 < dim; d0 += kChunk) {
    float v[kCols], acc[kCols];
#pragma unroll
    for (int q = 0; q < kCols; ++q) {
      v[q] = d0 + q * kWarp < dim ? __ldcg(row + d0 + q * kWarp) : 0.0f;
      acc[q] = 0.0f;
    }
    for (int r = 0; r < count; ++r) {
      const float c = coef[r * coef_stride];
      const float* a = src + r * dim + d0;
#pragma unroll
      for (int q = 0; q < kCols; ++q) {
        if (d0 + q * kWarp < dim) acc[q] = fmaf(c, a[q * kWarp], acc[q]);
      }
    }
#pragma unroll
    for (int q = 0; q < kCols; ++q) {
      if (d0 + q * kWarp < dim) row[d0 + q * kWarp] = v[q] + acc[q];
    }
  }
}

// Last sentence s with offsets[s] <= slot (offsets[0] = 0 <= slot < offsets[S] = n);
// past any empty sentences that start at the same offset.
__device__ __forceinline__ int64_t sentence_of(const int64_t* __restrict__ offsets, int64_t sentences, int64_t slot) {
  int64_t lo = 0, hi = sentences;  // offsets[lo] <= slot < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (offsets[mid] <= slot) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void subsample_kernel(Params p) {
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  unsigned long long trained = 0;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; s < p.sentences;
       s += warps) {
    const int64_t beg = p.offsets[s], end = p.offsets[s + 1];
    int64_t count = 0;
    for (int64_t i0 = beg; i0 < end; i0 += kWarp) {
      const int64_t i = i0 + lane;
      bool keep = false;
      int32_t w = 0;
      if (i < end) {
        w = p.ids[i];
        const uint32_t threshold = p.keep[w];
        keep = threshold == 0xFFFFFFFFu || draw32(p.key_keep, static_cast<uint64_t>(i)) < threshold;
      }
      const unsigned mask = __ballot_sync(kFullMask, keep);
      if (keep) p.compact[beg + count + __popc(mask & lanes_below(lane))] = w;
      count += __popc(mask);
    }
    if (lane == 0) p.kept[s] = static_cast<int32_t>(count);
    trained += static_cast<unsigned long long>(count);
  }
  if (lane == 0 && trained != 0) atomicAdd(&p.stats->trained_words, trained);
}

struct WarpTotals {
  unsigned long long examples = 0;  // lane 0's count
  double loss = 0.0;                // per lane, summed at the end
};

// Fills ctx[0 .. k) with the sentence's kept words lo .. lo + k, skipping pos.
__device__ __forceinline__ void gather_context(const int32_t* sentence, int lo, int pos, int k, int32_t* ctx,
                                               int lane) {
  for (int i = lane; i < k; i += kWarp) {
    const int c = lo + i;
    ctx[i] = sentence[c >= pos ? c + 1 : c];
  }
}

// Noise draw j of the centre whose counters start at `counter`.
__device__ __forceinline__ int32_t noise_draw(const Params& p, uint64_t counter, int64_t j) {
  return sample_noise(p.cum, p.guide, p.vocab, draw32(p.key_centre, counter + 1 + static_cast<uint64_t>(j)));
}

__device__ __forceinline__ float centre_alpha(const Params& p, int64_t slot) {
  const double progress = std::min(1.0, static_cast<double>(slot) * p.inv_n);
  return static_cast<float>(p.alpha_start - (p.alpha_start - p.alpha_end) * progress);
}

// One skip-gram window with shared negatives; the CPU's shared_negatives_window.
// `pos` is the centre's index among the sentence's `len` kept words.
__device__ __forceinline__ void skipgram_centre(const Params& p, int64_t slot, int pos, int len,
                                                const int32_t* sentence, float* buf, int32_t* ibuf, int lane,
                                                WarpTotals& tot) {
  const uint64_t counter = centre_counter(slot, p.negative);
  const int reach = window_reach(p.window, draw32(p.key_centre, counter), len);
  const int lo = pos - std::min(reach, pos), hi = pos + std::min(reach, len - 1 - pos);  // no overflow
  const int k = hi - lo;  // lo <= pos <= hi: the window less the centre
  if (k == 0) return;
  const int32_t word = sentence[pos];
  const float alpha = centre_alpha(p, slot);
  const int dim = p.dim;
  int32_t* ctx = ibuf;
  int32_t* tgt = ibuf + p.layout.kmax;

  __syncwarp();  // every lane is done with the previous window's ids and G
  gather_context(sentence, lo, pos, k, ctx, lane);
  // Targets: the word, then the noise draws in order, those equal to the word skipped.
  if (lane == 0) tgt[0] = word;
  int t = 1;
  for (int64_t r0 = 0; r0 < p.negative; r0 += kWarp) {
    const int64_t j = r0 + lane;
    int32_t w = word;
    if (j < p.negative) w = noise_draw(p, counter, j);
    const bool take = w != word;
    const unsigned mask = __ballot_sync(kFullMask, take);
    if (take) tgt[t + __popc(mask & lanes_below(lane))] = w;
    t += __popc(mask);
  }
  __syncwarp();

  // Row r of the scratch starts at r * dim (int: the scratch is < 2^27 words).
  float* in = buf;                                              // k x dim
  float* out = buf + static_cast<int>(p.layout.kmax) * dim;     // t x dim
  float* sg = out + static_cast<int>(p.layout.tmax) * dim;      // k x t: scores, then G in place
  for (int i = 0; i < k; ++i) copy_row(p.syn0 + static_cast<int64_t>(ctx[i]) * dim, in + i * dim, dim, lane);
  for (int j = 0; j < t; ++j) copy_row(p.syn1neg + static_cast<int64_t>(tgt[j]) * dim, out + j * dim, dim, lane);

  // S = In Out^T, four targets per pass (past t: a repeat of the last, unused).
  // Score (i, j) is stored by lane (i t + j) % 32, the lane that turns it into
  // G below, so that step needs no sync.
  for (int i = 0; i < k; ++i) {
    const float* a = in + i * dim;
    for (int j0 = 0; j0 < t; j0 += 4) {
      const float* b = out + j0 * dim;
      const int o1 = std::min(1, t - 1 - j0) * dim, o2 = std::min(2, t - 1 - j0) * dim,
                o3 = std::min(3, t - 1 - j0) * dim;
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int d = lane; d < dim; d += kWarp) {
        const float x = a[d];
        acc[0] = fmaf(x, b[d], acc[0]);
        acc[1] = fmaf(x, b[o1 + d], acc[1]);
        acc[2] = fmaf(x, b[o2 + d], acc[2]);
        acc[3] = fmaf(x, b[o3 + d], acc[3]);
      }
      warp_sum4(acc);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int e = i * t + j0 + q;
        if (j0 + q < t && lane == (e & (kWarp - 1))) sg[e] = acc[q];
      }
    }
  }
  const int kt = k * t;
  for (int e = lane; e < kt; e += kWarp) {
    const float f = sg[e];
    const bool positive = e % t == 0;  // target 0 is the word (label 1)
    if (p.compute_loss) tot.loss += pair_loss(positive ? f : -f);
    sg[e] = ((positive ? 1.0f : 0.0f) - clipped_sigmoid(f)) * alpha;
  }
  __syncwarp();  // G complete for all lanes

  // dIn = G Out onto syn0, dOut = G^T In onto syn1neg, from the snapshots.
  for (int i = 0; i < k; ++i) {
    add_combination(p.syn0 + static_cast<int64_t>(ctx[i]) * dim, sg + i * t, 1, out, t, dim, lane);
  }
  for (int j = 0; j < t; ++j) {
    add_combination(p.syn1neg + static_cast<int64_t>(tgt[j]) * dim, sg + j, t, in, k, dim, lane);
  }
  if (lane == 0) tot.examples += static_cast<unsigned long long>(k);
}

// One CBOW negative-sampling step against `target`: the CPU's
// negative_sampling_step with l1 = neu1 (the lane's columns).
__device__ __forceinline__ void cbow_target(const Params& p, int32_t target, float label, float alpha,
                                            const float* neu1, float* neu1e, int lane, WarpTotals& tot) {
  const int dim = p.dim;
  float* l2 = p.syn1neg + static_cast<int64_t>(target) * dim;
  float part = 0.0f;
  for (int d0 = lane; d0 < dim; d0 += kChunk) {
    float v[kCols];
#pragma unroll
    for (int q = 0; q < kCols; ++q) v[q] = d0 + q * kWarp < dim ? __ldcg(l2 + d0 + q * kWarp) : 0.0f;
#pragma unroll
    for (int q = 0; q < kCols; ++q) {
      if (d0 + q * kWarp < dim) part = fmaf(neu1[d0 + q * kWarp], v[q], part);
    }
  }
  const float f = warp_sum(part);
  if (p.compute_loss && lane == 0) tot.loss += pair_loss(label > 0.0f ? f : -f);
  const float g = (label - clipped_sigmoid(f)) * alpha;
  for (int d0 = lane; d0 < dim; d0 += kChunk) {
    float v[kCols];
#pragma unroll
    for (int q = 0; q < kCols; ++q) v[q] = d0 + q * kWarp < dim ? __ldcg(l2 + d0 + q * kWarp) : 0.0f;
#pragma unroll
    for (int q = 0; q < kCols; ++q) {
      const int d = d0 + q * kWarp;
      if (d < dim) {
        neu1e[d] = fmaf(g, v[q], neu1e[d]);
        l2[d] = fmaf(g, neu1[d], v[q]);
      }
    }
  }
}

__device__ __forceinline__ void cbow_centre(const Params& p, int64_t slot, int pos, int len, const int32_t* sentence,
                                            float* buf, int32_t* ibuf, int lane, WarpTotals& tot) {
  const uint64_t counter = centre_counter(slot, p.negative);
  const int reach = window_reach(p.window, draw32(p.key_centre, counter), len);
  const int lo = pos - std::min(reach, pos), hi = pos + std::min(reach, len - 1 - pos);  // no overflow
  const int k = hi - lo;
  if (k == 0) return;
  const int32_t word = sentence[pos];
  const float alpha = centre_alpha(p, slot);
  const int dim = p.dim;
  int32_t* ctx = ibuf;
  __syncwarp();  // every lane is done with the previous window's ids
  gather_context(sentence, lo, pos, k, ctx, lane);
  __syncwarp();

  float* neu1 = buf;
  float* neu1e = buf + dim;
  const float inv = 1.0f / static_cast<float>(k);
  for (int d0 = lane; d0 < dim; d0 += kChunk) {
    float acc[kCols] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < k; ++i) {
      const float* row = p.syn0 + static_cast<int64_t>(ctx[i]) * dim + d0;
      float v[kCols];
#pragma unroll
      for (int q = 0; q < kCols; ++q) v[q] = d0 + q * kWarp < dim ? __ldcg(row + q * kWarp) : 0.0f;
#pragma unroll
      for (int q = 0; q < kCols; ++q) acc[q] += v[q];
    }
#pragma unroll
    for (int q = 0; q < kCols; ++q) {
      const int d = d0 + q * kWarp;
      if (d < dim) {
        neu1[d] = p.cbow_mean ? acc[q] * inv : acc[q];
        neu1e[d] = 0.0f;
      }
    }
  }
  cbow_target(p, word, 1.0f, alpha, neu1, neu1e, lane, tot);
  // Noise draws 32 at a time (one per lane), then taken in order.
  for (int64_t r0 = 0; r0 < p.negative; r0 += kWarp) {
    const int64_t j = r0 + lane;
    int32_t mine = word;
    if (j < p.negative) mine = noise_draw(p, counter, j);
    const int m = static_cast<int>(std::min<int64_t>(kWarp, p.negative - r0));
    for (int q = 0; q < m; ++q) {
      const int32_t target = __shfl_sync(kFullMask, mine, q);
      if (target != word) cbow_target(p, target, 0.0f, alpha, neu1, neu1e, lane, tot);
    }
  }
  // word2vec.c adds the error to each context row as is; gensim divides it by
  // the count when averaging (cbow_mean).
  for (int d0 = lane; d0 < dim; d0 += kChunk) {
    float e[kCols];
#pragma unroll
    for (int q = 0; q < kCols; ++q) {
      const int d = d0 + q * kWarp;
      e[q] = d < dim ? (p.cbow_mean ? neu1e[d] * inv : neu1e[d]) : 0.0f;
    }
    for (int i = 0; i < k; ++i) {
      float* row = p.syn0 + static_cast<int64_t>(ctx[i]) * dim + d0;
      float v[kCols];
#pragma unroll
      for (int q = 0; q < kCols; ++q) v[q] = d0 + q * kWarp < dim ? __ldcg(row + q * kWarp) : 0.0f;
#pragma unroll
      for (int q = 0; q < kCols; ++q) {
        if (d0 + q * kWarp < dim) row[q * kWarp] = v[q] + e[q];
      }
    }
  }
  if (lane == 0) tot.examples += 1;
}

template <bool kSkipGram, bool kShared>
__global__ void train_kernel(Params p) {
  extern __shared__ float4 w2v_smem[];  // float4: 16-byte aligned per-warp slices
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int warp = static_cast<int>(threadIdx.x) / kWarp;
  float* buf;
  if constexpr (kShared) {
    buf = reinterpret_cast<float*>(w2v_smem) + static_cast<int64_t>(warp) * p.layout.words;
  } else {
    const int64_t global_warp = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + warp;
    buf = p.scratch + global_warp * p.layout.words;
  }
  int32_t* ibuf = reinterpret_cast<int32_t*>(buf + p.layout.floats);
  WarpTotals tot;
  for (;;) {
    unsigned long long piece = 0;
    if (lane == 0) piece = atomicAdd(&p.stats->next_piece, 1ULL);
    piece = __shfl_sync(kFullMask, piece, 0);
    if (piece >= static_cast<unsigned long long>(p.pieces)) break;
    const int64_t g0 = static_cast<int64_t>(piece) * kPiece;
    const int64_t g1 = std::min<int64_t>(p.n, g0 + kPiece);
    // The piece's slots may span several sentences: slots past a sentence's
    // kept count are empty.
    for (int64_t s = sentence_of(p.offsets, p.sentences, g0); s < p.sentences; ++s) {
      const int64_t base = p.offsets[s];
      if (base >= g1) break;
      const int len = p.kept[s];  // < 2^31 (checked on the host)
      const int32_t* sentence = p.compact + base;
      const int end = static_cast<int>(std::min<int64_t>(g1 - base, len));
      for (int pos = static_cast<int>(std::max<int64_t>(g0 - base, 0)); pos < end; ++pos) {
        if constexpr (kSkipGram) {
          skipgram_centre(p, base + pos, pos, len, sentence, buf, ibuf, lane, tot);
        } else {
          cbow_centre(p, base + pos, pos, len, sentence, buf, ibuf, lane, tot);
        }
      }
    }
  }
  if (p.compute_loss) {
    double loss = tot.loss;
#pragma unroll
    for (int off = kWarp / 2; off > 0; off >>= 1) loss += __shfl_xor_sync(kFullMask, loss, off);
    if (lane == 0 && loss != 0.0) atomicAdd(&p.stats->loss, loss);
  }
  if (lane == 0 && tot.examples != 0) atomicAdd(&p.stats->examples, tot.examples);
}

// ------------------------------------------------------------- launch --

constexpr int64_t kMaxSharedPerWarp = 64 * 1024;       // above: global scratch (few warps would fit per SM)
constexpr int64_t kGlobalScratchBudget = 512LL << 20;  // bytes of global scratch over all warps
constexpr int64_t kMaxScratchPerWarp = kGlobalScratchBudget;

void check_model(const at::Tensor& syn0, const at::Tensor& syn1neg) {
  TORCH_CHECK_TYPE(syn0.scalar_type() == at::kFloat && syn1neg.scalar_type() == at::kFloat,
                   "word2vec (CUDA): syn0 and syn1neg must be float32, got ", syn0.scalar_type(), " and ",
                   syn1neg.scalar_type());
  TORCH_CHECK_VALUE(syn0.is_cuda() && syn1neg.device() == syn0.device(),
                    "word2vec (CUDA): syn0 and syn1neg must be on one CUDA device, got ", syn0.device(), " and ",
                    syn1neg.device());
  TORCH_CHECK_VALUE(syn0.dim() == 2 && syn0.sizes() == syn1neg.sizes() && syn0.size(0) > 0 && syn0.size(1) > 0,
                    "word2vec (CUDA): syn0 and syn1neg must be (vocab, dim) with the same shape, got ", syn0.sizes(),
                    " and ", syn1neg.sizes());
  TORCH_CHECK_VALUE(syn0.is_contiguous() && syn1neg.is_contiguous(),
                    "word2vec (CUDA): syn0 and syn1neg must be contiguous");
  TORCH_CHECK_VALUE(syn0.size(0) <= std::numeric_limits<int32_t>::max() &&
                        syn0.size(1) <= std::numeric_limits<int32_t>::max(),
                    "word2vec (CUDA): vocab and dim must each be < 2^31, got ", syn0.sizes());
}

void check_vector(const at::Tensor& t, const at::Device& device, at::ScalarType dtype, const char* name,
                  const char* what) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "word2vec (CUDA): ", name, " must be ", what, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device, "word2vec (CUDA): ", name, " must be on ", device, " with syn0, got ",
                    t.device());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), "word2vec (CUDA): ", name, " must be a contiguous 1-D tensor");
}

// The per-warp scratch must stay bounded (and its sizes in range) before make_layout.
void check_layout_size(bool skip_gram, int64_t dim, int64_t window, int64_t negative, int64_t max_len) {
  const double k = max_len <= 1 ? 0.0 : std::min(2.0 * std::min<double>(window, max_len), max_len - 1.0);
  const double t = skip_gram ? negative + 1.0 : 0.0;
  const double words = (skip_gram ? (k + t) * dim + k * t : 2.0 * dim) + k + t + 8;
  TORCH_CHECK_VALUE(words * 4 <= kMaxScratchPerWarp, "word2vec (CUDA): window ", window, ", negative ", negative,
                    ", dim ", dim, " and the longest sentence (", max_len, " words) need ", words * 4 / (1 << 20),
                    " MiB of scratch per warp, more than ", kMaxScratchPerWarp >> 20, " MiB");
}

struct TrainLaunch {
  int warps_per_block = 4;
  int64_t blocks = 0;
  size_t smem = 0;
};

// The warps per block (8, 4, 2, 1) that keep the most warps resident per SM
// with their shared scratch; ties go to the larger block. blocks = 0: none fits.
template <bool kSkipGram>
TrainLaunch plan_shared(const Layout& l, int sms, int64_t optin, int64_t pieces) {
  auto kernel = train_kernel<kSkipGram, true>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(optin)));
  // All the shared memory the SM has: warps resident matter more than L1,
  // which the model rows bypass (ld.global.cg) anyway.
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
  TrainLaunch best;
  int64_t best_warps = 0;
  for (int w : {8, 4, 2, 1}) {
    const int64_t smem = w * l.words * 4;
    if (smem > optin) continue;
    int blocks_per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, w * kWarp, smem));
    if (static_cast<int64_t>(blocks_per_sm) * w > best_warps) {
      best_warps = static_cast<int64_t>(blocks_per_sm) * w;
      best.warps_per_block = w;
      best.smem = static_cast<size_t>(smem);
    }
  }
  if (best_warps == 0) return best;
  const int64_t warps = std::min<int64_t>(pieces, best_warps * sms);
  best.blocks = (warps + best.warps_per_block - 1) / best.warps_per_block;
  return best;
}

template <bool kSkipGram>
TrainLaunch plan_global(const Layout& l, int sms, int64_t pieces) {
  TrainLaunch plan;
  plan.warps_per_block = 4;
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, train_kernel<kSkipGram, false>,
                                                               plan.warps_per_block * kWarp, 0));
  const int64_t resident = std::max<int64_t>(1, static_cast<int64_t>(blocks_per_sm) * plan.warps_per_block * sms);
  const int64_t affordable = std::max<int64_t>(1, kGlobalScratchBudget / (l.words * 4));
  const int64_t warps = std::min({pieces, resident, affordable});
  plan.blocks = (warps + plan.warps_per_block - 1) / plan.warps_per_block;
  return plan;
}

template <bool kSkipGram>
void launch_train(Params p, const at::TensorOptions& float_options, cudaStream_t stream) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int sms = prop->multiProcessorCount;
  const int64_t optin = static_cast<int64_t>(prop->sharedMemPerBlockOptin);
  const TrainLaunch plan = p.layout.words * 4 <= std::min(kMaxSharedPerWarp, optin)
                               ? plan_shared<kSkipGram>(p.layout, sms, optin, p.pieces)
                               : TrainLaunch{};
  if (plan.blocks > 0) {
    train_kernel<kSkipGram, true><<<static_cast<unsigned>(plan.blocks), plan.warps_per_block * kWarp, plan.smem,
                                    stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const TrainLaunch global = plan_global<kSkipGram>(p.layout, sms, p.pieces);
  // Kept alive to the end of the call: the caller synchronises before returning,
  // and the caching allocator orders reuse on this stream anyway.
  const at::Tensor scratch = at::empty({global.blocks * global.warps_per_block * p.layout.words}, float_options);
  p.scratch = scratch.data_ptr<float>();
  train_kernel<kSkipGram, false><<<static_cast<unsigned>(global.blocks), global.warps_per_block * kWarp, 0, stream>>>(
      p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

ChunkStats train_chunk_cuda(at::Tensor syn0, at::Tensor syn1neg, const at::Tensor& ids, const at::Tensor& offsets,
                            const at::Tensor& keep, const at::Tensor& cum_table, int64_t window, int64_t negative,
                            double alpha_start, double alpha_end, uint64_t seed, bool skip_gram, bool cbow_mean,
                            bool compute_loss) {
  check_model(syn0, syn1neg);
  const at::Device device = syn0.device();
  const int64_t vocab = syn0.size(0), dim = syn0.size(1);
  check_vector(ids, device, at::kInt, "ids", "int32");
  check_vector(offsets, device, at::kLong, "offsets", "int64 (sentence starts plus the end)");
  check_vector(keep, device, at::kInt, "keep", "int32 thresholds");
  check_vector(cum_table, device, at::kInt, "cum_table", "int32 (values < 2^31)");
  TORCH_CHECK_VALUE(offsets.numel() >= 1, "word2vec (CUDA): offsets must hold the sentence starts plus the end");
  TORCH_CHECK_VALUE(keep.numel() == vocab, "word2vec (CUDA): keep must have one threshold per vocabulary word (",
                    vocab, "), got ", keep.numel());
  TORCH_CHECK_VALUE(cum_table.numel() == vocab, "word2vec (CUDA): cum_table must have one entry per vocabulary word (",
                    vocab, "), got ", cum_table.numel());
  TORCH_CHECK_VALUE(window >= 1, "word2vec (CUDA): window must be >= 1, got ", window);
  TORCH_CHECK_VALUE(negative >= 1 && negative < (int64_t{1} << 30),
                    "word2vec (CUDA): negative must be >= 1 (negative sampling), got ", negative);
  TORCH_CHECK_VALUE(alpha_start >= 0 && alpha_end >= 0, "word2vec (CUDA): learning rates must be >= 0");
  const c10::cuda::CUDAGuard guard(device);

  // The data-dependent checks (the CPU trainer's) in one round trip: id range,
  // offsets' ends and monotonicity, the longest sentence, the noise total.
  const int64_t n = ids.numel();
  const int64_t sentences = offsets.numel() - 1;
  std::vector<at::Tensor> parts;
  if (n > 0) {
    const auto [lo, hi] = at::aminmax(ids);
    parts.push_back(lo.reshape({1}).to(at::kLong));
    parts.push_back(hi.reshape({1}).to(at::kLong));
  }
  parts.push_back(offsets.narrow(0, 0, 1));
  parts.push_back(offsets.narrow(0, sentences, 1));
  if (sentences > 0) {
    const at::Tensor lengths = offsets.narrow(0, 1, sentences) - offsets.narrow(0, 0, sentences);
    const auto [shortest, longest] = at::aminmax(lengths);
    parts.push_back(shortest.reshape({1}));
    parts.push_back(longest.reshape({1}));
  }
  parts.push_back(cum_table.narrow(0, vocab - 1, 1).to(at::kLong));
  const at::Tensor facts = at::cat(parts).cpu();
  const int64_t* f = facts.const_data_ptr<int64_t>();
  if (n > 0) {
    TORCH_CHECK_VALUE(f[0] >= 0 && f[1] < vocab, "word2vec (CUDA): ids holds ids outside [0, ", vocab, ")");
    f += 2;
  }
  TORCH_CHECK_VALUE(f[0] == 0 && f[1] == n, "word2vec (CUDA): offsets must start at 0 and end at ", n, ", got ", f[0],
                    " and ", f[1]);
  f += 2;
  int64_t max_len = 0;
  if (sentences > 0) {
    TORCH_CHECK_VALUE(f[0] >= 0, "word2vec (CUDA): offsets must be non-decreasing");
    max_len = f[1];
    f += 2;
  }
  TORCH_CHECK_VALUE(f[0] > 0, "word2vec (CUDA): cum_table's total weight must be positive");
  TORCH_CHECK_VALUE(max_len < std::numeric_limits<int32_t>::max(), "word2vec (CUDA): a sentence of ", max_len,
                    " words is too long (the trainer splits at 2^31 - 1; Python cuts lines at 10000)");

  ChunkStats result;
  if (n == 0) return result;
  check_layout_size(skip_gram, dim, window, negative, max_len);

  Params p{};
  p.syn0 = syn0.data_ptr<float>();
  p.syn1neg = syn1neg.data_ptr<float>();
  p.ids = ids.const_data_ptr<int32_t>();
  p.offsets = offsets.const_data_ptr<int64_t>();
  p.keep = reinterpret_cast<const uint32_t*>(keep.const_data_ptr<int32_t>());
  p.cum = reinterpret_cast<const uint32_t*>(cum_table.const_data_ptr<int32_t>());
  const at::TensorOptions int_options = ids.options();
  const at::Tensor compact = at::empty({n}, int_options);
  const at::Tensor kept = at::empty({sentences}, int_options);
  const at::Tensor stats = at::zeros({4}, int_options.dtype(at::kLong));  // DeviceStats, loss 0.0
  const at::Tensor guide = at::empty({vocab}, int_options);
  p.guide = guide.data_ptr<int32_t>();
  p.compact = compact.data_ptr<int32_t>();
  p.kept = kept.data_ptr<int32_t>();
  p.stats = reinterpret_cast<DeviceStats*>(stats.data_ptr<int64_t>());
  p.n = n;
  p.sentences = sentences;
  p.pieces = (n + kPiece - 1) / kPiece;
  p.window = window;
  p.negative = negative;
  p.layout = make_layout(skip_gram, dim, window, negative, max_len);
  p.vocab = static_cast<int32_t>(vocab);
  p.dim = static_cast<int32_t>(dim);
  p.alpha_start = alpha_start;
  p.alpha_end = alpha_end;
  p.inv_n = 1.0 / static_cast<double>(n);
  p.key_keep = mix64(seed + kGolden);
  p.key_centre = mix64(seed + 2 * kGolden);
  p.cbow_mean = cbow_mean;
  p.compute_loss = compute_loss;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t sub_warps = kSubsampleThreads / kWarp;
  const int64_t sub_blocks = std::clamp<int64_t>((sentences + sub_warps - 1) / sub_warps, 1, int64_t{sms} * 32);
  subsample_kernel<<<static_cast<unsigned>(sub_blocks), kSubsampleThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (p.layout.kmax > 0) {  // else no sentence has two words: no window to train
    constexpr int kGuideThreads = 256;
    guide_kernel<<<static_cast<unsigned>((vocab + kGuideThreads - 1) / kGuideThreads), kGuideThreads, 0, stream>>>(
        p.cum, p.vocab, guide.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (skip_gram) {
      launch_train<true>(p, syn0.options(), stream);
    } else {
      launch_train<false>(p, syn0.options(), stream);
    }
  }

  const at::Tensor host = stats.cpu();  // synchronises the stream
  DeviceStats s;
  static_assert(sizeof(DeviceStats) == 4 * sizeof(int64_t), "DeviceStats is the int64 x 4 buffer");
  std::memcpy(&s, host.const_data_ptr<int64_t>(), sizeof(s));
  result.raw_words = n;
  result.trained_words = static_cast<int64_t>(s.trained_words);
  result.examples = static_cast<int64_t>(s.examples);
  result.loss = s.loss;
  return result;
}

}  // namespace llmkit::word2vec
