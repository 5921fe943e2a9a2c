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

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
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
//
// The threads wait at a gate until all of them exist. When the system
// refuses one (std::system_error from a process / thread limit, or memory
// for its stack), the ones already started are released with nothing to do
// and joined, and a std::runtime_error (RuntimeError in Python) says how
// many could start: no worker trains a partial share of the corpus, and no
// joinable std::thread is destroyed, which would call std::terminate (abort).
template <typename Fn>
inline void run_threads(int64_t workers, Fn fn) {
  std::vector<std::exception_ptr> errors(workers);
  std::mutex mutex;
  std::condition_variable gate;
  bool open = false, abandoned = false;
  auto guarded = [&](int64_t t) {
    {
      std::unique_lock<std::mutex> lock(mutex);
      gate.wait(lock, [&] { return open; });
      if (abandoned) return;
    }
    try {
      fn(t);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> threads;
  std::string failure;
  try {
    threads.reserve(static_cast<size_t>(workers > 1 ? workers - 1 : 0));
    for (int64_t t = 1; t < workers; ++t) threads.emplace_back(guarded, t);
  } catch (const std::exception& e) {  // std::system_error (EAGAIN), or bad_alloc
    failure = e.what();
  }
  {
    std::lock_guard<std::mutex> lock(mutex);
    open = true;
    abandoned = !failure.empty();
  }
  gate.notify_all();
  if (failure.empty()) guarded(0);
  for (auto& th : threads) th.join();
  if (!failure.empty()) {
    throw std::runtime_error("could start only " + std::to_string(threads.size() + 1) + " of " +
                             std::to_string(workers) + " worker threads (" + failure +
                             "): the system refused a thread (a process or memory limit); lower `workers`");
  }
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

// Registers the word2vec functions on the extension module (called from ops.cpp).
void bind(pybind11::module_& m);
// Registers _C.glove (csrc/word2vec/glove_cpu.cpp).
void bind_glove(pybind11::module_& m);

}  // namespace llmkit::word2vec
