// GloVe (Pennington et al. 2014) on the CPU: co-occurrence counting and the
// AdaGrad weighted-least-squares trainer, bound as _C.glove (pybind11, GIL
// released). Python (llmkit.embeddings.glove) owns the vocabulary and streams
// the corpus here chunk by chunk as int32 ids plus sentence offsets.
//
// Conventions are Stanford GloVe's (cooccur.c, glove.c):
//   * a window never crosses a sentence (a line) and out-of-vocabulary words
//     are dropped before windows are formed (they take no position);
//   * for the word at position i and each earlier word at distance d in
//     1..window: X[w_i, w_{i-d}] += 1/d (1 without distance weighting) and,
//     when symmetric, X[w_{i-d}, w_i] += 1/d. (For symmetric=false the row's
//     left context is counted; Stanford's cooccur.c stores that transposed.)
//   * cost per record: 0.5 f(x) (w.c + b_w + b_c - log x)^2 with
//     f(x) = (x / x_max)^alpha, 1 beyond x_max;
//   * AdaGrad as glove.c: with g = lr * f(x) * diff, w -= g c / sqrt(G_w),
//     G_w += (g c)^2 (the learning rate is inside the accumulated square, as in
//     glove.c), the same for c and the biases; G starts at 1. Both vectors are
//     updated from their old values; a record whose diff is not finite is
//     skipped, and vectors (biases) whose update is not finite stay as they
//     are while G still accumulates (glove.c's nan / inf checks). Newer
//     glove.c also clips each gradient component to +-100: not done here.
//   * the records are reshuffled before every epoch (glove.c reads one
//     shuffled file every epoch); threads take contiguous slices (Hogwild).
//
// Counting (Stanford's split, in memory): pairs of frequent words go to one
// dense table of doubles, the cells (i, j) with (i+1)(j+1) <= P (ranks from
// 1, so frequent rows are wide and rare rows narrow); P is the largest that
// fits `dense_bytes`. Every other increment becomes an 8-byte record
// (pair key << distance bits | distance) in a per-thread buffer that, when
// full, is radix-sorted on the pair key, reduced to a run of (key, count),
// and merged with earlier runs (log-structured: a run is merged with the
// previous one while it is at least half its size, so merging is n log n).
// Threads own rows (row % workers): each thread scans the whole chunk and
// does the increments of the rows it owns, left and right neighbours, so the
// dense table is shared without locks and, for a given number of workers,
// the counts do not depend on how the corpus was cut into chunks (buffers
// flush when full, not at chunk ends).
// Memory: dense_bytes + workers * 16 * buffer_records + about 12 bytes per
// distinct sparse pair (the runs; up to 2-3x that at peak, while a pair sits in
// several runs and a merge holds both inputs and its output) + the result.
//
// The project builds with -ffp-contract=off (for NF4); nothing here is
// bit-exact by definition, so let the dot products use FMA.
#pragma GCC optimize("fp-contract=fast")

#include <ATen/ATen.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/cpu_features.h"
#include "word2vec/word2vec.h"

namespace llmkit::word2vec {
namespace {

#define LLMKIT_GLOVE_INLINE inline __attribute__((always_inline))

int bit_width(uint64_t x) { return x == 0 ? 0 : 64 - __builtin_clzll(x); }

// ============================================================== counting ==

struct Run {  // sorted distinct pair keys (row * vocab + col) and their counts
  std::vector<uint64_t> keys;
  std::vector<float> values;
};

Run merge_runs(const Run& a, const Run& b) {
  Run out;
  out.keys.reserve(a.keys.size() + b.keys.size());
  out.values.reserve(a.keys.size() + b.keys.size());
  size_t i = 0, j = 0;
  while (i < a.keys.size() || j < b.keys.size()) {
    if (j == b.keys.size() || (i < a.keys.size() && a.keys[i] < b.keys[j])) {
      out.keys.push_back(a.keys[i]);
      out.values.push_back(a.values[i++]);
    } else if (i == a.keys.size() || b.keys[j] < a.keys[i]) {
      out.keys.push_back(b.keys[j]);
      out.values.push_back(b.values[j++]);
    } else {
      out.keys.push_back(a.keys[i]);
      out.values.push_back(static_cast<float>(static_cast<double>(a.values[i++]) + b.values[j++]));
    }
  }
  return out;
}

// One thread's sparse records and runs.
struct Shard {
  std::vector<uint64_t> buffer, scratch;
  size_t fill = 0;
  std::vector<Run> runs;
};

class CooccurrenceCounter {
 public:
  CooccurrenceCounter(int64_t vocab, int64_t window, bool symmetric, bool distance_weighting, int64_t workers,
                      int64_t dense_bytes, int64_t buffer_records)
      : vocab_(vocab), window_(window), symmetric_(symmetric), workers_(workers) {
    TORCH_CHECK_VALUE(vocab >= 1 && vocab <= INT32_MAX, "glove: vocab must be in [1, 2^31), got ", vocab);
    TORCH_CHECK_VALUE(window >= 1, "glove: window must be >= 1, got ", window);
    TORCH_CHECK_VALUE(workers >= 1 && workers <= kMaxWorkers, "glove: workers must be in [1, ", kMaxWorkers, "], got ",
                      workers);
    TORCH_CHECK_VALUE(dense_bytes >= 0, "glove: dense_bytes must be >= 0, got ", dense_bytes);
    TORCH_CHECK_VALUE(buffer_records >= 1, "glove: buffer_records must be >= 1, got ", buffer_records);
    const uint64_t v = static_cast<uint64_t>(vocab);
    pair_bits_ = bit_width(v * v - 1);
    distance_bits_ = bit_width(static_cast<uint64_t>(window));
    TORCH_CHECK_VALUE(pair_bits_ + distance_bits_ <= 64, "glove: vocab ", vocab, " and window ", window,
                      " do not fit a 64-bit record key");
    weight_.resize(window + 1);
    for (int64_t d = 1; d <= window; ++d) weight_[d] = distance_weighting ? 1.0 / static_cast<double>(d) : 1.0;
    buffer_records_ = static_cast<size_t>(buffer_records);
    plan_dense(dense_bytes / static_cast<int64_t>(sizeof(double)));
    if (dense_cells_ > 0) {
      // calloc: pages of the table that are never written are never touched.
      dense_.reset(static_cast<double*>(std::calloc(dense_cells_, sizeof(double))));
      TORCH_CHECK(dense_ != nullptr, "glove: cannot allocate the dense co-occurrence table (", dense_cells_ * 8,
                  " bytes); lower dense_bytes");
    }
    shards_.resize(workers);
  }

  void add(const at::Tensor& ids, const at::Tensor& offsets) {
    TORCH_CHECK_TYPE(ids.scalar_type() == at::kInt, "glove: ids must be int32, got ", ids.scalar_type());
    TORCH_CHECK_VALUE(ids.dim() == 1 && ids.is_contiguous() && ids.device().is_cpu(),
                      "glove: ids must be a contiguous 1-D CPU tensor");
    TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong, "glove: offsets must be int64, got ", offsets.scalar_type());
    TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.numel() >= 1 && offsets.is_contiguous() && offsets.device().is_cpu(),
                      "glove: offsets must be a contiguous 1-D CPU tensor of sentence starts plus the end");
    const int64_t n = ids.numel(), sentences = offsets.numel() - 1;
    const int64_t* off = offsets.const_data_ptr<int64_t>();
    TORCH_CHECK_VALUE(off[0] == 0 && off[sentences] == n, "glove: offsets must start at 0 and end at ", n,
                      " (the number of ids), got ", off[0], " and ", off[sentences]);
    for (int64_t s = 0; s < sentences; ++s) {
      TORCH_CHECK_VALUE(off[s] <= off[s + 1], "glove: offsets must be non-decreasing");
    }
    if (n > 0) {
      const auto [lo, hi] = at::aminmax(ids);
      TORCH_CHECK_VALUE(lo.item<int32_t>() >= 0 && hi.item<int32_t>() < vocab_, "glove: ids outside [0, ", vocab_,
                        "): min ", lo.item<int32_t>(), ", max ", hi.item<int32_t>());
    }
    const int32_t* id = ids.const_data_ptr<int32_t>();
    py::gil_scoped_release no_gil;
    std::lock_guard<std::mutex> lock(mutex_);  // Python threads may share a counter
    run_threads(workers_, [&](int64_t t) { count_owned(id, off, sentences, t); });
    words_ += n;
  }

  // The counter's lock, taken without holding the GIL: another Python thread
  // may be inside add() (GIL released) and must be able to finish.
  std::unique_lock<std::mutex> lock_without_gil() {
    std::unique_lock<std::mutex> lock(mutex_, std::defer_lock);
    py::gil_scoped_release no_gil;
    lock.lock();
    return lock;
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> result() {
    auto lock = lock_without_gil();
    std::vector<int64_t> row_nnz(vocab_ + 1, 0);
    {
      py::gil_scoped_release no_gil;
      run_threads(workers_, [&](int64_t t) {
        Shard& sh = shards_[t];
        flush(sh);
        while (sh.runs.size() > 1) {
          Run merged = merge_runs(sh.runs[sh.runs.size() - 2], sh.runs.back());
          sh.runs.pop_back();
          sh.runs.back() = std::move(merged);
        }
        for (int64_t r = t; r < vocab_; r += workers_) {
          const double* d = dense_row(r);
          int64_t k = 0;
          for (int64_t c = 0; c < width_[r]; ++c) k += d[c] != 0.0;
          row_nnz[r + 1] = k;
        }
        if (!sh.runs.empty()) {
          for (uint64_t key : sh.runs[0].keys) ++row_nnz[key / static_cast<uint64_t>(vocab_) + 1];
        }
      });
    }
    for (int64_t r = 0; r < vocab_; ++r) row_nnz[r + 1] += row_nnz[r];
    const int64_t total = row_nnz[vocab_];
    at::Tensor rows = at::empty({total}, at::kInt), cols = at::empty({total}, at::kInt);
    at::Tensor values = at::empty({total}, at::kFloat);
    int32_t* ro = rows.data_ptr<int32_t>();
    int32_t* co = cols.data_ptr<int32_t>();
    float* vo = values.data_ptr<float>();
    {
      py::gil_scoped_release no_gil;
      run_threads(workers_, [&](int64_t t) {
        const Run* run = shards_[t].runs.empty() ? nullptr : &shards_[t].runs[0];
        size_t s = 0;
        for (int64_t r = t; r < vocab_; r += workers_) {
          // Dense cells of a row all precede its sparse ones (cols >= width).
          int64_t o = row_nnz[r];
          const double* d = dense_row(r);
          for (int64_t c = 0; c < width_[r]; ++c) {
            if (d[c] != 0.0) {
              ro[o] = static_cast<int32_t>(r);
              co[o] = static_cast<int32_t>(c);
              vo[o++] = static_cast<float>(d[c]);
            }
          }
          const uint64_t row_end = static_cast<uint64_t>(r + 1) * static_cast<uint64_t>(vocab_);
          for (; run != nullptr && s < run->keys.size() && run->keys[s] < row_end; ++s) {
            ro[o] = static_cast<int32_t>(r);
            co[o] = static_cast<int32_t>(run->keys[s] % static_cast<uint64_t>(vocab_));
            vo[o++] = run->values[s];
          }
        }
      });
    }
    return {rows, cols, values};
  }

  int64_t vocab() const { return vocab_; }
  int64_t window() const { return window_; }
  int64_t words() {
    auto lock = lock_without_gil();
    return words_;
  }
  int64_t dense_product() const { return product_; }
  int64_t dense_cells() const { return dense_cells_; }
  int64_t sparse_pairs() {  // pair entries in the runs (a pair may sit in several runs until result() merges them)
    auto lock = lock_without_gil();
    int64_t n = 0;
    for (const Shard& sh : shards_)
      for (const Run& r : sh.runs) n += static_cast<int64_t>(r.keys.size());
    return n;
  }

 private:
  // The largest P with sum_i min(V, P / (i + 1)) <= cells (binary search; the sum grows with P).
  void plan_dense(int64_t budget_cells) {
    const int64_t V = vocab_;
    auto cells_for = [&](int64_t p) {
      int64_t sum = 0;
      for (int64_t i = 0; i < V; ++i) {
        const int64_t w = std::min(V, p / (i + 1));
        if (w == 0) break;
        sum += w;
      }
      return sum;
    };
    int64_t lo = 0, hi = V * V;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (cells_for(mid) <= budget_cells) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    product_ = lo;
    width_.resize(V);
    start_.resize(V);
    int64_t at = 0;
    for (int64_t i = 0; i < V; ++i) {
      width_[i] = std::min(V, product_ / (i + 1));
      start_[i] = at;
      at += width_[i];
    }
    dense_cells_ = at;
  }

  double* dense_row(int64_t r) const { return dense_ ? dense_.get() + start_[r] : nullptr; }

  // All increments X[row, .] for the rows owned by thread t, over the chunk.
  void count_owned(const int32_t* id, const int64_t* off, int64_t sentences, int64_t t) {
    Shard& sh = shards_[t];
    const uint64_t V = static_cast<uint64_t>(vocab_);
    const int64_t W = window_;
    for (int64_t s = 0; s < sentences; ++s) {
      const int64_t b = off[s], e = off[s + 1];
      for (int64_t i = b; i < e; ++i) {
        const int32_t row = id[i];
        if (row % workers_ != t) continue;
        const int64_t width = width_[row];
        double* d = dense_row(row);
        const uint64_t row_key = static_cast<uint64_t>(row) * V;
        auto increment = [&](int32_t col, int64_t dist) {
          if (col < width) {
            d[col] += weight_[dist];
          } else {
            if (sh.fill == sh.buffer.size()) {
              if (sh.buffer.empty()) {
                sh.buffer.resize(buffer_records_);
              } else {
                flush(sh);
              }
            }
            sh.buffer[sh.fill++] = ((row_key + static_cast<uint64_t>(col)) << distance_bits_) | dist;
          }
        };
        const int64_t left = std::max(b, i - W);
        for (int64_t k = i - 1; k >= left; --k) increment(id[k], i - k);
        if (symmetric_) {
          const int64_t right = std::min(e, i + W + 1);
          for (int64_t k = i + 1; k < right; ++k) increment(id[k], k - i);
        }
      }
    }
  }

  // Sort the buffer on its pair keys (LSD radix, stable: equal pairs keep
  // corpus order), reduce it to a run and merge runs of similar size.
  void flush(Shard& sh) {
    if (sh.fill == 0) return;
    const size_t n = sh.fill;
    sh.scratch.resize(std::max(sh.scratch.size(), n));
    uint64_t* a = sh.buffer.data();
    uint64_t* b = sh.scratch.data();
    const int passes = (pair_bits_ + 10) / 11;
    if (passes > 0) {
      const int digit = (pair_bits_ + passes - 1) / passes;
      const uint64_t mask = (uint64_t{1} << digit) - 1;
      std::vector<size_t> hist(static_cast<size_t>(passes) << digit);
      for (size_t i = 0; i < n; ++i) {
        const uint64_t key = a[i] >> distance_bits_;
        for (int p = 0; p < passes; ++p) ++hist[(static_cast<size_t>(p) << digit) + ((key >> (p * digit)) & mask)];
      }
      for (int p = 0; p < passes; ++p) {
        size_t* h = hist.data() + (static_cast<size_t>(p) << digit);
        size_t sum = 0;
        for (uint64_t j = 0; j <= mask; ++j) {
          const size_t c = h[j];
          h[j] = sum;
          sum += c;
        }
        const int shift = distance_bits_ + p * digit;
        for (size_t i = 0; i < n; ++i) b[h[(a[i] >> shift) & mask]++] = a[i];
        std::swap(a, b);
      }
    }
    Run run;
    const uint64_t dmask = (uint64_t{1} << distance_bits_) - 1;
    for (size_t i = 0; i < n;) {
      const uint64_t key = a[i] >> distance_bits_;
      double sum = 0.0;
      for (; i < n && (a[i] >> distance_bits_) == key; ++i) sum += weight_[a[i] & dmask];
      run.keys.push_back(key);
      run.values.push_back(static_cast<float>(sum));
    }
    sh.fill = 0;
    sh.runs.push_back(std::move(run));
    while (sh.runs.size() >= 2 && 2 * sh.runs.back().keys.size() >= sh.runs[sh.runs.size() - 2].keys.size()) {
      Run merged = merge_runs(sh.runs[sh.runs.size() - 2], sh.runs.back());
      sh.runs.pop_back();
      sh.runs.back() = std::move(merged);
    }
  }

  struct Free {
    void operator()(double* p) const { std::free(p); }
  };

  int64_t vocab_, window_;
  bool symmetric_;
  int64_t workers_;
  int pair_bits_ = 0, distance_bits_ = 0;
  size_t buffer_records_ = 0;
  std::vector<double> weight_;
  int64_t product_ = 0, dense_cells_ = 0;
  std::vector<int64_t> width_, start_;  // dense cells of row i: [start_[i], start_[i] + width_[i])
  std::unique_ptr<double[], Free> dense_;
  std::vector<Shard> shards_;
  int64_t words_ = 0;
  std::mutex mutex_;
};

// ============================================================== training ==

LLMKIT_GLOVE_INLINE float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

struct Params {
  float* W;   // (vocab, dim + 1): word vectors, bias last
  float* C;   // context vectors, same layout
  float* GW;  // AdaGrad sums of squared updates, same layout
  float* GC;
  int64_t dim;
};

struct Weighting {
  float x_max, log_x_max, alpha, lr;
};

// The AdaGrad step of a record's two vectors: u1 = g c / sqrt(G_w),
// u2 = g w / sqrt(G_c) from the old values, G += (g c)^2 and (g w)^2; the
// vectors move only when both updates are finite (glove.c). GCC keeps sqrt
// scalar under -fmath-errno (and its optimize pragma does not lift that), so
// the AVX2 build spells the loop with intrinsics.
struct Portable {
  static LLMKIT_GLOVE_INLINE void adagrad(float g, float* w, float* c, float* gw, float* gc, float* u1, float* u2,
                                          int64_t D) {
    float s1 = 0.0f, s2 = 0.0f;
    for (int64_t b = 0; b < D; ++b) {
      const float t1 = g * c[b], t2 = g * w[b];
      u1[b] = t1 / std::sqrt(gw[b]);
      u2[b] = t2 / std::sqrt(gc[b]);
      s1 += u1[b];
      s2 += u2[b];
      gw[b] += t1 * t1;
      gc[b] += t2 * t2;
    }
    if (std::isfinite(s1) && std::isfinite(s2)) {
      for (int64_t b = 0; b < D; ++b) {
        w[b] -= u1[b];
        c[b] -= u2[b];
      }
    }
  }
};

#if defined(__x86_64__)
struct Avx2 {
  __attribute__((target("avx2,fma"))) static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 1 / sqrt(g): the 12-bit estimate and one Newton step (~1 ulp off; a
  // divide and a square root per lane cost twice the whole loop).
  __attribute__((target("avx2,fma"))) static inline __m256 rsqrt(__m256 g) {
    const __m256 y = _mm256_rsqrt_ps(g);
    const __m256 hgy = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g), y);
    return _mm256_mul_ps(y, _mm256_fnmadd_ps(hgy, y, _mm256_set1_ps(1.5f)));
  }
  __attribute__((target("avx2,fma"))) static inline void adagrad(float g, float* w, float* c, float* gw, float* gc,
                                                                 float* u1, float* u2, int64_t D) {
    const __m256 gv = _mm256_set1_ps(g);
    __m256 s1v = _mm256_setzero_ps(), s2v = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= D; b += 8) {
      const __m256 t1 = _mm256_mul_ps(gv, _mm256_loadu_ps(c + b)), t2 = _mm256_mul_ps(gv, _mm256_loadu_ps(w + b));
      const __m256 gwv = _mm256_loadu_ps(gw + b), gcv = _mm256_loadu_ps(gc + b);
      const __m256 a1 = _mm256_mul_ps(t1, rsqrt(gwv)), a2 = _mm256_mul_ps(t2, rsqrt(gcv));
      _mm256_storeu_ps(u1 + b, a1);
      _mm256_storeu_ps(u2 + b, a2);
      s1v = _mm256_add_ps(s1v, a1);
      s2v = _mm256_add_ps(s2v, a2);
      _mm256_storeu_ps(gw + b, _mm256_fmadd_ps(t1, t1, gwv));
      _mm256_storeu_ps(gc + b, _mm256_fmadd_ps(t2, t2, gcv));
    }
    float s1 = hsum(s1v), s2 = hsum(s2v);
    for (; b < D; ++b) {
      const float t1 = g * c[b], t2 = g * w[b];
      u1[b] = t1 / std::sqrt(gw[b]);
      u2[b] = t2 / std::sqrt(gc[b]);
      s1 += u1[b];
      s2 += u2[b];
      gw[b] += t1 * t1;
      gc[b] += t2 * t2;
    }
    if (std::isfinite(s1) && std::isfinite(s2)) {
      b = 0;
      for (; b + 8 <= D; b += 8) {
        _mm256_storeu_ps(w + b, _mm256_sub_ps(_mm256_loadu_ps(w + b), _mm256_loadu_ps(u1 + b)));
        _mm256_storeu_ps(c + b, _mm256_sub_ps(_mm256_loadu_ps(c + b), _mm256_loadu_ps(u2 + b)));
      }
      for (; b < D; ++b) {
        w[b] -= u1[b];
        c[b] -= u2[b];
      }
    }
  }
};
#endif

// One record's update (glove.c's inner loop); returns its cost 0.5 f(x) diff^2
// (0 when skipped). u1 / u2 are `dim` floats of scratch.
template <class K>
LLMKIT_GLOVE_INLINE double glove_record(const Params& p, int32_t row, int32_t col, float x, const Weighting& f,
                                        float* u1, float* u2) {
  const int64_t D = p.dim, S = D + 1;
  float* w = p.W + row * S;
  float* c = p.C + col * S;
  float* gw = p.GW + row * S;
  float* gc = p.GC + col * S;
  const float log_x = std::log(x);
  const float diff = dot(w, c, D) + w[D] + c[D] - log_x;
  const float weight = x < f.x_max ? std::exp(f.alpha * (log_x - f.log_x_max)) : 1.0f;
  float fdiff = weight * diff;
  if (!std::isfinite(diff) || !std::isfinite(fdiff)) return 0.0;
  const double cost = 0.5 * static_cast<double>(fdiff) * diff;
  fdiff *= f.lr;
  K::adagrad(fdiff, w, c, gw, gc, u1, u2, D);
  const float bw = fdiff / std::sqrt(gw[D]), bc = fdiff / std::sqrt(gc[D]);
  if (std::isfinite(bw)) w[D] -= bw;
  if (std::isfinite(bc)) c[D] -= bc;
  gw[D] += fdiff * fdiff;
  gc[D] += fdiff * fdiff;
  return cost;
}

struct Records {
  const int32_t* rows;
  const int32_t* cols;
  const float* values;
};

template <class K>
LLMKIT_GLOVE_INLINE double train_range_body(const Params& p, const Records& r, int64_t i0, int64_t i1,
                                            const Weighting& f) {
  std::vector<float> u1(p.dim), u2(p.dim);
  double cost = 0.0;
  // The rows of a shuffled record are cache misses (4 x (dim + 1) floats out
  // of 4 vocab-sized matrices): fetch those of a record a few ahead.
  constexpr int64_t kAhead = 4;
  const int64_t S = p.dim + 1;
  for (int64_t i = i0; i < i1; ++i) {
    if (i + kAhead < i1) {
      const int64_t a = r.rows[i + kAhead] * S, b = r.cols[i + kAhead] * S;
      for (int64_t k = 0; k < S; k += 16) {
        __builtin_prefetch(p.W + a + k, 1);
        __builtin_prefetch(p.GW + a + k, 1);
        __builtin_prefetch(p.C + b + k, 1);
        __builtin_prefetch(p.GC + b + k, 1);
      }
    }
    cost += glove_record<K>(p, r.rows[i], r.cols[i], r.values[i], f, u1.data(), u2.data());
  }
  return cost;
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) double train_range_avx2(const Params& p, const Records& r, int64_t i0, int64_t i1,
                                                            const Weighting& f) {
  return train_range_body<Avx2>(p, r, i0, i1, f);
}
#endif

double train_range_portable(const Params& p, const Records& r, int64_t i0, int64_t i1, const Weighting& f) {
  return train_range_body<Portable>(p, r, i0, i1, f);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) double glove_step_avx2(const Params& p, int32_t row, int32_t col, float x,
                                                           const Weighting& f, float* u1, float* u2) {
  return glove_record<Avx2>(p, row, col, x, f, u1, u2);
}
#endif

bool use_avx2() { return llmkit::use_avx2_fma(); }

// ---------------------------------------------------------------- checks --

Params check_params(at::Tensor& W, at::Tensor& C, at::Tensor& GW, at::Tensor& GC) {
  for (const at::Tensor* t : {&W, &C, &GW, &GC}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, "glove: W, C, gradsq_W and gradsq_C must be float32, got ",
                     t->scalar_type());
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->is_contiguous(),
                      "glove: W, C, gradsq_W and gradsq_C must be contiguous CPU tensors");
  }
  TORCH_CHECK_VALUE(W.dim() == 2 && W.size(0) >= 1 && W.size(1) >= 2,
                    "glove: W must be (vocab, dim + 1) with the bias in the last column, dim >= 1; got ", W.sizes());
  TORCH_CHECK_VALUE(C.sizes() == W.sizes() && GW.sizes() == W.sizes() && GC.sizes() == W.sizes(),
                    "glove: W, C, gradsq_W and gradsq_C must have the same shape, got ", W.sizes(), ", ", C.sizes(),
                    ", ", GW.sizes(), ", ", GC.sizes());
  return Params{W.data_ptr<float>(), C.data_ptr<float>(), GW.data_ptr<float>(), GC.data_ptr<float>(), W.size(1) - 1};
}

Weighting check_weighting(double x_max, double alpha, double learning_rate) {
  TORCH_CHECK_VALUE(std::isfinite(x_max) && x_max > 0, "glove: x_max must be > 0, got ", x_max);
  TORCH_CHECK_VALUE(std::isfinite(alpha) && alpha >= 0, "glove: alpha must be >= 0, got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(learning_rate) && learning_rate > 0, "glove: learning_rate must be > 0, got ",
                    learning_rate);
  return Weighting{static_cast<float>(x_max), std::log(static_cast<float>(x_max)), static_cast<float>(alpha),
                   static_cast<float>(learning_rate)};
}

Records check_records(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& values, int64_t vocab) {
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kInt && cols.scalar_type() == at::kInt,
                   "glove: rows and cols must be int32, got ", rows.scalar_type(), " and ", cols.scalar_type());
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat, "glove: values must be float32, got ", values.scalar_type());
  for (const at::Tensor* t : {&rows, &cols, &values}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->is_contiguous() && t->device().is_cpu(),
                      "glove: rows, cols and values must be contiguous 1-D CPU tensors");
  }
  TORCH_CHECK_VALUE(rows.numel() == cols.numel() && rows.numel() == values.numel(),
                    "glove: rows, cols and values must have the same length, got ", rows.numel(), ", ", cols.numel(),
                    ", ", values.numel());
  if (rows.numel() > 0) {
    for (const at::Tensor* t : {&rows, &cols}) {
      const auto [lo, hi] = at::aminmax(*t);
      TORCH_CHECK_VALUE(lo.item<int32_t>() >= 0 && hi.item<int32_t>() < vocab, "glove: ", t == &rows ? "rows" : "cols",
                        " hold ids outside [0, ", vocab, ")");
    }
    const float lo = values.min().item<float>();
    TORCH_CHECK_VALUE(lo > 0, "glove: co-occurrence values must be > 0 (their log is fitted), got ", lo);
  }
  return Records{rows.const_data_ptr<int32_t>(), cols.const_data_ptr<int32_t>(), values.const_data_ptr<float>()};
}

// ----------------------------------------------------------- entry points --

// Fisher-Yates on the three arrays together, word2vec.h's Lcg seeded by `seed`.
void shuffle_records(at::Tensor rows, at::Tensor cols, at::Tensor values, uint64_t seed) {
  TORCH_CHECK_TYPE(rows.scalar_type() == at::kInt && cols.scalar_type() == at::kInt &&
                       values.scalar_type() == at::kFloat,
                   "glove: shuffle needs int32 rows and cols and float32 values");
  TORCH_CHECK_VALUE(rows.dim() == 1 && rows.is_contiguous() && cols.is_contiguous() && values.is_contiguous() &&
                        rows.device().is_cpu() && cols.device().is_cpu() && values.device().is_cpu() &&
                        cols.numel() == rows.numel() && values.numel() == rows.numel(),
                    "glove: shuffle needs contiguous 1-D CPU tensors of one length");
  const int64_t n = rows.numel();
  int32_t* r = rows.data_ptr<int32_t>();
  int32_t* c = cols.data_ptr<int32_t>();
  float* v = values.data_ptr<float>();
  py::gil_scoped_release no_gil;
  Lcg rng(seed);
  for (int64_t i = n - 1; i > 0; --i) {
    // j uniform in [0, i]: the high bits of a 64-bit draw times (i + 1) (Lemire), no division.
    const int64_t j = static_cast<int64_t>((static_cast<unsigned __int128>(rng.next()) * static_cast<uint64_t>(i + 1)) >> 64);
    std::swap(r[i], r[j]);
    std::swap(c[i], c[j]);
    std::swap(v[i], v[j]);
  }
}

double train_epoch(at::Tensor W, at::Tensor C, at::Tensor gradsq_W, at::Tensor gradsq_C, at::Tensor rows,
                   at::Tensor cols, at::Tensor values, double x_max, double alpha, double learning_rate,
                   int64_t workers, uint64_t seed, bool shuffle) {
  const Params p = check_params(W, C, gradsq_W, gradsq_C);
  const Records r = check_records(rows, cols, values, W.size(0));
  const Weighting f = check_weighting(x_max, alpha, learning_rate);
  TORCH_CHECK_VALUE(workers >= 1 && workers <= kMaxWorkers, "glove: workers must be in [1, ", kMaxWorkers, "], got ",
                    workers);
  if (shuffle) shuffle_records(rows, cols, values, seed);
  const int64_t n = rows.numel();
  std::vector<double> cost(workers, 0.0);
  const bool avx2 = use_avx2();
  py::gil_scoped_release no_gil;
  // Hogwild: each thread takes a contiguous slice of the (shuffled) records.
  run_threads(workers, [&](int64_t t) {
    const int64_t i0 = n * t / workers, i1 = n * (t + 1) / workers;
#if defined(__x86_64__)
    if (avx2) {
      cost[t] = train_range_avx2(p, r, i0, i1, f);
      return;
    }
#endif
    cost[t] = train_range_portable(p, r, i0, i1, f);
  });
  double total = 0.0;
  for (double c : cost) total += c;
  return total;
}

// One record's update on the given tensors (tests compare it with a float64 reference).
double glove_step(at::Tensor W, at::Tensor C, at::Tensor gradsq_W, at::Tensor gradsq_C, int64_t row, int64_t col,
                  double x, double x_max, double alpha, double learning_rate) {
  const Params p = check_params(W, C, gradsq_W, gradsq_C);
  const Weighting f = check_weighting(x_max, alpha, learning_rate);
  TORCH_CHECK_VALUE(row >= 0 && row < W.size(0) && col >= 0 && col < W.size(0), "glove: row and col must be in [0, ",
                    W.size(0), "), got ", row, " and ", col);
  TORCH_CHECK_VALUE(x > 0, "glove: the co-occurrence value must be > 0, got ", x);
  std::vector<float> u1(p.dim), u2(p.dim);
  const auto r = static_cast<int32_t>(row), c = static_cast<int32_t>(col);
#if defined(__x86_64__)
  if (use_avx2()) return glove_step_avx2(p, r, c, static_cast<float>(x), f, u1.data(), u2.data());
#endif
  return glove_record<Portable>(p, r, c, static_cast<float>(x), f, u1.data(), u2.data());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> count_cooccurrences(const at::Tensor& ids, const at::Tensor& offsets,
                                                                   int64_t vocab, int64_t window, bool symmetric,
                                                                   bool distance_weighting, int64_t workers,
                                                                   int64_t dense_bytes, int64_t buffer_records) {
  CooccurrenceCounter counter(vocab, window, symmetric, distance_weighting, workers, dense_bytes, buffer_records);
  counter.add(ids, offsets);
  return counter.result();
}

constexpr int64_t kDefaultDenseBytes = int64_t{256} << 20;
constexpr int64_t kDefaultBufferRecords = int64_t{1} << 22;  // 32 MiB of records (+ as much to sort) per thread

}  // namespace

void bind_glove(py::module_& m) {
  auto g = m.def_submodule("glove", "GloVe co-occurrence counting and AdaGrad trainer (CPU threads, GIL released)");
  py::class_<CooccurrenceCounter>(g, "CooccurrenceCounter",
                                  "Accumulates GloVe co-occurrence counts over corpus chunks (add), then result() "
                                  "gives (rows int32, cols int32, values float32) sorted by (row, col)")
      .def(py::init<int64_t, int64_t, bool, bool, int64_t, int64_t, int64_t>(), py::arg("vocab"), py::arg("window"),
           py::arg("symmetric") = true, py::arg("distance_weighting") = true, py::arg("workers") = 1,
           py::arg("dense_bytes") = kDefaultDenseBytes, py::arg("buffer_records") = kDefaultBufferRecords)
      .def("add", &CooccurrenceCounter::add, py::arg("ids"), py::arg("offsets"),
           "Count one chunk: int32 ids and int64 sentence offsets (starts plus the end)")
      .def("result", &CooccurrenceCounter::result, "(rows, cols, values) of the distinct pairs so far, sorted")
      .def_property_readonly("vocab", &CooccurrenceCounter::vocab)
      .def_property_readonly("window", &CooccurrenceCounter::window)
      .def_property_readonly("words", &CooccurrenceCounter::words)
      .def_property_readonly("dense_product", &CooccurrenceCounter::dense_product,
                             "P: pairs (i, j) with (i + 1)(j + 1) <= P are counted in the dense table")
      .def_property_readonly("dense_cells", &CooccurrenceCounter::dense_cells)
      .def_property_readonly("sparse_pairs", &CooccurrenceCounter::sparse_pairs);
  g.def("count_cooccurrences", &count_cooccurrences, py::arg("ids"), py::arg("offsets"), py::arg("vocab"),
        py::arg("window"), py::arg("symmetric") = true, py::arg("distance_weighting") = true, py::arg("workers") = 1,
        py::arg("dense_bytes") = kDefaultDenseBytes, py::arg("buffer_records") = kDefaultBufferRecords,
        "Co-occurrence counts of one chunk: (rows, cols, values) sorted by (row, col)");
  g.def("train_epoch", &train_epoch, py::arg("W"), py::arg("C"), py::arg("gradsq_W"), py::arg("gradsq_C"),
        py::arg("rows"), py::arg("cols"), py::arg("values"), py::arg("x_max") = 100.0, py::arg("alpha") = 0.75,
        py::arg("learning_rate") = 0.05, py::arg("workers") = 1, py::arg("seed") = 1, py::arg("shuffle") = true,
        "One AdaGrad epoch over the records (shuffled in place first when `shuffle`); returns the summed cost");
  g.def("shuffle", &shuffle_records, py::arg("rows"), py::arg("cols"), py::arg("values"), py::arg("seed"),
        "Shuffle the records in place (Fisher-Yates, deterministic given the seed)");
  g.def("glove_step", &glove_step, py::arg("W"), py::arg("C"), py::arg("gradsq_W"), py::arg("gradsq_C"),
        py::arg("row"), py::arg("col"), py::arg("x"), py::arg("x_max") = 100.0, py::arg("alpha") = 0.75,
        py::arg("learning_rate") = 0.05, "One record's AdaGrad update in place; returns its cost");
}

}  // namespace llmkit::word2vec
