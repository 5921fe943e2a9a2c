// CUDA kernels of the attention family (attention.h), on the current stream.
// Forward for fp16 / bf16 with head_dim <= 128 on sm_80+: tensor cores
// (mma.sync m16n8k16, flash_fwd_tc.cuh). LLMKIT_ATTN_SIMT=1 forces the SIMT
// forward below (read once per process), e.g. to compare the two paths.
// Everything else (float32, head_dim > 128, the backward) uses
// plain SIMT tiles with float32 accumulation: every tile
// is staged in shared memory as float32, rows padded by one float so that the
// 16 threads of a half-warp reading 16 different rows hit 16 different banks.
//
// 128 threads per CTA, seen as an 8 x 16 grid (ty = tid / 16, tx = tid % 16):
// a thread owns kBM / 8 consecutive query rows and the columns tx + 16 c, so
// the 16 threads of one row are one half-warp and row reductions are four
// shuffles. One template per head-dim bound (64, 128, 256) with the real
// head_dim a runtime loop bound, like flash-attn's one launch per head dim.
//
// forward:  one CTA per (query tile, query head, sequence); online softmax
//           over the key tiles the tile can see.
// backward: recomputes P from lse, no seqlen^2 buffer, no atomics:
//   bwd_dot   D_i = dout_i . out_i (float buffer)
//   bwd_dkdv  one CTA per (key tile, kv head, sequence) loops the query heads
//             of its GQA group and the query tiles that can see it, dK/dV in
//             registers;
//   bwd_dq    one CTA per (query tile, query head, sequence) loops its key tiles.
// Every output element has exactly one writer and a fixed summation order, so
// the backward is deterministic as it is: params.deterministic needs no path.
//
// Cost is O(seqlen * window): a CTA visits only the tiles that hold a visible
// pair, the window's tile range from the formula, plus (global tokens) the
// tiles of a precomputed per-sequence list of tiles holding a global token.
// A tile with a global query sees every key tile.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "attention/attention.h"
#include "common/dispatch.h"

namespace llmkit::attention {
namespace {

constexpr int kThreads = 128;
constexpr int kTY = 8;   // thread rows
constexpr int kTX = 16;  // thread columns (one half-warp)
static_assert(kTY * kTX == kThreads, "thread grid");

// The global-token tile list of the backward serves both the query tiles of
// bwd_dkdv and the key tiles of bwd_dq (sq == sk with global tokens).
constexpr int kBwdGlobalTile = 32;

// Tile shapes per head-dim bound. Shared memory (float32, padded rows):
//   fwd:  Q kBM x kD, K-then-V kBN x kD (one buffer), P kBM x kBN
//   dkdv: K, V kBN x kD, Q, dO kBM x kD, P, dS kBM x kBN
//   dq:   Q, dO kBM x kD, K, V kBN x kD, dS kBM x kBN
// (fwd 49 / 81 / 68 KB, dkdv 65 / 73 / 101 KB, dq 57 / 69 / 133 KB for kD
// 64 / 128 / 256: within sm_80's and sm_90's opt-in limits; kD <= 128 also
// within sm_86 / sm_89's 99 KB, kD 256's backward not).
// Register tiles stay at <= 64 accumulators per thread.
template <int kD> struct Cfg;
template <> struct Cfg<64> {
  static constexpr int kFwdBM = 64, kFwdBN = 64;
  static constexpr int kKvBN = 64, kKvBM = 32;
  static constexpr int kQBM = 64, kQBN = 32;
};
template <> struct Cfg<128> {
  static constexpr int kFwdBM = 64, kFwdBN = 64;
  static constexpr int kKvBN = 32, kKvBM = 32;
  static constexpr int kQBM = 32, kQBN = 32;  // 32 query rows: dQ fits sm_86 / sm_89
};
template <> struct Cfg<256> {
  static constexpr int kFwdBM = 32, kFwdBN = 32;
  static constexpr int kKvBN = 16, kKvBM = 32;
  static constexpr int kQBM = 32, kQBN = 32;
};

// Device element types (torch's Half/BFloat16 operators are off in nvcc here).
template <typename T> struct DeviceType { using type = T; };
template <> struct DeviceType<at::Half> { using type = __half; };
template <> struct DeviceType<at::BFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename D> __device__ __forceinline__ D from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// max that returns NaN when either is NaN (fmaxf returns the other one): the
// running row max of the online softmax must turn NaN with a NaN score, so
// that lse is NaN, not +inf, for a row holding a NaN and a +inf (the CPU
// kernel and the reference agree); a finite max would only make l NaN.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Reductions over the 16 threads of one row (a half-warp; xor < 16 stays in it).
// Every lane of the warp must call them.
__device__ __forceinline__ float row_max(float v) {
#pragma unroll
  for (int s = 8; s > 0; s >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, s));
  return v;
}
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int s = 8; s > 0; s >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, s));
  return v;
}

// One sequence's rows: start row in the (packed) tensors and lengths.
struct Seq {
  int64_t q_start, k_start;
  int sq, sk;
};
__device__ __forceinline__ Seq sequence(const AttentionParams& p, int64_t b) {
  Seq s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_start = p.cu_seqlens_q[b];
    s.sq = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
  } else {
    s.q_start = 0;
    s.sq = static_cast<int>(p.seqlen_q);
  }
  if (p.cu_seqlens_k != nullptr) {
    s.k_start = p.cu_seqlens_k[b];
    s.sk = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
  } else {
    s.k_start = 0;
    s.sk = static_cast<int>(p.seqlen_k);
  }
  return s;
}

// in_window(i, j) of attention.h, with off = sk - sq. Windows are clamped on
// the host to at most seqlen_q + seqlen_k + 1, so int64 never overflows.
struct Window {
  int64_t off, left, right;
  __device__ __forceinline__ bool operator()(int i, int j) const {
    const int64_t d = static_cast<int64_t>(j) - i - off;  // j - (i + sk - sq)
    return (left < 0 || d >= -left) && (right < 0 || d <= right);
  }
  // Key tiles [lo, hi] (of `tile` keys) holding a key in the window of some
  // query of [q0, q1); empty (hi < lo) when there is none.
  __device__ __forceinline__ void key_tiles(int q0, int q1, int sk, int tile, int& lo, int& hi) const {
    int64_t a = 0, z = static_cast<int64_t>(sk) - 1;
    if (left >= 0) a = max(a, static_cast<int64_t>(q0) + off - left);
    if (right >= 0) z = min(z, static_cast<int64_t>(q1) - 1 + off + right);
    lo = 0;
    hi = -1;
    if (a <= z) {
      lo = static_cast<int>(a / tile);
      hi = static_cast<int>(z / tile);
    }
  }
  // Query tiles [lo, hi] holding a query whose window holds a key of [k0, k1):
  // i in [j - off - right, j - off + left].
  __device__ __forceinline__ void query_tiles(int k0, int k1, int sq, int tile, int& lo, int& hi) const {
    int64_t a = 0, z = static_cast<int64_t>(sq) - 1;
    if (right >= 0) a = max(a, static_cast<int64_t>(k0) - off - right);
    if (left >= 0) z = min(z, static_cast<int64_t>(k1) - 1 - off + left);
    lo = 0;
    hi = -1;
    if (a <= z) {
      lo = static_cast<int>(a / tile);
      hi = static_cast<int>(z / tile);
    }
  }
};

__device__ __forceinline__ const unsigned char* global_flags(const AttentionParams& p, int64_t b, const Seq& s) {
  if (p.global_tokens == nullptr) return nullptr;
  return reinterpret_cast<const unsigned char*>(p.global_tokens) + b * p.global_batch_stride + s.q_start;
}

// Stages rows [0, rows) x [0, head_dim) of a (row_stride, contiguous) slice as
// float32 into dst (kRows x (kD + 1)); everything else is zero-filled, so the
// compute loops may run over whole tiles.
template <int kRows, int kD, typename D>
__device__ __forceinline__ void load_tile(float* __restrict__ dst, const D* __restrict__ src, int64_t row_stride,
                                          int rows, int head_dim) {
  for (int e = threadIdx.x; e < kRows * kD; e += kThreads) {
    const int r = e / kD, d = e % kD;
    float v = 0.0f;
    if (r < rows && d < head_dim) v = to_float(src[r * row_stride + d]);
    dst[r * (kD + 1) + d] = v;
  }
}

// Decodes blockIdx.x = tile + tiles * (head + heads * batch).
__device__ __forceinline__ void decode_block(int tiles, int64_t heads, int& tile, int& head, int64_t& b) {
  const int64_t x = blockIdx.x;
  tile = static_cast<int>(x % tiles);
  const int64_t rest = x / tiles;
  head = static_cast<int>(rest % heads);
  b = rest / heads;
}

// Per sequence, the sorted indices of the `tile`-row tiles holding a global
// token: list[b * max_tiles + n] for n < count[b]. One warp per sequence.
__global__ void global_tile_list_kernel(const __grid_constant__ AttentionParams p, int tile, int max_tiles,
                                        int* __restrict__ count, int* __restrict__ list) {
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x;
  const Seq s = sequence(p, b);
  const unsigned char* g = global_flags(p, b, s);
  const int tiles = (s.sq + tile - 1) / tile;
  int n = 0;
  for (int base = 0; base < tiles; base += 32) {
    const int t = base + lane;
    bool flag = false;
    if (t < tiles) {
      const int end = min(s.sq, (t + 1) * tile);
      for (int i = t * tile; i < end && !flag; ++i) flag = g[i] != 0;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    if (flag) list[b * max_tiles + n + __popc(ballot & ((1u << lane) - 1u))] = t;
    n += __popc(ballot);
  }
  if (lane == 0) count[b] = n;
}

// The loop over a CTA's partner tiles: first the window range [lo, hi], then
// the global-token list entries outside it. Returns the tile of step `it`, or
// -1 for a list entry already visited in the range (uniform over the CTA).
__device__ __forceinline__ int partner_tile(int it, int lo, int n_range, const int* list) {
  if (it < n_range) return lo + it;
  const int t = list[it - n_range];
  return (t >= lo && t < lo + n_range) ? -1 : t;
}

// The key tiles (of `tile` keys) a forward query tile [q0, q0 + qn) visits:
// every tile when one of its queries is global, else the window's range, then
// the global-token list entries outside it. Shared by both forward kernels;
// `tile` must be the tile of the list (global_tiles(p, tile)).
struct KeyTiles {
  int lo, n_range, n_list;
  const int* list;
  __device__ __forceinline__ int count() const { return n_range + n_list; }
  __device__ __forceinline__ int at(int it) const { return partner_tile(it, lo, n_range, list); }
  // The first step >= it holding a tile not yet visited, or count().
  __device__ __forceinline__ int next(int it) const {
    while (it < count() && at(it) < 0) ++it;
    return it;
  }
};
__device__ __forceinline__ KeyTiles forward_key_tiles(const Window& w, const Seq& s, int64_t b, int q0, int qn,
                                                      int tile, bool q_global, const unsigned char* g,
                                                      const int* gcount, const int* glist, int gmax) {
  const int k_tiles = (s.sk + tile - 1) / tile;
  int lo = 0, hi = k_tiles - 1;
  if (!q_global) w.key_tiles(q0, q0 + qn, s.sk, tile, lo, hi);
  KeyTiles t;
  t.lo = lo;
  t.n_range = max(0, hi - lo + 1);
  t.n_list = (g != nullptr && !q_global) ? gcount[b] : 0;
  t.list = glist + b * gmax;
  return t;
}

// --------------------------------------------------------------- forward ----
template <typename T, int kD, int kBM, int kBN>
__global__ void __launch_bounds__(kThreads)
    flash_fwd_kernel(const __grid_constant__ AttentionParams p, int q_tiles, const int* __restrict__ gcount,
                     const int* __restrict__ glist, int gmax) {
  using D = typename DeviceType<T>::type;
  constexpr int kRM = kBM / kTY;  // query rows per thread
  constexpr int kCN = kBN / kTX;  // keys per thread in the score tile
  constexpr int kCD = kD / kTX;   // output columns per thread
  constexpr int kLd = kD + 1, kLp = kBN + 1;
  static_assert(kBM <= kThreads && kBN <= kThreads, "flag loads use one thread per row");
  extern __shared__ float smem[];
  float* sQ = smem;                // kBM x kLd
  float* sKV = sQ + kBM * kLd;     // kBN x kLd: K, then V of the same tile
  float* sP = sKV + kBN * kLd;     // kBM x kLp
  __shared__ unsigned char sQg[kBM], sKg[kBN];

  const int tid = threadIdx.x, ty = tid / kTX, tx = tid % kTX;
  int qt, h;
  int64_t b;
  decode_block(q_tiles, p.heads_q, qt, h, b);
  const Seq s = sequence(p, b);
  const int q0 = qt * kBM;
  if (q0 >= s.sq) return;  // past this sequence's end (varlen: grid covers the max)
  const int qn = min(kBM, s.sq - q0);
  const int hk = static_cast<int>(h / (p.heads_q / p.heads_kv));
  const int hd = static_cast<int>(p.head_dim);
  const Window w{static_cast<int64_t>(s.sk) - s.sq, p.window_left, p.window_right};
  const unsigned char* g = global_flags(p, b, s);

  const D* qp = static_cast<const D*>(p.q) + b * p.q_batch_stride + (s.q_start + q0) * p.q_row_stride +
                h * p.q_head_stride;
  const D* kp = static_cast<const D*>(p.k) + b * p.k_batch_stride + s.k_start * p.k_row_stride +
                hk * p.k_head_stride;
  const D* vp = static_cast<const D*>(p.v) + b * p.v_batch_stride + s.k_start * p.v_row_stride +
                hk * p.v_head_stride;

  load_tile<kBM, kD>(sQ, qp, p.q_row_stride, qn, hd);
  int mine = 0;
  if (tid < kBM) {
    mine = g != nullptr && tid < qn && g[q0 + tid] != 0;
    sQg[tid] = static_cast<unsigned char>(mine);
  }
  const bool q_global = __syncthreads_or(mine) != 0;  // also publishes sQ

  float m[kRM], l[kRM], acc[kRM][kCD];
#pragma unroll
  for (int r = 0; r < kRM; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < kCD; ++c) acc[r][c] = 0.0f;
  }

  const KeyTiles tiles = forward_key_tiles(w, s, b, q0, qn, kBN, q_global, g, gcount, glist, gmax);

  for (int it = 0; it < tiles.count(); ++it) {
    const int kt = tiles.at(it);
    if (kt < 0) continue;
    const int k0 = kt * kBN;
    const int kn = min(kBN, s.sk - k0);
    __syncthreads();  // the previous tile's readers of sKV / sP are done
    load_tile<kBN, kD>(sKV, kp + k0 * p.k_row_stride, p.k_row_stride, kn, hd);
    if (tid < kBN) sKg[tid] = g != nullptr && tid < kn && g[k0 + tid] != 0;
    __syncthreads();

    float sc[kRM][kCN];
#pragma unroll
    for (int r = 0; r < kRM; ++r)
#pragma unroll
      for (int c = 0; c < kCN; ++c) sc[r][c] = 0.0f;
    for (int d0 = 0; d0 < hd; d0 += 8) {  // head_dim is a multiple of 8
#pragma unroll
      for (int dd = 0; dd < 8; ++dd) {
        const int d = d0 + dd;
        float a[kRM], k[kCN];
#pragma unroll
        for (int r = 0; r < kRM; ++r) a[r] = sQ[(ty * kRM + r) * kLd + d];
#pragma unroll
        for (int c = 0; c < kCN; ++c) k[c] = sKV[(tx + c * kTX) * kLd + d];
#pragma unroll
        for (int r = 0; r < kRM; ++r)
#pragma unroll
          for (int c = 0; c < kCN; ++c) sc[r][c] = __fmaf_rn(a[r], k[c], sc[r][c]);
      }
    }

    // Mask, then the online softmax: m is the running row max of the visible
    // scores (-inf while none was seen); exponents use m_use = 0 then, so a
    // fully masked row gives exp(-inf) = 0 everywhere and never inf - inf.
#pragma unroll
    for (int r = 0; r < kRM; ++r) {
      const int row = ty * kRM + r;
      float mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < kCN; ++c) {
        const int col = tx + c * kTX;
        const bool vis = row < qn && col < kn &&
                         (w(q0 + row, k0 + col) || (g != nullptr && (sQg[row] | sKg[col]) != 0));
        sc[r][c] = vis ? __fmul_rn(sc[r][c], p.scale) : -INFINITY;
        mx = nan_max(mx, sc[r][c]);
      }
      mx = row_max(mx);
      const float m_new = nan_max(m[r], mx);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = expf(__fsub_rn(m[r], m_use));  // 0 while m was -inf
      m[r] = m_new;
      l[r] = __fmul_rn(l[r], alpha);
#pragma unroll
      for (int c = 0; c < kCD; ++c) acc[r][c] = __fmul_rn(acc[r][c], alpha);
#pragma unroll
      for (int c = 0; c < kCN; ++c) {
        const float e = expf(__fsub_rn(sc[r][c], m_use));
        l[r] = __fadd_rn(l[r], e);
        sP[row * kLp + tx + c * kTX] = e;
      }
    }
    __syncthreads();  // K reads done, P complete
    load_tile<kBN, kD>(sKV, vp + k0 * p.v_row_stride, p.v_row_stride, kn, hd);
    __syncthreads();

#pragma unroll 4
    for (int j = 0; j < kn; ++j) {
      float pr[kRM];
#pragma unroll
      for (int r = 0; r < kRM; ++r) pr[r] = sP[(ty * kRM + r) * kLp + j];
#pragma unroll
      for (int c = 0; c < kCD; ++c) {
        if (c * kTX >= hd) break;  // uniform: column chunks past head_dim
        const float v = sKV[j * kLd + tx + c * kTX];
#pragma unroll
        for (int r = 0; r < kRM; ++r) acc[r][c] = __fmaf_rn(pr[r], v, acc[r][c]);
      }
    }
  }

  D* op = static_cast<D*>(p.out) + b * p.out_batch_stride + (s.q_start + q0) * p.out_row_stride +
          h * p.out_head_stride;
  float* lp = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + s.q_start + q0;
#pragma unroll
  for (int r = 0; r < kRM; ++r) {
    // lt > 0 iff the row saw a key (its max contributes exp(0)); NaN when a
    // visible score was NaN (m is NaN then, and so is every exp), and the
    // row then gets NaN out and lse like softmax, not the no-key 0 / -inf.
    const float lt = row_sum(l[r]);
    const int row = ty * kRM + r;
    if (row < qn) {
#pragma unroll
      for (int c = 0; c < kCD; ++c) {
        const int col = tx + c * kTX;
        if (col < hd) op[row * p.out_row_stride + col] = from_float<D>(lt != 0.0f ? __fdiv_rn(acc[r][c], lt) : 0.0f);
      }
      // a +inf score: logsumexp +inf (lt is NaN there, from inf - inf), as the CPU kernel
      if (tx == 0) lp[row] = lt != 0.0f ? (m[r] == INFINITY ? INFINITY : __fadd_rn(m[r], logf(lt))) : -INFINITY;
    }
  }
}

// Tensor-core forward (fp16 / bf16, head_dim <= 128, sm_80+): tc::fwd_kernel.
#include "attention/flash_fwd_tc.cuh"

// -------------------------------------------------------------- backward ----
// D_i = dout_i . out_i, one warp per (sequence, query head, row), stored at
// dbuf[(b * heads_q + h) * seqlen_q + i] (seqlen_q: the max length).
template <typename T>
__global__ void __launch_bounds__(256)
    bwd_dot_kernel(const __grid_constant__ AttentionGradParams p, float* __restrict__ dbuf) {
  using D = typename DeviceType<T>::type;
  const int64_t wi = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (wi >= p.batch * p.heads_q * p.seqlen_q) return;
  const int64_t i = wi % p.seqlen_q;
  const int64_t h = (wi / p.seqlen_q) % p.heads_q;
  const int64_t b = wi / (p.seqlen_q * p.heads_q);
  const Seq s = sequence(p, b);
  if (i >= s.sq) return;
  const D* o = static_cast<const D*>(p.out) + b * p.out_batch_stride + (s.q_start + i) * p.out_row_stride +
               h * p.out_head_stride;
  const D* dout = static_cast<const D*>(p.dout) + b * p.dout_batch_stride + (s.q_start + i) * p.dout_row_stride +
                  h * p.dout_head_stride;
  float acc = 0.0f;
  for (int64_t d = lane; d < p.head_dim; d += 32) acc = __fmaf_rn(to_float(dout[d]), to_float(o[d]), acc);
#pragma unroll
  for (int sft = 16; sft > 0; sft >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(0xffffffffu, acc, sft));
  if (lane == 0) dbuf[wi] = acc;
}

// Loads the per-row backward inputs of a query tile: lse, D and global flags.
// Returns whether a row of the tile is a global token (a CTA-wide barrier).
template <int kBM>
__device__ __forceinline__ bool load_row_stats(const AttentionGradParams& p, int64_t b, int h, const Seq& s, int q0,
                                               int qn, const float* __restrict__ dbuf, const unsigned char* g,
                                               float* sLse, float* sDi, unsigned char* sQg) {
  const int tid = threadIdx.x;
  int mine = 0;
  if (tid < kBM) {
    const bool in = tid < qn;
    sLse[tid] = in ? p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + s.q_start + q0 + tid] : -INFINITY;
    sDi[tid] = in ? dbuf[(b * p.heads_q + h) * p.seqlen_q + q0 + tid] : 0.0f;
    mine = g != nullptr && in && g[q0 + tid] != 0;
    sQg[tid] = static_cast<unsigned char>(mine);
  }
  return __syncthreads_or(mine) != 0;
}

// S = Q K^T and dP = dO V^T of one (query tile, key tile), then P (dkdv only)
// and dS into shared memory: P = exp(scale s - lse) where visible (0 for
// lse = -inf rows), dS = P (dP - D). Thread (ty, tx) owns rows ty * kRM + r,
// keys tx + 16 c.
template <int kD, int kBM, int kBN, bool kStoreP>
__device__ __forceinline__ void bwd_scores(const AttentionGradParams& p, const Window& w, int hd, int q0, int qn,
                                           int k0, int kn, const unsigned char* g, const float* sQ, const float* sO,
                                           const float* sK, const float* sV, const float* sLse, const float* sDi,
                                           const unsigned char* sQg, const unsigned char* sKg, float* sP,
                                           float* sS) {
  constexpr int kRM = kBM / kTY, kCN = kBN / kTX, kLd = kD + 1, kLs = kBN + 1;
  static_assert(kCN >= 1 && kRM >= 1, "tile too small for the thread grid");
  const int ty = threadIdx.x / kTX, tx = threadIdx.x % kTX;
  float sc[kRM][kCN], dp[kRM][kCN];
#pragma unroll
  for (int r = 0; r < kRM; ++r)
#pragma unroll
    for (int c = 0; c < kCN; ++c) sc[r][c] = dp[r][c] = 0.0f;
  for (int d0 = 0; d0 < hd; d0 += 8) {
#pragma unroll
    for (int dd = 0; dd < 8; ++dd) {
      const int d = d0 + dd;
      float a[kRM], o[kRM], k[kCN], v[kCN];
#pragma unroll
      for (int r = 0; r < kRM; ++r) {
        a[r] = sQ[(ty * kRM + r) * kLd + d];
        o[r] = sO[(ty * kRM + r) * kLd + d];
      }
#pragma unroll
      for (int c = 0; c < kCN; ++c) {
        k[c] = sK[(tx + c * kTX) * kLd + d];
        v[c] = sV[(tx + c * kTX) * kLd + d];
      }
#pragma unroll
      for (int r = 0; r < kRM; ++r)
#pragma unroll
        for (int c = 0; c < kCN; ++c) {
          sc[r][c] = __fmaf_rn(a[r], k[c], sc[r][c]);
          dp[r][c] = __fmaf_rn(o[r], v[c], dp[r][c]);
        }
    }
  }
#pragma unroll
  for (int r = 0; r < kRM; ++r) {
    const int row = ty * kRM + r;
    const float lse = sLse[row];
    const float di = sDi[row];
#pragma unroll
    for (int c = 0; c < kCN; ++c) {
      const int col = tx + c * kTX;
      const bool vis = row < qn && col < kn && lse != -INFINITY &&
                       (w(q0 + row, k0 + col) || (g != nullptr && (sQg[row] | sKg[col]) != 0));
      const float pe = vis ? expf(__fsub_rn(__fmul_rn(sc[r][c], p.scale), lse)) : 0.0f;
      if constexpr (kStoreP) sP[row * kLs + col] = pe;
      sS[row * kLs + col] = __fmul_rn(pe, __fsub_rn(dp[r][c], di));
    }
  }
}

// dK, dV of one key tile: sum over the query heads of the GQA group and the
// query tiles that see the tile. dV_j = sum_i P_ij dO_i, dK_j = scale sum_i dS_ij Q_i.
template <typename T, int kD, int kBN, int kBM>
__global__ void __launch_bounds__(kThreads)
    flash_bwd_dkdv_kernel(const __grid_constant__ AttentionGradParams p, int k_tiles, const float* __restrict__ dbuf,
                          const int* __restrict__ gcount, const int* __restrict__ glist, int gmax) {
  using D = typename DeviceType<T>::type;
  constexpr int kRN = kBN / kTY;  // keys per thread in the accumulators
  constexpr int kCD = kD / kTX;   // head-dim columns per thread
  constexpr int kLd = kD + 1, kLs = kBN + 1;
  static_assert(kBM <= kThreads && kBN <= kThreads && kRN >= 1, "tile shape");
  extern __shared__ float smem[];
  float* sK = smem;              // kBN x kLd
  float* sV = sK + kBN * kLd;    // kBN x kLd
  float* sQ = sV + kBN * kLd;    // kBM x kLd
  float* sO = sQ + kBM * kLd;    // kBM x kLd (dout)
  float* sP = sO + kBM * kLd;    // kBM x kLs
  float* sS = sP + kBM * kLs;    // kBM x kLs (dS)
  __shared__ float sLse[kBM], sDi[kBM];
  __shared__ unsigned char sQg[kBM], sKg[kBN];

  const int tid = threadIdx.x, ty = tid / kTX, tx = tid % kTX;
  int kt, hk;
  int64_t b;
  decode_block(k_tiles, p.heads_kv, kt, hk, b);
  const Seq s = sequence(p, b);
  const int k0 = kt * kBN;
  if (k0 >= s.sk) return;
  const int kn = min(kBN, s.sk - k0);
  const int hd = static_cast<int>(p.head_dim);
  const Window w{static_cast<int64_t>(s.sk) - s.sq, p.window_left, p.window_right};
  const unsigned char* g = global_flags(p, b, s);

  load_tile<kBN, kD>(sK,
                     static_cast<const D*>(p.k) + b * p.k_batch_stride + (s.k_start + k0) * p.k_row_stride +
                         hk * p.k_head_stride,
                     p.k_row_stride, kn, hd);
  load_tile<kBN, kD>(sV,
                     static_cast<const D*>(p.v) + b * p.v_batch_stride + (s.k_start + k0) * p.v_row_stride +
                         hk * p.v_head_stride,
                     p.v_row_stride, kn, hd);
  int mine = 0;
  if (tid < kBN) {
    mine = g != nullptr && tid < kn && g[k0 + tid] != 0;  // g is indexed by q rows: sq == sk here
    sKg[tid] = static_cast<unsigned char>(mine);
  }
  const bool k_global = __syncthreads_or(mine) != 0;

  float dk[kRN][kCD], dv[kRN][kCD];
#pragma unroll
  for (int r = 0; r < kRN; ++r)
#pragma unroll
    for (int c = 0; c < kCD; ++c) dk[r][c] = dv[r][c] = 0.0f;

  const int q_tiles = (s.sq + kBM - 1) / kBM;
  int lo = 0, hi = q_tiles - 1;
  if (!k_global) w.query_tiles(k0, k0 + kn, s.sq, kBM, lo, hi);
  const int n_range = max(0, hi - lo + 1);
  const int n_list = (g != nullptr && !k_global) ? gcount[b] : 0;
  const int* list = glist + b * gmax;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);

  for (int gi = 0; gi < group; ++gi) {
    const int h = hk * group + gi;
    for (int it = 0; it < n_range + n_list; ++it) {
      const int qt = partner_tile(it, lo, n_range, list);
      if (qt < 0) continue;
      const int q0 = qt * kBM;
      const int qn = min(kBM, s.sq - q0);
      __syncthreads();  // the previous step's readers of sQ / sO / sP / sS are done
      load_tile<kBM, kD>(sQ,
                         static_cast<const D*>(p.q) + b * p.q_batch_stride + (s.q_start + q0) * p.q_row_stride +
                             h * p.q_head_stride,
                         p.q_row_stride, qn, hd);
      load_tile<kBM, kD>(sO,
                         static_cast<const D*>(p.dout) + b * p.dout_batch_stride +
                             (s.q_start + q0) * p.dout_row_stride + h * p.dout_head_stride,
                         p.dout_row_stride, qn, hd);
      load_row_stats<kBM>(p, b, h, s, q0, qn, dbuf, g, sLse, sDi, sQg);  // barrier
      bwd_scores<kD, kBM, kBN, true>(p, w, hd, q0, qn, k0, kn, g, sQ, sO, sK, sV, sLse, sDi, sQg, sKg, sP, sS);
      __syncthreads();

#pragma unroll 2
      for (int i = 0; i < qn; ++i) {
        float pr[kRN], ds[kRN];
#pragma unroll
        for (int r = 0; r < kRN; ++r) {
          pr[r] = sP[i * kLs + ty * kRN + r];
          ds[r] = sS[i * kLs + ty * kRN + r];
        }
#pragma unroll
        for (int c = 0; c < kCD; ++c) {
          if (c * kTX >= hd) break;  // uniform
          const float o = sO[i * kLd + tx + c * kTX];
          const float q = sQ[i * kLd + tx + c * kTX];
#pragma unroll
          for (int r = 0; r < kRN; ++r) {
            dv[r][c] = __fmaf_rn(pr[r], o, dv[r][c]);
            dk[r][c] = __fmaf_rn(ds[r], q, dk[r][c]);
          }
        }
      }
    }
  }

  // Every key row of the tile is written, zeros where no query saw it.
  D* dkp = static_cast<D*>(p.dk) + b * p.dk_batch_stride + (s.k_start + k0) * p.dk_row_stride + hk * p.dk_head_stride;
  D* dvp = static_cast<D*>(p.dv) + b * p.dv_batch_stride + (s.k_start + k0) * p.dv_row_stride + hk * p.dv_head_stride;
#pragma unroll
  for (int r = 0; r < kRN; ++r) {
    const int key = ty * kRN + r;
    if (key >= kn) continue;
#pragma unroll
    for (int c = 0; c < kCD; ++c) {
      const int col = tx + c * kTX;
      if (col >= hd) continue;
      dkp[key * p.dk_row_stride + col] = from_float<D>(__fmul_rn(dk[r][c], p.scale));
      dvp[key * p.dv_row_stride + col] = from_float<D>(dv[r][c]);
    }
  }
}

// dQ of one query tile over the key tiles it sees: dQ_i = scale sum_j dS_ij K_j.
template <typename T, int kD, int kBM, int kBN>
__global__ void __launch_bounds__(kThreads)
    flash_bwd_dq_kernel(const __grid_constant__ AttentionGradParams p, int q_tiles, const float* __restrict__ dbuf,
                        const int* __restrict__ gcount, const int* __restrict__ glist, int gmax) {
  using D = typename DeviceType<T>::type;
  constexpr int kRM = kBM / kTY;  // query rows per thread
  constexpr int kCD = kD / kTX;   // head-dim columns per thread
  constexpr int kLd = kD + 1, kLs = kBN + 1;
  static_assert(kBM <= kThreads && kBN <= kThreads, "tile shape");
  extern __shared__ float smem[];
  float* sQ = smem;              // kBM x kLd
  float* sO = sQ + kBM * kLd;    // kBM x kLd (dout)
  float* sK = sO + kBM * kLd;    // kBN x kLd
  float* sV = sK + kBN * kLd;    // kBN x kLd
  float* sS = sV + kBN * kLd;    // kBM x kLs (dS)
  __shared__ float sLse[kBM], sDi[kBM];
  __shared__ unsigned char sQg[kBM], sKg[kBN];

  const int tid = threadIdx.x, ty = tid / kTX, tx = tid % kTX;
  int qt, h;
  int64_t b;
  decode_block(q_tiles, p.heads_q, qt, h, b);
  const Seq s = sequence(p, b);
  const int q0 = qt * kBM;
  if (q0 >= s.sq) return;
  const int qn = min(kBM, s.sq - q0);
  const int hk = static_cast<int>(h / (p.heads_q / p.heads_kv));
  const int hd = static_cast<int>(p.head_dim);
  const Window w{static_cast<int64_t>(s.sk) - s.sq, p.window_left, p.window_right};
  const unsigned char* g = global_flags(p, b, s);

  load_tile<kBM, kD>(sQ,
                     static_cast<const D*>(p.q) + b * p.q_batch_stride + (s.q_start + q0) * p.q_row_stride +
                         h * p.q_head_stride,
                     p.q_row_stride, qn, hd);
  load_tile<kBM, kD>(sO,
                     static_cast<const D*>(p.dout) + b * p.dout_batch_stride + (s.q_start + q0) * p.dout_row_stride +
                         h * p.dout_head_stride,
                     p.dout_row_stride, qn, hd);
  const bool q_global = load_row_stats<kBM>(p, b, h, s, q0, qn, dbuf, g, sLse, sDi, sQg);  // barrier

  const D* kp = static_cast<const D*>(p.k) + b * p.k_batch_stride + s.k_start * p.k_row_stride + hk * p.k_head_stride;
  const D* vp = static_cast<const D*>(p.v) + b * p.v_batch_stride + s.k_start * p.v_row_stride + hk * p.v_head_stride;

  float dq[kRM][kCD];
#pragma unroll
  for (int r = 0; r < kRM; ++r)
#pragma unroll
    for (int c = 0; c < kCD; ++c) dq[r][c] = 0.0f;

  const int k_tiles = (s.sk + kBN - 1) / kBN;
  int lo = 0, hi = k_tiles - 1;
  if (!q_global) w.key_tiles(q0, q0 + qn, s.sk, kBN, lo, hi);
  const int n_range = max(0, hi - lo + 1);
  const int n_list = (g != nullptr && !q_global) ? gcount[b] : 0;
  const int* list = glist + b * gmax;

  for (int it = 0; it < n_range + n_list; ++it) {
    const int kt = partner_tile(it, lo, n_range, list);
    if (kt < 0) continue;
    const int k0 = kt * kBN;
    const int kn = min(kBN, s.sk - k0);
    __syncthreads();  // the previous step's readers of sK / sV / sS are done
    load_tile<kBN, kD>(sK, kp + k0 * p.k_row_stride, p.k_row_stride, kn, hd);
    load_tile<kBN, kD>(sV, vp + k0 * p.v_row_stride, p.v_row_stride, kn, hd);
    if (tid < kBN) sKg[tid] = g != nullptr && tid < kn && g[k0 + tid] != 0;
    __syncthreads();
    bwd_scores<kD, kBM, kBN, false>(p, w, hd, q0, qn, k0, kn, g, sQ, sO, sK, sV, sLse, sDi, sQg, sKg, nullptr, sS);
    __syncthreads();

#pragma unroll 4
    for (int j = 0; j < kn; ++j) {
      float ds[kRM];
#pragma unroll
      for (int r = 0; r < kRM; ++r) ds[r] = sS[(ty * kRM + r) * kLs + j];
#pragma unroll
      for (int c = 0; c < kCD; ++c) {
        if (c * kTX >= hd) break;  // uniform
        const float k = sK[j * kLd + tx + c * kTX];
#pragma unroll
        for (int r = 0; r < kRM; ++r) dq[r][c] = __fmaf_rn(ds[r], k, dq[r][c]);
      }
    }
  }

  D* dqp = static_cast<D*>(p.dq) + b * p.dq_batch_stride + (s.q_start + q0) * p.dq_row_stride + h * p.dq_head_stride;
#pragma unroll
  for (int r = 0; r < kRM; ++r) {
    const int row = ty * kRM + r;
    if (row >= qn) continue;
#pragma unroll
    for (int c = 0; c < kCD; ++c) {
      const int col = tx + c * kTX;
      if (col < hd) dqp[row * p.dq_row_stride + col] = from_float<D>(__fmul_rn(dq[r][c], p.scale));
    }
  }
}

// ------------------------------------------------------------------ host ----
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// flash-attn's convention: any negative window is unbounded; a window wider
// than both sequences is the same as unbounded and is clamped so that the
// kernels' int64 arithmetic cannot overflow.
template <typename P>
P normalized(const P& params) {
  P p = params;
  const int64_t wide = p.seqlen_q + p.seqlen_k + 1;
  p.window_left = p.window_left < 0 ? -1 : std::min(p.window_left, wide);
  p.window_right = p.window_right < 0 ? -1 : std::min(p.window_right, wide);
  return p;
}

// The grid is one flat x dimension (2^31 - 1 blocks) so that batch or heads
// beyond 65535 need no special case.
unsigned flat_grid(int64_t tiles, int64_t heads, int64_t batch) {
  const int64_t n = tiles * heads * batch;
  TORCH_CHECK(n < (int64_t{1} << 31), "flash attention: grid of ", n, " blocks is too large");
  return static_cast<unsigned>(n);
}

at::TensorOptions device_options(at::ScalarType dtype) {
  return at::TensorOptions().dtype(dtype).device(at::Device(at::kCUDA, c10::cuda::current_device()));
}

// The per-sequence list of `tile`-row tiles holding a global token; the
// returned tensor owns count (batch ints) then list (batch x max_tiles).
struct GlobalTiles {
  at::Tensor buffer;
  const int* count = nullptr;
  const int* list = nullptr;
  int max_tiles = 0;
};
GlobalTiles global_tiles(const AttentionParams& p, int tile, cudaStream_t stream) {
  GlobalTiles t;
  if (p.global_tokens == nullptr) return t;
  const int64_t max_tiles = ceil_div(p.seqlen_q, tile);
  t.buffer = at::empty({p.batch * (max_tiles + 1)}, device_options(at::kInt));
  int* count = t.buffer.data_ptr<int>();
  int* list = count + p.batch;
  global_tile_list_kernel<<<static_cast<unsigned>(p.batch), 32, 0, stream>>>(p, tile, static_cast<int>(max_tiles),
                                                                            count, list);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  t.count = count;
  t.list = list;
  t.max_tiles = static_cast<int>(max_tiles);
  return t;
}

// Dynamic shared memory above 48 KB needs an explicit opt-in per kernel. It
// fails on GPUs with a smaller opt-in limit (sm_86 / sm_89: 99 KB, which the
// kD 256 backward tiles exceed): say so instead of a bare "invalid argument".
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, const char* what, int kd) {
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess) return;
  (void)cudaGetLastError();  // clear it: it is reported here
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(false, "flash attention (CUDA): the ", what, " kernel for head_dim <= ", kd, " needs ", bytes / 1024,
              " KB of shared memory per block, but ", prop->name, " (sm_", prop->major, prop->minor, ") allows ",
              prop->sharedMemPerBlockOptin / 1024, " KB (", cudaGetErrorString(err), ")");
}

template <typename T, int kD>
void launch_forward(const AttentionParams& p, cudaStream_t stream) {
  constexpr int kBM = Cfg<kD>::kFwdBM, kBN = Cfg<kD>::kFwdBN;
  const int64_t q_tiles = ceil_div(p.seqlen_q, kBM);
  if (q_tiles == 0) return;
  const GlobalTiles gt = global_tiles(p, kBN, stream);
  constexpr size_t smem = sizeof(float) * ((kBM + kBN) * (kD + 1) + kBM * (kBN + 1));
  auto kernel = flash_fwd_kernel<T, kD, kBM, kBN>;
  allow_smem(kernel, smem, "forward", kD);
  kernel<<<flat_grid(q_tiles, p.heads_q, p.batch), kThreads, smem, stream>>>(p, static_cast<int>(q_tiles), gt.count,
                                                                             gt.list, gt.max_tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The tensor-core forward's 16-byte paths (cp.async, 4-byte output stores)
// need every row of q, k, v, out 16-byte aligned: 16-byte aligned bases and
// strides that are multiples of 8 elements. Otherwise it reads and writes
// 16-bit elements one by one (same kernel, runtime flag).
bool tc_vector_ok(const AttentionParams& p) {
  auto aligned = [](const void* ptr, int64_t s0, int64_t s1, int64_t s2) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && s0 % 8 == 0 && s1 % 8 == 0 && s2 % 8 == 0;
  };
  return aligned(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride) &&
         aligned(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride) &&
         aligned(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride) &&
         aligned(p.out, p.out_batch_stride, p.out_row_stride, p.out_head_stride);
}

// Whether this binary holds tc::fwd_kernel<T, kD> built from sm_80+ code for
// the current device (an arch list of only older targets would JIT the
// __trap() body from their PTX, and report that PTX's version). A version
// the driver leaves at 0 counts as built. Asked once per process; a fallback
// says so once, so that it cannot pass unnoticed.
template <typename T, int kD>
bool tc_forward_built() {
  static const bool built = [] {
    cudaFuncAttributes attr{};
    const cudaError_t err = cudaFuncGetAttributes(&attr, tc::fwd_kernel<T, kD>);
    if (err != cudaSuccess) (void)cudaGetLastError();  // clear it: reported below
    const bool ok = err == cudaSuccess && (attr.ptxVersion >= 80 || (attr.ptxVersion == 0 && attr.binaryVersion >= 80));
    if (!ok) {
      TORCH_WARN_ONCE("flash attention (CUDA): the tensor-core forward is not built for this GPU (",
                      err == cudaSuccess ? "ptx version " : cudaGetErrorString(err),
                      err == cudaSuccess ? attr.ptxVersion : 0, "); using the SIMT forward");
    }
    return ok;
  }();
  return built;
}

// Returns false (nothing launched) when the kernel is not built for sm_80+.
template <typename T, int kD>
bool launch_forward_tc(const AttentionParams& p, cudaStream_t stream) {
  if (!tc_forward_built<T, kD>()) return false;
  const int64_t q_tiles = ceil_div(p.seqlen_q, tc::kBM);
  if (q_tiles == 0) return true;
  const GlobalTiles gt = global_tiles(p, tc::kBN, stream);
  constexpr size_t smem = sizeof(uint16_t) * (tc::kBM + 2 * tc::kBN) * (kD + 8);
  auto kernel = tc::fwd_kernel<T, kD>;
  allow_smem(kernel, smem, "tensor-core forward", kD);
  kernel<<<flat_grid(q_tiles, p.heads_q, p.batch), kThreads, smem, stream>>>(
      p, static_cast<int>(q_tiles), gt.count, gt.list, gt.max_tiles, tc_vector_ok(p));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// LLMKIT_ATTN_SIMT=1 (any value but empty or "0") forces the SIMT forward;
// read once per process.
bool force_simt_forward() {
  static const bool force = [] {
    const char* e = std::getenv("LLMKIT_ATTN_SIMT");
    return e != nullptr && e[0] != '\0' && std::strcmp(e, "0") != 0;
  }();
  return force;
}

template <typename T, int kD>
void launch_backward(const AttentionGradParams& p, const float* dbuf, const GlobalTiles& gt, cudaStream_t stream) {
  using C = Cfg<kD>;
  static_assert(C::kKvBM == kBwdGlobalTile && C::kQBN == kBwdGlobalTile, "one global tile list for both kernels");
  const int64_t k_tiles = ceil_div(p.seqlen_k, C::kKvBN);
  if (k_tiles > 0) {  // also with no queries: dK, dV are written (zeros)
    constexpr size_t smem =
        sizeof(float) * (2 * C::kKvBN * (kD + 1) + 2 * C::kKvBM * (kD + 1) + 2 * C::kKvBM * (C::kKvBN + 1));
    auto kernel = flash_bwd_dkdv_kernel<T, kD, C::kKvBN, C::kKvBM>;
    allow_smem(kernel, smem, "backward dK/dV", kD);
    kernel<<<flat_grid(k_tiles, p.heads_kv, p.batch), kThreads, smem, stream>>>(
        p, static_cast<int>(k_tiles), dbuf, gt.count, gt.list, gt.max_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t q_tiles = ceil_div(p.seqlen_q, C::kQBM);
  if (q_tiles > 0) {
    constexpr size_t smem =
        sizeof(float) * (2 * C::kQBM * (kD + 1) + 2 * C::kQBN * (kD + 1) + C::kQBM * (C::kQBN + 1));
    auto kernel = flash_bwd_dq_kernel<T, kD, C::kQBM, C::kQBN>;
    allow_smem(kernel, smem, "backward dQ", kD);
    kernel<<<flat_grid(q_tiles, p.heads_q, p.batch), kThreads, smem, stream>>>(
        p, static_cast<int>(q_tiles), dbuf, gt.count, gt.list, gt.max_tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_shape(const AttentionParams& p) {
  TORCH_CHECK(p.head_dim >= 0 && p.head_dim <= kMaxHeadDim && p.head_dim % 8 == 0,
              "flash attention (CUDA): head_dim must be a multiple of 8 up to ", kMaxHeadDim, ", got ", p.head_dim);
  TORCH_CHECK(p.heads_kv > 0 && p.heads_q % p.heads_kv == 0, "flash attention (CUDA): heads_q ", p.heads_q,
              " is not a multiple of heads_kv ", p.heads_kv);
}

}  // namespace

void flash_forward_cuda(const AttentionParams& params, at::ScalarType dtype) {
  if (params.batch == 0 || params.heads_q == 0) return;
  check_shape(params);
  const AttentionParams p = normalized(params);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // fp16 / bf16 with head_dim <= 128 on sm_80+: tensor cores (unless
  // LLMKIT_ATTN_SIMT is set); float32, head_dim > 128 and older GPUs: SIMT.
  const bool use_tc =
      p.head_dim <= 128 && !force_simt_forward() && at::cuda::getCurrentDeviceProperties()->major >= 8;
  LLMKIT_DISPATCH_FLOAT_HALF_BF16(dtype, "flash_forward_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (use_tc && (p.head_dim <= 64 ? launch_forward_tc<scalar_t, 64>(p, stream)
                                      : launch_forward_tc<scalar_t, 128>(p, stream))) {
        return;
      }
    }
    if (p.head_dim <= 64) {
      launch_forward<scalar_t, 64>(p, stream);
    } else if (p.head_dim <= 128) {
      launch_forward<scalar_t, 128>(p, stream);
    } else {
      launch_forward<scalar_t, 256>(p, stream);
    }
  });
}

void flash_backward_cuda(const AttentionGradParams& params, at::ScalarType dtype) {
  if (params.batch == 0 || params.heads_q == 0) return;
  check_shape(params);
  const AttentionGradParams p = normalized(params);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  at::Tensor dbuf = at::empty({std::max<int64_t>(rows, 1)}, device_options(at::kFloat));
  const GlobalTiles gt = global_tiles(p, kBwdGlobalTile, stream);
  LLMKIT_DISPATCH_FLOAT_HALF_BF16(dtype, "flash_backward_cuda", [&] {
    if (rows > 0) {
      bwd_dot_kernel<scalar_t><<<flat_grid(ceil_div(rows, 8), 1, 1), 256, 0, stream>>>(p, dbuf.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (p.head_dim <= 64) {
      launch_backward<scalar_t, 64>(p, dbuf.data_ptr<float>(), gt, stream);
    } else if (p.head_dim <= 128) {
      launch_backward<scalar_t, 128>(p, dbuf.data_ptr<float>(), gt, stream);
    } else {
      launch_backward<scalar_t, 256>(p, dbuf.data_ptr<float>(), gt, stream);
    }
  });
}

}  // namespace llmkit::attention
