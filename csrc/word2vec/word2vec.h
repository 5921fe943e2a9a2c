// word2vec: skip-gram / CBOW with negative sampling, trained by C++ threads
// (Hogwild: lock-free updates of shared rows, as word2vec.c and gensim do).
//
// Conventions are word2vec.c's (and gensim's, which follows it):
//   * skip-gram: for a centre word w and a context word c, the input vector
//     is syn0[c] and the output vectors are syn1neg[w] (label 1) and
//     syn1neg[noise] (label 0); syn0[c] gets the accumulated gradient.
//   * CBOW: the mean of the context's syn0 rows predicts w; each context row
//     gets the same gradient.
//   * the window shrinks at random: b = rand % window, effective window - b;
//   * subsampling keeps word w with probability keep[w] (computed by the
//     caller from word2vec.c's formula), drawn before windows are formed;
//   * negatives are drawn from the unigram^0.75 distribution through a
//     cumulative table (gensim's cum_table: the upper bound of a 31-bit draw,
//     found through a guide table instead of a binary search);
//   * sigmoid is exact, clipped to 0 / 1 beyond |f| > 6 (word2vec.c's MAX_EXP);
//   * the learning rate decays linearly over the words processed;
//   * each thread has its own word2vec.c linear congruential generator.
// The trainer is bound with pybind11 (not a tensor op: it mutates the two
// weight matrices in place, with the GIL released, over a corpus chunk).
#pragma once

#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace pybind11 {
class module_;
}

namespace llmkit::word2vec {

// word2vec.c's generator: next = next * 25214903917 + 11 (mod 2^64).
struct Lcg {
  uint64_t state;
  explicit Lcg(uint64_t seed) : state(seed) {}
  uint64_t next() {
    state = state * 25214903917ULL + 11ULL;
    return state;
  }
  // 32 uniform bits (the high half: the low bits of an LCG are weak).
  uint32_t bits32() { return static_cast<uint32_t>(next() >> 32); }
};

inline constexpr float kMaxExp = 6.0f;

inline constexpr int64_t kMaxWorkers = 1024;

// Runs `fn(t)` on `workers` threads (t = 0 on the caller's), rethrowing the
// first exception after all joined.
template <typename Fn>
inline void run_threads(int64_t workers, Fn fn) {
  std::vector<std::exception_ptr> errors(workers);
  auto guarded = [&](int64_t t) {
    try {
      fn(t);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  for (int64_t t = 1; t < workers; ++t) threads.emplace_back(guarded, t);
  guarded(0);
  for (auto& th : threads) th.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

// Registers the word2vec functions on the extension module (called from ops.cpp).
void bind(pybind11::module_& m);
// Registers _C.glove (csrc/word2vec/glove_cpu.cpp).
void bind_glove(pybind11::module_& m);

}  // namespace llmkit::word2vec
