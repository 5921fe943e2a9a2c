// The CPU word2vec trainer (conventions in word2vec.h): skip-gram or CBOW with
// negative sampling over one chunk of an integer-coded corpus, `workers`
// std::threads with the GIL released, Hogwild updates of syn0 / syn1neg.
// Python (llmkit.embeddings.word2vec) streams the corpus in chunks and owns
// the vocabulary, the subsampling probabilities and the noise table.
//
// Threads split the chunk's sentences by word count; each keeps word2vec.c's
// per-thread state (generator, buffers) and refreshes the learning rate from a
// shared word counter every kAlphaRefresh words, as word2vec.c does. With one
// worker and a seed, training is deterministic.
// The project builds with -ffp-contract=off (the NF4 format's rounding needs
// it); nothing here is bit-exact by definition, so let dot/axpy use FMA.
#pragma GCC optimize("fp-contract=fast")

#include <ATen/ATen.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#include "common/cpu_features.h"
#include "word2vec/word2vec.h"
#ifdef LLMKIT_WITH_CUDA
#include "word2vec/sgns_cuda.h"
#endif

namespace llmkit::word2vec {
namespace {

constexpr int64_t kAlphaRefresh = 10000;

#define LLMKIT_W2V_INLINE inline __attribute__((always_inline))

// Dot and axpy over one embedding row: vectorised by the compiler for the
// ISA of the function they are inlined into (AVX2 or baseline; see below).
LLMKIT_W2V_INLINE float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

LLMKIT_W2V_INLINE void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Eight floats as one value (GCC vector extension): AVX registers in the AVX2
// build, pairs of SSE registers in the baseline one. Unaligned, may alias.
typedef float F8 __attribute__((vector_size(32), aligned(4), may_alias));
typedef float F4 __attribute__((vector_size(16), aligned(4), may_alias));

LLMKIT_W2V_INLINE float hsum(F8 v) {
  const F4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const F4 b = a + __builtin_shufflevector(a, a, 2, 3, 0, 1);
  return b[0] + b[1];
}

// out[r] = a . rows[r] for r < 3 in one pass over a (three accumulators: the
// row of `a` is loaded once, and the three sums do not wait on each other).
LLMKIT_W2V_INLINE void dot3(const float* a, const float* r0, const float* r1, const float* r2, int64_t n, float* out) {
  F8 s0 = {}, s1 = {}, s2 = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const F8 x = *reinterpret_cast<const F8*>(a + i);
    s0 += x * *reinterpret_cast<const F8*>(r0 + i);
    s1 += x * *reinterpret_cast<const F8*>(r1 + i);
    s2 += x * *reinterpret_cast<const F8*>(r2 + i);
  }
  float t0 = hsum(s0), t1 = hsum(s1), t2 = hsum(s2);
  for (; i < n; ++i) {
    t0 += a[i] * r0[i];
    t1 += a[i] * r1[i];
    t2 += a[i] * r2[i];
  }
  out[0] = t0;
  out[1] = t1;
  out[2] = t2;
}

// y += sum_r coef[r] * rows[r], each element of y read and written once.
LLMKIT_W2V_INLINE void add_combination(float* y, const float* const* rows, const float* coef, int64_t count,
                                       int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    F8 acc = *reinterpret_cast<const F8*>(y + i);
    for (int64_t r = 0; r < count; ++r) acc += coef[r] * *reinterpret_cast<const F8*>(rows[r] + i);
    *reinterpret_cast<F8*>(y + i) = acc;
  }
  for (; i < n; ++i) {
    float acc = y[i];
    for (int64_t r = 0; r < count; ++r) acc += coef[r] * rows[r][i];
    y[i] = acc;
  }
}

struct Model {
  float* syn0;
  float* syn1neg;
  int64_t vocab;
  int64_t dim;
};

struct Noise {
  const uint32_t* cum;  // cumulative unigram^0.75 weights, scaled to < 2^31 (gensim's cum_table)
  int64_t size;
  // Chen & Asau's guide table: guide[b] is the answer for the smallest draw of
  // bucket b = r * size / total, so a draw scans forward from there (about one
  // step) instead of a 16-step binary search of dependent, mispredicted loads.
  // The result is exactly upper_bound's.
  const int32_t* guide = nullptr;

  LLMKIT_W2V_INLINE int32_t sample(Lcg& rng) const {
    const uint32_t total = cum[size - 1];
    const uint32_t r = rng.bits32() % total;
    if (guide == nullptr) return static_cast<int32_t>(std::upper_bound(cum, cum + size, r) - cum);
    int64_t i = guide[static_cast<uint64_t>(r) * static_cast<uint64_t>(size) / total];
    while (cum[i] <= r) ++i;
    return static_cast<int32_t>(i);
  }
};

std::vector<int32_t> make_guide(const uint32_t* cum, int64_t size) {
  std::vector<int32_t> guide(size);
  const uint64_t total = cum[size - 1];
  int64_t i = 0;
  for (int64_t b = 0; b < size; ++b) {
    const uint64_t r_min = (static_cast<uint64_t>(b) * total + size - 1) / size;  // ceil(b * total / size)
    while (i < size - 1 && cum[i] <= r_min) ++i;
    guide[b] = static_cast<int32_t>(i);
  }
  return guide;
}

struct Settings {
  int64_t window;
  int64_t negative;
  double alpha_start;
  double alpha_end;
  bool skip_gram;
  bool cbow_mean;
  bool compute_loss;
  bool shared_negatives;  // skip-gram: one draw of negatives per window (pWord2Vec's HogBatch)
};

struct Stats {
  int64_t raw_words = 0;
  int64_t trained_words = 0;
  int64_t examples = 0;  // (input, target) pairs with label 1
  double loss = 0.0;
};

// One negative-sampling step: input row `l1` predicts `word` (label 1) and
// `negative` noise words (label 0); gradients accumulate into neu1e (for the
// input row, applied by the caller) and go straight into syn1neg. Noise words
// equal to `word` are skipped, as in word2vec.c. `given` replaces the draws
// (tests compare one step with a float64 reference).
LLMKIT_W2V_INLINE void negative_sampling_step(const Model& m, const float* l1, int32_t word, float alpha,
                                              int64_t negative, const Noise& noise, Lcg& rng,
                                              const int32_t* given, float* neu1e, bool compute_loss,
                                              double& loss) {
  const int64_t D = m.dim;
  for (int64_t d = 0; d <= negative; ++d) {
    int32_t target;
    float label;
    if (d == 0) {
      target = word;
      label = 1.0f;
    } else {
      target = given != nullptr ? given[d - 1] : noise.sample(rng);
      if (target == word) continue;
      label = 0.0f;
    }
    float* l2 = m.syn1neg + static_cast<int64_t>(target) * D;
    const float f = dot(l1, l2, D);
    float sig;
    if (f > kMaxExp) {
      sig = 1.0f;
    } else if (f < -kMaxExp) {
      sig = 0.0f;
    } else {
      sig = 1.0f / (1.0f + std::exp(-f));
    }
    if (compute_loss) {  // -log sigma(f) for the word, -log sigma(-f) for noise, clipped like sig
      const float z = label > 0.0f ? f : -f;
      loss += z > kMaxExp ? 0.0 : (z < -kMaxExp ? static_cast<double>(-z) : std::log1p(std::exp(-static_cast<double>(z))));
    }
    const float g = (label - sig) * alpha;
    axpy(g, l2, neu1e, D);
    axpy(g, l1, l2, D);
  }
}

// Skip-gram with the window's negatives shared (Ji et al., pWord2Vec /
// HogBatch): the k context rows of the window all predict `word` against the
// same `negative` noise words, so the update is three small matrix products
// (scores S = In Out^T, then dIn = G Out and dOut = G^T In with
// G = alpha (label - sigma(S))) instead of k separate dot/axpy sweeps that
// each re-read the output rows. All contexts see the rows as they were when
// the window started (the classic loop updates them between contexts): dOut
// is computed into a buffer before any input row changes, and the input rows
// are updated before any output row changes, so no row needs a copy.
struct WindowBuffers {
  std::vector<float> d_out, g, scores, column;
  std::vector<int32_t> targets;
  std::vector<const float*> rows;
  void resize(int64_t max_context, int64_t max_targets, int64_t dim) {
    d_out.resize(max_targets * dim);
    g.resize(max_context * max_targets);
    scores.resize(max_targets + 2);  // dot3 writes whole groups of three
    column.resize(max_context);
    targets.resize(max_targets);
    rows.resize(std::max(max_context, max_targets));
  }
};

LLMKIT_W2V_INLINE void shared_negatives_window(const Model& m, const int32_t* context, int64_t k, int32_t word,
                                               float alpha, int64_t negative, const Noise& noise, Lcg& rng,
                                               const int32_t* given, WindowBuffers& b, bool compute_loss,
                                               double& loss) {
  const int64_t D = m.dim;
  int64_t t = 0;
  b.targets[t++] = word;
  for (int64_t d = 0; d < negative; ++d) {
    const int32_t n = given != nullptr ? given[d] : noise.sample(rng);
    if (n != word) b.targets[t++] = n;
  }
  auto in_row = [&](int64_t i) { return m.syn0 + static_cast<int64_t>(context[i]) * D; };
  auto out_row = [&](int64_t j) { return m.syn1neg + static_cast<int64_t>(b.targets[j]) * D; };
  float* g = b.g.data();  // (k, t) row-major
  for (int64_t i = 0; i < k; ++i) {
    const float* in = in_row(i);
    for (int64_t j = 0; j < t; j += 3) {  // three targets per pass; a short group repeats its last row
      const float* r0 = out_row(j);
      const float* r1 = j + 1 < t ? out_row(j + 1) : r0;
      const float* r2 = j + 2 < t ? out_row(j + 2) : r1;
      dot3(in, r0, r1, r2, D, &b.scores[j]);
    }
    for (int64_t j = 0; j < t; ++j) {
      const float f = b.scores[j];
      const float label = j == 0 ? 1.0f : 0.0f;
      const float sig = f > kMaxExp ? 1.0f : (f < -kMaxExp ? 0.0f : 1.0f / (1.0f + std::exp(-f)));
      if (compute_loss) {
        const float z = j == 0 ? f : -f;
        loss += z > kMaxExp ? 0.0 : (z < -kMaxExp ? static_cast<double>(-z) : std::log1p(std::exp(-static_cast<double>(z))));
      }
      g[i * t + j] = (label - sig) * alpha;
    }
  }
  // dOut_j = sum_i G_ij In_i, from the input rows before they change.
  for (int64_t i = 0; i < k; ++i) b.rows[i] = in_row(i);
  for (int64_t j = 0; j < t; ++j) {
    float* d_out = &b.d_out[j * D];
    std::fill(d_out, d_out + D, 0.0f);
    for (int64_t i = 0; i < k; ++i) b.column[i] = g[i * t + j];
    add_combination(d_out, b.rows.data(), b.column.data(), k, D);
  }
  // In_i += sum_j G_ij Out_j, from the output rows before they change.
  for (int64_t j = 0; j < t; ++j) b.rows[j] = out_row(j);
  for (int64_t i = 0; i < k; ++i) add_combination(m.syn0 + static_cast<int64_t>(context[i]) * D, b.rows.data(),
                                                  &g[i * t], t, D);
  for (int64_t j = 0; j < t; ++j) axpy(1.0f, &b.d_out[j * D], out_row(j), D);
}

struct Corpus {
  const int32_t* ids;
  const int64_t* offsets;  // sentence s is ids[offsets[s] .. offsets[s + 1])
};

// The body of one worker over sentences [s0, s1); inlined into an AVX2 and a
// baseline build of the same code so dot/axpy vectorise for the CPU at hand.
LLMKIT_W2V_INLINE void train_sentences_body(const Model& m, const Corpus& c, const uint32_t* keep, const Noise& noise,
                                            const Settings& s, int64_t s0, int64_t s1, uint64_t seed,
                                            std::atomic<int64_t>& words_done, int64_t total_words, Stats& stats) {
  Lcg rng(seed);
  const int64_t D = m.dim;
  std::vector<int32_t> sentence;
  std::vector<float> neu1(D), neu1e(D);
  std::vector<int32_t> context(2 * s.window);
  WindowBuffers window_buffers;
  window_buffers.resize(2 * s.window, s.negative + 1, D);
  double alpha = s.alpha_start;
  int64_t since_refresh = 0;
  auto refresh_alpha = [&] {
    const int64_t done = words_done.fetch_add(since_refresh, std::memory_order_relaxed) + since_refresh;
    since_refresh = 0;
    const double progress = total_words > 0 ? std::min(1.0, static_cast<double>(done) / total_words) : 1.0;
    alpha = s.alpha_start - (s.alpha_start - s.alpha_end) * progress;
  };
  for (int64_t si = s0; si < s1; ++si) {
    // Subsample first (word2vec.c): dropped words leave the window entirely.
    sentence.clear();
    for (int64_t i = c.offsets[si]; i < c.offsets[si + 1]; ++i) {
      const int32_t w = c.ids[i];
      if (keep[w] != UINT32_MAX && rng.bits32() >= keep[w]) continue;
      sentence.push_back(w);
    }
    const int64_t raw = c.offsets[si + 1] - c.offsets[si];
    stats.raw_words += raw;
    stats.trained_words += static_cast<int64_t>(sentence.size());
    since_refresh += raw;
    if (since_refresh >= kAlphaRefresh) refresh_alpha();
    const float a = static_cast<float>(alpha);
    const int64_t n = static_cast<int64_t>(sentence.size());
    for (int64_t pos = 0; pos < n; ++pos) {
      const int32_t word = sentence[pos];
      const int64_t b = static_cast<int64_t>(rng.next() % static_cast<uint64_t>(s.window));
      const int64_t lo = std::max<int64_t>(0, pos - s.window + b), hi = std::min<int64_t>(n - 1, pos + s.window - b);
      if (s.skip_gram && s.shared_negatives) {
        int64_t k = 0;
        for (int64_t ci = lo; ci <= hi; ++ci) {
          if (ci != pos) context[k++] = sentence[ci];
        }
        if (k == 0) continue;
        shared_negatives_window(m, context.data(), k, word, a, s.negative, noise, rng, nullptr, window_buffers,
                                s.compute_loss, stats.loss);
        stats.examples += k;
      } else if (s.skip_gram) {
        for (int64_t ci = lo; ci <= hi; ++ci) {
          if (ci == pos) continue;
          float* l1 = m.syn0 + static_cast<int64_t>(sentence[ci]) * D;
          std::fill(neu1e.begin(), neu1e.end(), 0.0f);
          negative_sampling_step(m, l1, word, a, s.negative, noise, rng, nullptr, neu1e.data(), s.compute_loss,
                                 stats.loss);
          axpy(1.0f, neu1e.data(), l1, D);
          ++stats.examples;
        }
      } else {
        std::fill(neu1.begin(), neu1.end(), 0.0f);
        int64_t count = 0;
        for (int64_t ci = lo; ci <= hi; ++ci) {
          if (ci == pos) continue;
          axpy(1.0f, m.syn0 + static_cast<int64_t>(sentence[ci]) * D, neu1.data(), D);
          ++count;
        }
        if (count == 0) continue;
        if (s.cbow_mean) {
          const float inv = 1.0f / static_cast<float>(count);
          for (float& v : neu1) v *= inv;
        }
        std::fill(neu1e.begin(), neu1e.end(), 0.0f);
        negative_sampling_step(m, neu1.data(), word, a, s.negative, noise, rng, nullptr, neu1e.data(),
                               s.compute_loss, stats.loss);
        // word2vec.c's cbow applies the error to every context row as is;
        // gensim divides it by the count when averaging (cbow_mean).
        if (s.cbow_mean) {
          const float inv = 1.0f / static_cast<float>(count);
          for (float& v : neu1e) v *= inv;
        }
        for (int64_t ci = lo; ci <= hi; ++ci) {
          if (ci != pos) axpy(1.0f, neu1e.data(), m.syn0 + static_cast<int64_t>(sentence[ci]) * D, D);
        }
        ++stats.examples;
      }
    }
  }
  words_done.fetch_add(since_refresh, std::memory_order_relaxed);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void train_sentences_avx2(const Model& m, const Corpus& c, const uint32_t* keep,
                                                              const Noise& noise, const Settings& s, int64_t s0,
                                                              int64_t s1, uint64_t seed,
                                                              std::atomic<int64_t>& words_done, int64_t total_words,
                                                              Stats& stats) {
  train_sentences_body(m, c, keep, noise, s, s0, s1, seed, words_done, total_words, stats);
}
#endif

void train_sentences_portable(const Model& m, const Corpus& c, const uint32_t* keep, const Noise& noise,
                              const Settings& s, int64_t s0, int64_t s1, uint64_t seed,
                              std::atomic<int64_t>& words_done, int64_t total_words, Stats& stats) {
  train_sentences_body(m, c, keep, noise, s, s0, s1, seed, words_done, total_words, stats);
}

bool use_avx2() { return llmkit::use_avx2_fma(); }

// ------------------------------------------------------------- checks --

void check_model(const at::Tensor& syn0, const at::Tensor& syn1neg) {
  TORCH_CHECK_TYPE(syn0.scalar_type() == at::kFloat && syn1neg.scalar_type() == at::kFloat,
                   "word2vec: syn0 and syn1neg must be float32");
  TORCH_CHECK_VALUE(syn0.device().is_cpu() && syn1neg.device().is_cpu(), "word2vec: the CPU trainer needs CPU tensors");
  TORCH_CHECK_VALUE(syn0.dim() == 2 && syn0.sizes() == syn1neg.sizes() && syn0.size(0) > 0 && syn0.size(1) > 0,
                    "word2vec: syn0 and syn1neg must be (vocab, dim) with the same shape, got ", syn0.sizes(),
                    " and ", syn1neg.sizes());
  TORCH_CHECK_VALUE(syn0.is_contiguous() && syn1neg.is_contiguous(), "word2vec: syn0 and syn1neg must be contiguous");
}

void check_ids(const at::Tensor& ids, int64_t vocab, const char* name) {
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt, "word2vec: ", name, " must be int32, got ", ids.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 1 && ids.is_contiguous() && ids.device().is_cpu(), "word2vec: ", name,
                    " must be a contiguous 1-D CPU tensor");
  if (ids.numel() > 0) {
    const auto [lo, hi] = at::aminmax(ids);
    TORCH_CHECK_VALUE(lo.item<int32_t>() >= 0 && hi.item<int32_t>() < vocab, "word2vec: ", name,
                      " holds ids outside [0, ", vocab, ")");
  }
}

Noise check_noise(const at::Tensor& cum_table, int64_t vocab) {
  TORCH_CHECK_TYPE(cum_table.scalar_type() == at::kInt || cum_table.scalar_type() == at::kLong,
                   "word2vec: cum_table must be an integer tensor");
  TORCH_CHECK_VALUE(cum_table.device().is_cpu() && cum_table.is_contiguous(),
                    "word2vec: cum_table must be a contiguous CPU tensor");
  TORCH_CHECK_VALUE(cum_table.dim() == 1 && cum_table.numel() == vocab && vocab >= 1,
                    "word2vec: cum_table must have one entry per vocabulary word (", vocab, "), got shape ",
                    cum_table.sizes());
  TORCH_CHECK_VALUE(cum_table.scalar_type() == at::kInt, "word2vec: cum_table must be int32 (values < 2^31)");
  const int32_t* cum = cum_table.const_data_ptr<int32_t>();
  TORCH_CHECK_VALUE(cum[vocab - 1] > 0, "word2vec: cum_table's total weight must be positive");
  return Noise{reinterpret_cast<const uint32_t*>(cum), vocab};
}

// ---------------------------------------------------------- entry points --

py::dict train_chunk(at::Tensor syn0, at::Tensor syn1neg, const at::Tensor& ids, const at::Tensor& offsets,
                     const at::Tensor& keep, const at::Tensor& cum_table, int64_t window, int64_t negative,
                     double alpha_start, double alpha_end, int64_t workers, uint64_t seed, bool skip_gram,
                     bool cbow_mean, bool compute_loss, bool shared_negatives) {
  check_model(syn0, syn1neg);
  const int64_t vocab = syn0.size(0);
  check_ids(ids, vocab, "ids");
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "word2vec: offsets must be int64");
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1 && offsets.is_contiguous() && offsets.device().is_cpu(),
                    "word2vec: offsets must be a contiguous 1-D CPU tensor of sentence starts plus the end");
  TORCH_CHECK_VALUE(keep.scalar_type() == at::kInt && keep.numel() == vocab && keep.is_contiguous() &&
                        keep.device().is_cpu(),
                    "word2vec: keep must be int32 thresholds on the CPU, one per vocabulary word");
  Noise noise = check_noise(cum_table, vocab);
  const std::vector<int32_t> guide = make_guide(noise.cum, noise.size);
  noise.guide = guide.data();
  TORCH_CHECK_VALUE(window >= 1, "word2vec: window must be >= 1, got ", window);
  TORCH_CHECK_VALUE(negative >= 1, "word2vec: negative must be >= 1 (negative sampling), got ", negative);
  TORCH_CHECK_VALUE(workers >= 1 && workers <= kMaxWorkers, "word2vec: workers must be in [1, ", kMaxWorkers,
                    "], got ", workers);
  TORCH_CHECK_VALUE(alpha_start >= 0 && alpha_end >= 0, "word2vec: learning rates must be >= 0");
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  const int64_t sentences = offsets.numel() - 1;
  TORCH_CHECK_VALUE(off[0] == 0 && off[sentences] == ids.numel(), "word2vec: offsets must start at 0 and end at ",
                    ids.numel());
  for (int64_t s = 0; s < sentences; ++s) {
    TORCH_CHECK_VALUE(off[s] <= off[s + 1], "word2vec: offsets must be non-decreasing");
  }

  const Model model{syn0.data_ptr<float>(), syn1neg.data_ptr<float>(), vocab, syn0.size(1)};
  const Corpus corpus{ids.const_data_ptr<int32_t>(), off};
  const uint32_t* keep_thresholds = reinterpret_cast<const uint32_t*>(keep.const_data_ptr<int32_t>());
  const Settings settings{window, negative, alpha_start, alpha_end, skip_gram, cbow_mean, compute_loss,
                          shared_negatives};
  const int64_t total = ids.numel();
  std::atomic<int64_t> words_done{0};

  // Split the sentences into `workers` ranges of about equal word counts.
  std::vector<int64_t> bounds{0};
  for (int64_t t = 1; t < workers; ++t) {
    const int64_t target = total * t / workers;
    bounds.push_back(std::lower_bound(off, off + sentences + 1, target) - off);
  }
  bounds.push_back(sentences);
  std::vector<Stats> stats(workers);
  const bool avx2 = use_avx2();
  {
    py::gil_scoped_release no_gil;
    auto work = [&](int64_t t) {
      const uint64_t thread_seed = seed + static_cast<uint64_t>(t) * 0x9E3779B97F4A7C15ULL;
#if defined(__x86_64__)
      if (avx2) {
        return train_sentences_avx2(model, corpus, keep_thresholds, noise, settings, bounds[t], bounds[t + 1],
                                    thread_seed, words_done, total, stats[t]);
      }
#endif
      train_sentences_portable(model, corpus, keep_thresholds, noise, settings, bounds[t], bounds[t + 1], thread_seed,
                               words_done, total, stats[t]);
    };
    run_threads(workers, work);  // an exception in a worker (bad_alloc) is rethrown here, not terminate()
  }
  Stats sum;
  for (const Stats& s : stats) {
    sum.raw_words += s.raw_words;
    sum.trained_words += s.trained_words;
    sum.examples += s.examples;
    sum.loss += s.loss;
  }
  py::dict out;
  out["raw_words"] = sum.raw_words;
  out["trained_words"] = sum.trained_words;
  out["examples"] = sum.examples;
  out["loss"] = sum.loss;
  return out;
}

// One skip-gram negative-sampling step with given noise words (no draws), for tests.
double sgns_step(at::Tensor syn0, at::Tensor syn1neg, int64_t context, int64_t word, const at::Tensor& noise_words,
                 double alpha) {
  check_model(syn0, syn1neg);
  const int64_t vocab = syn0.size(0);
  check_ids(noise_words, vocab, "noise_words");
  TORCH_CHECK_VALUE(context >= 0 && context < vocab && word >= 0 && word < vocab, "word2vec: ids outside [0, ", vocab,
                    ")");
  const Model m{syn0.data_ptr<float>(), syn1neg.data_ptr<float>(), vocab, syn0.size(1)};
  std::vector<float> neu1e(m.dim, 0.0f);
  float* l1 = m.syn0 + context * m.dim;
  Lcg rng(0);
  const Noise unused{nullptr, 0};
  double loss = 0.0;
  negative_sampling_step(m, l1, static_cast<int32_t>(word), static_cast<float>(alpha), noise_words.numel(), unused, rng,
                         noise_words.const_data_ptr<int32_t>(), neu1e.data(), true, loss);
  axpy(1.0f, neu1e.data(), l1, m.dim);
  return loss;
}

// One skip-gram window with shared negatives (given), for tests.
double sgns_window_step(at::Tensor syn0, at::Tensor syn1neg, const at::Tensor& context, int64_t word,
                        const at::Tensor& noise_words, double alpha) {
  check_model(syn0, syn1neg);
  const int64_t vocab = syn0.size(0);
  check_ids(context, vocab, "context");
  check_ids(noise_words, vocab, "noise_words");
  TORCH_CHECK_VALUE(word >= 0 && word < vocab && context.numel() >= 1, "word2vec: bad word or empty context");
  const Model m{syn0.data_ptr<float>(), syn1neg.data_ptr<float>(), vocab, syn0.size(1)};
  WindowBuffers b;
  b.resize(context.numel(), noise_words.numel() + 1, m.dim);
  Lcg rng(0);
  const Noise unused{nullptr, 0};
  double loss = 0.0;
  shared_negatives_window(m, context.const_data_ptr<int32_t>(), context.numel(), static_cast<int32_t>(word),
                          static_cast<float>(alpha), noise_words.numel(), unused, rng,
                          noise_words.const_data_ptr<int32_t>(), b, true, loss);
  return loss;
}

// `n` draws of the noise distribution (tests check it statistically).
at::Tensor sample_noise(const at::Tensor& cum_table, int64_t n, uint64_t seed) {
  Noise noise = check_noise(cum_table, cum_table.numel());
  const std::vector<int32_t> guide = make_guide(noise.cum, noise.size);
  noise.guide = guide.data();
  at::Tensor out = at::empty({n}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  Lcg rng(seed);
  for (int64_t i = 0; i < n; ++i) o[i] = noise.sample(rng);
  return out;
}

}  // namespace

void bind(py::module_& m) {
  auto w2v = m.def_submodule("word2vec", "word2vec trainer (CPU threads, GIL released)");
  w2v.def("train_chunk", &train_chunk, py::arg("syn0"), py::arg("syn1neg"), py::arg("ids"), py::arg("offsets"),
          py::arg("keep"), py::arg("cum_table"), py::arg("window"), py::arg("negative"), py::arg("alpha_start"),
          py::arg("alpha_end"), py::arg("workers"), py::arg("seed"), py::arg("skip_gram") = true,
          py::arg("cbow_mean") = true, py::arg("compute_loss") = false, py::arg("shared_negatives") = false,
          "Train syn0 / syn1neg in place on one corpus chunk; returns word and example counts and the loss sum");
  w2v.def("sgns_step", &sgns_step, py::arg("syn0"), py::arg("syn1neg"), py::arg("context"), py::arg("word"),
          py::arg("noise_words"), py::arg("alpha"), "One skip-gram negative-sampling update with given noise words");
  w2v.def("sgns_window_step", &sgns_window_step, py::arg("syn0"), py::arg("syn1neg"), py::arg("context"),
          py::arg("word"), py::arg("noise_words"), py::arg("alpha"),
          "One skip-gram window update with shared negatives (given noise words)");
#ifdef LLMKIT_WITH_CUDA
  w2v.def(
      "train_chunk_cuda",
      [](at::Tensor syn0, at::Tensor syn1neg, const at::Tensor& ids, const at::Tensor& offsets, const at::Tensor& keep,
         const at::Tensor& cum_table, int64_t window, int64_t negative, double alpha_start, double alpha_end,
         uint64_t seed, bool skip_gram, bool cbow_mean, bool compute_loss) {
        ChunkStats stats;
        {
          py::gil_scoped_release no_gil;
          stats = train_chunk_cuda(syn0, syn1neg, ids, offsets, keep, cum_table, window, negative, alpha_start,
                                   alpha_end, seed, skip_gram, cbow_mean, compute_loss);
        }
        py::dict out;
        out["raw_words"] = stats.raw_words;
        out["trained_words"] = stats.trained_words;
        out["examples"] = stats.examples;
        out["loss"] = stats.loss;
        return out;
      },
      py::arg("syn0"), py::arg("syn1neg"), py::arg("ids"), py::arg("offsets"), py::arg("keep"), py::arg("cum_table"),
      py::arg("window"), py::arg("negative"), py::arg("alpha_start"), py::arg("alpha_end"), py::arg("seed"),
      py::arg("skip_gram") = true, py::arg("cbow_mean") = true, py::arg("compute_loss") = false,
      "Train syn0 / syn1neg (CUDA tensors) in place on one corpus chunk (csrc/word2vec/sgns_cuda.cu); skip-gram "
      "shares one draw of negatives per window");
#endif
  w2v.def("sample_noise", &sample_noise, py::arg("cum_table"), py::arg("n"), py::arg("seed"),
          "Draws from the noise distribution given by cum_table");
}

}  // namespace llmkit::word2vec
