// CPU flash attention: forward and backward, windows, global tokens, GQA,
// varlen, an additive bias (fixed length) — fp32 / fp16 / bf16 inputs, all arithmetic in fp32.
//
// Blocked like flash-attn: a block of queries walks the key blocks it can see
// (the window's key range, plus the global keys outside it), keeping a
// running max / sum (online softmax) so no (seqlen_q, seqlen_k) matrix ever
// exists. Key blocks with no visible pair are never touched, so a window
// costs O(seqlen * window). The matrix products go to the BLAS sgemm that
// torch ships (MKL on x86 wheels), found at load time through a weak symbol;
// a plain loop stands in where there is none. The kernels take fp32 only:
// the op widens fp16/bf16 inputs to fp32 once (linear cost, and sgemm then
// reads every operand in place) and rounds the results once at the end.
//
// NaN and infinity propagate as in softmax(scale q k^T + bias) @ v: a NaN
// (or an inf that makes a score inf - inf) in q, k or the bias at a visible
// (query, key) pair makes that query's output row and lse NaN, and the
// gradients that flow through the pair NaN; masked pairs never contribute.
// One exception, shared with SDPA and flash-attn: a non-finite V row of a
// key that a query cannot see may still reach that query when both fall in
// one block, through the masked probability's exact 0 times it (0 * inf).
//
// Threads: the forward parallelises over (sequence, query head, query block);
// the backward over (sequence, kv head, split of the query blocks), each task
// owning the dQ rows of its query blocks and private fp32 dK/dV accumulators
// that are summed in a fixed order — no atomics, so it is deterministic.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LLMKIT_X86 1
#endif

#include "attention/attention.h"

#include "common/cpu_blas.h"
#include "common/cpu_features.h"
#include "common/cpu_softmax.h"

namespace llmkit::attention {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Query rows per block (the forward's unit of work) and key rows per chunk.
// Larger blocks feed sgemm better and amortise the online-softmax rescale;
// smaller ones waste less at the edges of a window and make more tasks.
// LLMKIT_ATTN_BLOCKS="q,k" overrides (for tuning).
struct Blocks {
  int64_t q, k;
};
Blocks choose_blocks(const AttentionParams& p) {
  const bool windowed = p.window_left >= 0 && p.window_right >= 0;
  // Measured on 2 cores (fp32, d 64, causal, s 1k-4k): 64 x 256 beat 128 x 512
  // and ATen's 256 x 512 by 0-15%; windows waste least with 64 x 64.
  Blocks blocks = windowed ? Blocks{64, 64} : Blocks{64, 256};
  if (const char* env = std::getenv("LLMKIT_ATTN_BLOCKS")) {
    long bq = 0, bk = 0;
    if (std::sscanf(env, "%ld,%ld", &bq, &bk) == 2 && bq > 0 && bk > 0) blocks = {bq, bk};
  }
  return blocks;
}

// The softmax row primitives (exp, row max; AVX2 and portable): common/cpu_softmax.h.
using softmax::Simd;

// ------------------------------------------------------- the problem ----

struct Sequence {
  int64_t b, start_q, len_q, start_k, len_k;
};

std::vector<Sequence> sequences(const AttentionParams& p) {
  std::vector<Sequence> seqs(p.batch);
  for (int64_t b = 0; b < p.batch; ++b) {
    if (p.cu_seqlens_q != nullptr) {
      seqs[b] = {b, p.cu_seqlens_q[b], p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b], p.cu_seqlens_k[b],
                 p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b]};
    } else {
      seqs[b] = {b, 0, p.seqlen_q, 0, p.seqlen_k};
    }
  }
  return seqs;
}

// Which keys the queries of one sequence see (the header's formula).
struct Visibility {
  int64_t len_q, len_k, left, right;
  const bool* global = nullptr;  // this sequence's flags (queries == keys), or null
  std::vector<int64_t> global_keys;

  Visibility(const AttentionParams& p, const Sequence& s)
      : len_q(s.len_q), len_k(s.len_k), left(p.window_left), right(p.window_right) {
    if (p.global_tokens != nullptr) {
      global = p.global_tokens + s.b * p.global_batch_stride + s.start_q;
      for (int64_t j = 0; j < len_k; ++j)
        if (global[j]) global_keys.push_back(j);
    }
  }
  // Window of query i as [lo, hi) (may be empty).
  int64_t lo(int64_t i) const { return left < 0 ? 0 : std::clamp(i + len_k - len_q - left, int64_t(0), len_k); }
  int64_t hi(int64_t i) const {
    return right < 0 ? len_k : std::clamp(i + len_k - len_q + right + 1, int64_t(0), len_k);
  }
  bool any_global_query(int64_t i0, int64_t i1) const {
    if (global == nullptr) return false;
    for (int64_t i = i0; i < i1; ++i)
      if (global[i]) return true;
    return false;
  }
};

// The keys a block of queries [i0, i1) visits: a contiguous range walked in
// chunks, then the global keys outside it, gathered.
struct KeyPlan {
  int64_t lo = 0, hi = 0;
  std::vector<int64_t> gathered;
};

KeyPlan plan_keys(const Visibility& vis, int64_t i0, int64_t i1) {
  KeyPlan plan;
  if (vis.any_global_query(i0, i1)) {  // a global query sees every key
    plan.lo = 0, plan.hi = vis.len_k;
    return plan;
  }
  plan.lo = vis.lo(i0);
  plan.hi = std::max(plan.lo, vis.hi(i1 - 1));
  for (int64_t j : vis.global_keys)
    if (j < plan.lo || j >= plan.hi) plan.gathered.push_back(j);
  return plan;
}

// Sets the scores of invisible pairs to -inf in a (rows x n) block of
// queries [i0, ..) against keys [c0, c0 + n) (contiguous chunks only:
// gathered keys are global, so visible to all).
void mask_chunk(const Visibility& vis, int64_t i0, int64_t rows, int64_t c0, int64_t n, float* s, int64_t lds) {
  const int64_t c1 = c0 + n;
  if (vis.lo(i0 + rows - 1) <= c0 && vis.hi(i0) >= c1) return;  // every row sees the whole chunk
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r;
    if (vis.global != nullptr && vis.global[i]) continue;
    const int64_t lo = vis.lo(i), hi = vis.hi(i);
    float* row = s + r * lds;
    for (int64_t j = c0; j < c1; ++j) {
      if ((j < lo || j >= hi) && !(vis.global != nullptr && vis.global[j])) row[j - c0] = kNegInf;
    }
  }
}

// ----------------------------------------------------- row loading ----

// A (rows x D) fp32 view of rows of a strided tensor: the rows themselves
// for contiguous-enough fp32, else a widened copy in `buf` (ld = D).
const float* load_rows(const float* base, int64_t row_stride, int64_t first, int64_t rows, int64_t d, float* buf,
                       int64_t& ld) {
  if (row_stride >= d) {
    ld = row_stride;
    return base + first * row_stride;
  }
  for (int64_t r = 0; r < rows; ++r) std::memcpy(buf + r * d, base + (first + r) * row_stride, d * sizeof(float));
  ld = d;
  return buf;
}

const float* gather_rows(const float* base, int64_t row_stride, const int64_t* idx, int64_t rows, int64_t d,
                         float* buf) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(buf + r * d, base + idx[r] * row_stride, d * sizeof(float));
  return buf;
}

void store_row(const float* src, float scale, int64_t d, float* dst) {
  for (int64_t t = 0; t < d; ++t) dst[t] = src[t] * scale;
}

// One chunk of keys with their K and V rows as fp32 (rows x d) matrices.
struct Chunk {
  int64_t first;        // first key of a contiguous chunk; -1 for gathered keys
  int64_t n;            // keys in the chunk
  const int64_t* keys;  // the gathered (global) keys' indices, or null
  const float* k;
  int64_t ldk;
  const float* v;
  int64_t ldv;
};

// Walk the key chunks of a plan, loading each chunk's K / V rows: fn(chunk).
template <typename Fn>
void for_each_chunk(const KeyPlan& plan, int64_t block_k, int64_t d, const float* k_head, int64_t k_stride,
                    const float* v_head, int64_t v_stride, float* k_buf, float* v_buf, Fn&& fn) {
  for (int64_t c0 = plan.lo; c0 < plan.hi; c0 += block_k) {
    Chunk c{c0, std::min(block_k, plan.hi - c0), nullptr, nullptr, d, nullptr, d};
    c.k = load_rows(k_head, k_stride, c0, c.n, d, k_buf, c.ldk);
    c.v = load_rows(v_head, v_stride, c0, c.n, d, v_buf, c.ldv);
    fn(c);
  }
  const int64_t ng = static_cast<int64_t>(plan.gathered.size());
  for (int64_t g0 = 0; g0 < ng; g0 += block_k) {
    Chunk c{-1, std::min(block_k, ng - g0), plan.gathered.data() + g0, nullptr, d, nullptr, d};
    c.k = gather_rows(k_head, k_stride, c.keys, c.n, d, k_buf);
    c.v = gather_rows(v_head, v_stride, c.keys, c.n, d, v_buf);
    fn(c);
  }
}

// ----------------------------------------------------------- the bias ----

// First bias row of query i0 for (sequence b, query head h).
const float* bias_rows(const AttentionParams& p, int64_t b, int64_t h, int64_t i0) {
  return p.bias + b * p.bias_batch_stride + h * p.bias_head_stride + i0 * p.bias_row_stride;
}

// s[r, :] += bias[i0 + r, the chunk's keys], for a (rows x n) score block.
void add_bias(const float* bias, int64_t row_stride, int64_t rows, const Chunk& c, float* s, int64_t lds) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict b = bias + r * row_stride;
    float* __restrict row = s + r * lds;
    if (c.keys != nullptr) {
      for (int64_t j = 0; j < c.n; ++j) row[j] += b[c.keys[j]];
    } else {
      b += c.first;
      for (int64_t j = 0; j < c.n; ++j) row[j] += b[j];
    }
  }
}

// dbias[i0 + r, the chunk's keys] = dS[r, :]: each (query row, key) pair is
// visited once, by the task owning the row, so plain stores suffice.
void store_dbias(const float* ds, int64_t lds, int64_t rows, const Chunk& c, float* dbias, int64_t seqlen_k) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = ds + r * lds;
    float* dst = dbias + r * seqlen_k;
    if (c.keys != nullptr) {
      for (int64_t j = 0; j < c.n; ++j) dst[c.keys[j]] = src[j];
    } else {
      std::memcpy(dst + c.first, src, c.n * sizeof(float));
    }
  }
}

// With one side of the window unbounded (causal), blocks cost more the later
// (or earlier) they come: a thread's contiguous range of tasks then
// alternates cheap and dear blocks to keep the threads even. Otherwise blocks
// go in order, so neighbouring tasks share their keys in cache.
int64_t block_order(int64_t t, int64_t n, bool uneven) {
  if (!uneven) return t;
  return (t % 2 == 0) ? t / 2 : n - 1 - t / 2;
}

// ------------------------------------------------------------ forward ----

void forward_impl(const AttentionParams& p) {
  const Simd simd;
  const int64_t d = p.head_dim, group = p.heads_q / p.heads_kv;
  const auto [block_q, block_k] = choose_blocks(p);
  const bool uneven_cost = (p.window_left < 0) != (p.window_right < 0);
  const auto seqs = sequences(p);
  struct Task {
    int64_t seq, head, block, nblocks;
  };
  std::vector<Task> tasks;
  for (int64_t s = 0; s < p.batch; ++s) {
    const int64_t nblocks = (seqs[s].len_q + block_q - 1) / block_q;
    for (int64_t h = 0; h < p.heads_q; ++h)
      for (int64_t t = 0; t < nblocks; ++t) tasks.push_back({s, h, t, nblocks});
  }
  std::vector<std::unique_ptr<Visibility>> vis(p.batch);
  for (int64_t s = 0; s < p.batch; ++s) vis[s] = std::make_unique<Visibility>(p, seqs[s]);

  const auto* q = static_cast<const float*>(p.q);
  const auto* k = static_cast<const float*>(p.k);
  const auto* v = static_cast<const float*>(p.v);
  auto* out = static_cast<float*>(p.out);

  // Scratch sized by the rows a block really has (a decode step has one), and
  // tiny problems on one thread: a decode step is microseconds of work, less
  // than waking a second thread costs.
  int64_t max_rows = 1, work = 0;
  for (const Sequence& seq : seqs) {
    max_rows = std::max(max_rows, std::min(block_q, seq.len_q));
    work += seq.len_q * seq.len_k;
  }
  work *= p.heads_q * d;
  const int64_t grain = work < (int64_t{1} << 20) ? static_cast<int64_t>(tasks.size()) + 1 : 1;  // > range: inline

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain, [&](int64_t begin, int64_t end) {
    const SingleThreadedBlas single_threaded_blas;
    std::vector<float> s_buf(max_rows * block_k), acc(max_rows * d), q_buf(max_rows * d), k_buf(block_k * d),
        v_buf(block_k * d), m(max_rows), l(max_rows);
    for (int64_t t = begin; t < end; ++t) {
      const Task& task = tasks[t];
      const Sequence& seq = seqs[task.seq];
      const Visibility& sv = *vis[task.seq];
      const int64_t block = block_order(task.block, task.nblocks, uneven_cost);
      const int64_t i0 = block * block_q, rows = std::min(block_q, seq.len_q - i0);
      const int64_t h = task.head, hk = h / group;
      const float* q_head = q + seq.b * p.q_batch_stride + seq.start_q * p.q_row_stride + h * p.q_head_stride;
      const float* k_head = k + seq.b * p.k_batch_stride + seq.start_k * p.k_row_stride + hk * p.k_head_stride;
      const float* v_head = v + seq.b * p.v_batch_stride + seq.start_k * p.v_row_stride + hk * p.v_head_stride;
      int64_t ldq;
      const float* qf = load_rows(q_head, p.q_row_stride, i0, rows, d, q_buf.data(), ldq);
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);

      const KeyPlan plan = plan_keys(sv, i0, i0 + rows);
      for_each_chunk(plan, block_k, d, k_head, p.k_row_stride, v_head, p.v_row_stride, k_buf.data(), v_buf.data(),
                     [&](const Chunk& c) {
        const int64_t n = c.n;
        float* s = s_buf.data();
        gemm(false, true, rows, n, d, p.scale, qf, ldq, c.k, c.ldk, 0.f, s, n);
        if (p.bias) add_bias(bias_rows(p, seq.b, h, i0), p.bias_row_stride, rows, c, s, n);
        if (!c.keys) mask_chunk(sv, i0, rows, c.first, n, s, n);
        for (int64_t r = 0; r < rows; ++r) {
          float* row = s + r * n;
          // A NaN score (from q, k or the bias of a visible pair; invisible
          // pairs are -inf by now) turns m into NaN, which then sticks
          // (std::max returns its first argument when one is NaN) and makes
          // l, the output row and lse NaN, as softmax does. row_max skips
          // NaNs, so they are found from the sum (NaN when any score is), or,
          // where the max is +-inf and the sum cannot tell, by a scan.
          float m_new = std::max(m[r], simd.row_max(row, n));
          if ((m_new == kNegInf || m_new == -kNegInf) && softmax::any_nan(row, n)) {
            m_new = std::numeric_limits<float>::quiet_NaN();
          }
          if (m_new == kNegInf) {  // nothing visible yet: contributes nothing
            std::fill(row, row + n, 0.f);
            continue;
          }
          const float alpha = std::exp(m[r] - m_new);  // 0 when m[r] = -inf
          const float sum = simd.exp_shift_sum(row, n, m_new);
          if (sum != sum && std::isfinite(m_new)) m_new = sum;  // a NaN among finite scores (with +inf: inf - inf)
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != 1.f) {
            float* a = acc.data() + r * d;
            for (int64_t t2 = 0; t2 < d; ++t2) a[t2] *= alpha;
          }
        }
        gemm(false, false, rows, d, n, 1.f, s, n, c.v, c.ldv, 1.f, acc.data(), d);
      });

      float* out_rows = out + seq.b * p.out_batch_stride + (seq.start_q + i0) * p.out_row_stride +
                           h * p.out_head_stride;
      float* lse = p.lse + seq.b * p.lse_batch_stride + h * p.lse_head_stride + seq.start_q + i0;
      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = l[r] == 0.f;
        store_row(acc.data() + r * d, empty ? 0.f : 1.f / l[r], d, out_rows + r * p.out_row_stride);
        // A +inf score: logsumexp is +inf (l is NaN there, from inf - inf), the row NaN.
        lse[r] = empty ? kNegInf : (m[r] == -kNegInf ? m[r] : m[r] + std::log(l[r]));
      }
    }
  });
}

// ----------------------------------------------------------- backward ----

void backward_impl(const AttentionGradParams& p) {
  const Simd simd;
  const int64_t d = p.head_dim, group = p.heads_q / p.heads_kv;
  const auto [block_q, block_k] = choose_blocks(p);
  const auto seqs = sequences(p);
  std::vector<std::unique_ptr<Visibility>> vis(p.batch);
  for (int64_t s = 0; s < p.batch; ++s) vis[s] = std::make_unique<Visibility>(p, seqs[s]);

  // Split each (sequence, kv head) over enough tasks to feed every thread;
  // split `part` takes the query blocks part, part + splits, ... (even under causal).
  const int64_t units = p.batch * p.heads_kv;
  const int64_t threads = at::get_num_threads();
  // Enough splits for two tasks per thread (units * splits >= 2 * threads),
  // at most 8: each split holds its own fp32 dK/dV, summed afterwards.
  const int64_t splits = units == 0 ? 1 : std::clamp<int64_t>((2 * threads + units - 1) / units, 1, 8);

  const auto* q = static_cast<const float*>(p.q);
  const auto* k = static_cast<const float*>(p.k);
  const auto* v = static_cast<const float*>(p.v);
  const auto* o = static_cast<const float*>(p.out);
  const auto* dout = static_cast<const float*>(p.dout);
  auto* dq = static_cast<float*>(p.dq);
  auto* dk = static_cast<float*>(p.dk);
  auto* dv = static_cast<float*>(p.dv);

  // fp32 dK / dV accumulators per task: [unit][split] -> (len_k x d) each.
  std::vector<std::vector<float>> dk_acc(units * splits), dv_acc(units * splits);

  at::parallel_for(0, units * splits, 1, [&](int64_t begin, int64_t end) {
    const SingleThreadedBlas single_threaded_blas;
    std::vector<float> s_buf(block_q * block_k), dp_buf(block_q * block_k), dq_acc(block_q * d),
        q_buf(block_q * d), do_buf(block_q * d), o_buf(block_q * d), k_buf(block_k * d), v_buf(block_k * d),
        grad_buf(block_k * d), delta(block_q), lse_row(block_q);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t unit = task / splits, part = task % splits;
      const int64_t sidx = unit / p.heads_kv, hk = unit % p.heads_kv;
      const Sequence& seq = seqs[sidx];
      const Visibility& sv = *vis[sidx];
      std::vector<float>& dk_f = dk_acc[task];
      std::vector<float>& dv_f = dv_acc[task];
      dk_f.assign(seq.len_k * d, 0.f);
      dv_f.assign(seq.len_k * d, 0.f);
      const float* k_head = k + seq.b * p.k_batch_stride + seq.start_k * p.k_row_stride + hk * p.k_head_stride;
      const float* v_head = v + seq.b * p.v_batch_stride + seq.start_k * p.v_row_stride + hk * p.v_head_stride;
      const int64_t nblocks = (seq.len_q + block_q - 1) / block_q;

      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const float* q_head = q + seq.b * p.q_batch_stride + seq.start_q * p.q_row_stride + h * p.q_head_stride;
        const float* o_head =
            o + seq.b * p.out_batch_stride + seq.start_q * p.out_row_stride + h * p.out_head_stride;
        const float* do_head =
            dout + seq.b * p.dout_batch_stride + seq.start_q * p.dout_row_stride + h * p.dout_head_stride;
        float* dq_head = dq + seq.b * p.dq_batch_stride + seq.start_q * p.dq_row_stride + h * p.dq_head_stride;
        const float* lse_head = p.lse + seq.b * p.lse_batch_stride + h * p.lse_head_stride + seq.start_q;

        for (int64_t blk = part; blk < nblocks; blk += splits) {
          const int64_t i0 = blk * block_q, rows = std::min(block_q, seq.len_q - i0);
          int64_t ldq, ldo, lddo;
          const float* qf = load_rows(q_head, p.q_row_stride, i0, rows, d, q_buf.data(), ldq);
          const float* of = load_rows(o_head, p.out_row_stride, i0, rows, d, o_buf.data(), ldo);
          const float* dof = load_rows(do_head, p.dout_row_stride, i0, rows, d, do_buf.data(), lddo);
          for (int64_t r = 0; r < rows; ++r) {  // D_i = dO_i . O_i
            float sum = 0.f;
            for (int64_t t = 0; t < d; ++t) sum += dof[r * lddo + t] * of[r * ldo + t];
            delta[r] = sum;
            lse_row[r] = lse_head[i0 + r];
          }
          std::fill(dq_acc.begin(), dq_acc.end(), 0.f);

          const KeyPlan plan = plan_keys(sv, i0, i0 + rows);
          for_each_chunk(plan, block_k, d, k_head, p.k_row_stride, v_head, p.v_row_stride, k_buf.data(),
                         v_buf.data(), [&](const Chunk& c) {
            const int64_t n = c.n, c0 = c.first;
            const int64_t* idx = c.keys;
            const float *kf = c.k, *vf = c.v;
            const int64_t ldk = c.ldk, ldv = c.ldv;
            float* s = s_buf.data();
            float* dp = dp_buf.data();
            // P = exp(scale * Q K^T - lse), 0 where invisible or the row has no key.
            gemm(false, true, rows, n, d, p.scale, qf, ldq, kf, ldk, 0.f, s, n);
            if (p.bias) add_bias(bias_rows(p, seq.b, h, i0), p.bias_row_stride, rows, c, s, n);
            if (!idx) mask_chunk(sv, i0, rows, c0, n, s, n);
            for (int64_t r = 0; r < rows; ++r) {
              float* row = s + r * n;
              if (lse_row[r] == kNegInf) {
                std::fill(row, row + n, 0.f);
              } else if (std::isnan(lse_row[r])) {
                // The forward saw a NaN in this row: P is NaN at the visible
                // pairs (so the gradients they feed are NaN, as softmax's) and
                // 0 at the invisible ones (-inf scores), which exp(-inf - NaN)
                // would make NaN too.
                for (int64_t j = 0; j < n; ++j) row[j] = row[j] == kNegInf ? 0.f : lse_row[r];
              } else {
                simd.exp_shift_sum(row, n, lse_row[r]);
              }
            }
            // dV += P^T dO (gathered keys: into a scratch block, added below)
            float* dv_dst = idx ? grad_buf.data() : dv_f.data() + c0 * d;
            gemm(true, false, n, d, rows, 1.f, s, n, dof, lddo, idx ? 0.f : 1.f, dv_dst, d);
            if (idx)
              for (int64_t r = 0; r < n; ++r)
                for (int64_t t = 0; t < d; ++t) dv_f[idx[r] * d + t] += grad_buf[r * d + t];
            // dS = P * (dO V^T - D)
            gemm(false, true, rows, n, d, 1.f, dof, lddo, vf, ldv, 0.f, dp, n);
            for (int64_t r = 0; r < rows; ++r) {
              const float* prow = s + r * n;
              float* dsrow = dp + r * n;
              for (int64_t j = 0; j < n; ++j) dsrow[j] = prow[j] * (dsrow[j] - delta[r]);
            }
            if (p.dbias) {  // dS is the bias's gradient (the score's, before the scale)
              float* dbias_rows = p.dbias + ((seq.b * p.heads_q + h) * p.seqlen_q + i0) * p.seqlen_k;
              store_dbias(dp, n, rows, c, dbias_rows, p.seqlen_k);
            }
            // dQ += scale * dS K ; dK += scale * dS^T Q
            gemm(false, false, rows, d, n, p.scale, dp, n, kf, ldk, 1.f, dq_acc.data(), d);
            float* dk_dst = idx ? grad_buf.data() : dk_f.data() + c0 * d;
            gemm(true, false, n, d, rows, p.scale, dp, n, qf, ldq, idx ? 0.f : 1.f, dk_dst, d);
            if (idx)
              for (int64_t r = 0; r < n; ++r)
                for (int64_t t = 0; t < d; ++t) dk_f[idx[r] * d + t] += grad_buf[r * d + t];
          });
          for (int64_t r = 0; r < rows; ++r)
            store_row(dq_acc.data() + r * d, 1.f, d, dq_head + (i0 + r) * p.dq_row_stride);
        }
      }
    }
  });

  // Sum the splits in order and store dK / dV (keys no query sees get 0).
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t sidx = unit / p.heads_kv, hk = unit % p.heads_kv;
      const Sequence& seq = seqs[sidx];
      std::vector<float>& dk_sum = dk_acc[unit * splits];
      std::vector<float>& dv_sum = dv_acc[unit * splits];
      for (int64_t part = 1; part < splits; ++part) {
        const std::vector<float>& dk_part = dk_acc[unit * splits + part];
        const std::vector<float>& dv_part = dv_acc[unit * splits + part];
        for (size_t e = 0; e < dk_sum.size(); ++e) dk_sum[e] += dk_part[e];
        for (size_t e = 0; e < dv_sum.size(); ++e) dv_sum[e] += dv_part[e];
      }
      float* dk_head = dk + seq.b * p.dk_batch_stride + seq.start_k * p.dk_row_stride + hk * p.dk_head_stride;
      float* dv_head = dv + seq.b * p.dv_batch_stride + seq.start_k * p.dv_row_stride + hk * p.dv_head_stride;
      for (int64_t j = 0; j < seq.len_k; ++j) {
        store_row(dk_sum.data() + j * d, 1.f, d, dk_head + j * p.dk_row_stride);
        store_row(dv_sum.data() + j * d, 1.f, d, dv_head + j * p.dv_row_stride);
      }
    }
  });
}

}  // namespace

void flash_forward_cpu(const AttentionParams& params, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat, "flash_forward_cpu takes float32 (the op widens fp16/bf16), got ", dtype);
  forward_impl(params);
}

void flash_backward_cpu(const AttentionGradParams& params, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat, "flash_backward_cpu takes float32 (the op widens fp16/bf16), got ", dtype);
  backward_impl(params);
}

}  // namespace llmkit::attention
