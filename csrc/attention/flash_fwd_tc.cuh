// Tensor-core forward of the attention family (fp16 / bf16, head_dim <= 128),
// flash-attn 2's forward structure. Included by flash_cuda.cu inside its
// anonymous namespace after the shared helpers (Seq, Window, KeyTiles,
// global_flags, decode_block, kThreads); not a standalone header.
//
// One CTA of 4 warps per (64-row query tile, query head, sequence); warp w
// owns query rows [16 w, 16 w + 16) of the tile. Key tiles of 64 keys, the
// same tiles (and the same global-token tile list) as the SIMT forward.
// Shared memory, 16-bit, rows padded by 8 elements (row pitch (kD + 8) * 2
// bytes = 9 or 17 x 16 bytes, so the 8 row addresses of an ldmatrix phase
// fall in 8 different 16-byte bank groups):
//   sQ kBM x (kD + 8), sK kBN x (kD + 8), sV kBN x (kD + 8)
//   (27 KB for kD 64, 51 KB for kD 128).
// Per key tile (FA2's single-buffer pipeline: V of this tile loads during
// S = Q K^T and the softmax, K of the next tile during O += P V):
//   wait K, barrier; issue V; S = Q K^T (Q A fragments in registers, loaded
//   once); mask; online softmax in registers; P -> A fragments;
//   wait V, barrier; issue next K; O += P V.
//
// Fragment layouts assumed (PTX ISA, "Warp-level Matrix Fragment for
// mma.m16n8k16 with floating point type" / "Matrix Fragments for
// mma.m16n8k16", .f16 / .bf16 inputs, .f32 accumulators), with
// g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group):
//   A (16 x 16, .row), 4 x .b32 each holding 2 elements, the lower column in
//   the lower 16 bits:
//     a[0] = A[g    ][2t, 2t+1]      a[1] = A[g + 8][2t, 2t+1]
//     a[2] = A[g    ][2t+8, 2t+9]    a[3] = A[g + 8][2t+8, 2t+9]
//   B (16 x 8, .col), 2 x .b32, the lower k in the lower 16 bits:
//     b[0] = B[2t, 2t+1][g]          b[1] = B[2t+8, 2t+9][g]
//   C / D (16 x 8, f32):
//     c[0], c[1] = C[g][2t], C[g][2t+1]    c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 (PTX ISA "ldmatrix"):
//   lanes 8 i .. 8 i + 7 give the 8 row addresses (16 bytes each) of matrix
//   i; destination register i of lane l holds matrix i's elements
//   [l / 4][2 (l % 4) + {0, 1}] (no .trans) or [2 (l % 4) + {0, 1}][l / 4]
//   (.trans), the first in the lower 16 bits.
// Hence:
//   Q A fragment of k-step kk: matrices (rows 0-7 | 8-15) x (cols 16kk + 0-7 |
//     + 8-15) in the order a[0..3]: lane l addresses row (l % 8) + 8 ((l / 8) % 2),
//     column 16 kk + 8 (l / 16).
//   K as B (B[d][key] = K[key][d]) for key n8-tiles 2 jp, 2 jp + 1 and k-step
//     kk: lane l addresses key 16 jp + (l % 8) + 8 (l / 16), column
//     16 kk + 8 ((l / 8) % 2); registers 0, 1 = b of tile 2 jp, 2, 3 = of 2 jp + 1.
//   V as B (B[key][d] = V[key][d]) for key k-step kk and head-dim n8-tiles
//     2 np, 2 np + 1, .trans: lane l addresses key 16 kk + (l % 8) + 8 ((l / 8) % 2),
//     column 16 np + 8 (l / 16); registers 0, 1 = b of d-tile 2 np, 2, 3 = of 2 np + 1.
//   P: the accumulators of key n8-tiles 2 kk, 2 kk + 1 are the A fragment of
//     k-step kk: a[0] = s[2kk][0,1], a[1] = s[2kk][2,3], a[2] = s[2kk+1][0,1],
//     a[3] = s[2kk+1][2,3].
// This index math (and the tile loop, masks, softmax and stores) was checked
// against a dense float64 reference by a numpy emulation of these PTX
// layouts, head_dim 8..128 inside kD 64 / 128, sq != sk, windows, global
// tokens, GQA and partial tiles; it is not part of the repository.
//
// Not covered by it: cp.async / barrier ordering (by review: see the loop),
// the 16-bit scalar fallback for unaligned tensors (vec = false), and
// overflow of scale * log2 e for |scale| near FLT_MAX.
//
// Softmax in base 2: x = s * (scale * log2 e) (scaled before the max, so any
// finite scale sign works), m = running row max of x over visible keys
// (-inf while none), p = 2^(x - m_use) with m_use = 0 while m = -inf (masked
// entries give 2^-inf = 0, never inf - inf). lse = m ln 2 + ln l (natural
// log of the scaled scores, like the SIMT kernel), -inf and out 0 when l = 0.
#pragma once

#include <cstdint>
#include <type_traits>

namespace tc {

constexpr int kBM = 64;  // query rows per CTA: 4 warps x 16
constexpr int kBN = 64;  // keys per tile
constexpr int kWarps = 4;
static_assert(kWarps * 32 == kThreads && kWarps * 16 == kBM, "one m16 tile per warp");

__device__ __forceinline__ uint32_t smem_addr(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a b for one m16n8k16 tile (fragment layouts above).
template <typename D>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<D, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<D, __nv_bfloat16>, "fp16 or bf16");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as one .b32 of 16-bit elements, `lo` in the lower half.
template <typename D>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<D, __half>) {
    const uint32_t l = __half_as_ushort(__float2half_rn(lo)), h = __half_as_ushort(__float2half_rn(hi));
    return l | (h << 16);
  } else {
    const uint32_t bl = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    const uint32_t bh = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
    return bl | (bh << 16);
  }
}

// Stages rows [0, rows) x [0, head_dim) of a (row_stride, contiguous) slice
// into dst (kRows x (kD + 8), 16-bit) in 16-byte chunks; every other chunk of
// columns [0, kD) is zero-filled (rows past the end, columns past head_dim),
// so the MMA loops may run over whole 16-key / 16-column steps. vec: the
// slice is 16-byte aligned (cp.async, completed by cp_async_wait); else the
// chunk is read with 16-bit loads and stored synchronously. Either way the
// data is visible to other threads after the wait and a barrier.
template <int kRows, int kD, typename D>
__device__ __forceinline__ void stage_tile(D* __restrict__ dst, const D* __restrict__ src, int64_t row_stride,
                                          int rows, int head_dim, bool vec) {
  constexpr int kChunks = kD / 8, kLds = kD + 8;
  static_assert((kRows * kChunks) % kThreads == 0, "whole chunk rounds");
#pragma unroll
  for (int e0 = 0; e0 < kRows * kChunks; e0 += kThreads) {
    const int e = e0 + static_cast<int>(threadIdx.x);
    const int r = e / kChunks, c = e % kChunks;
    D* d = dst + r * kLds + c * 8;
    if (r < rows && c * 8 < head_dim) {  // head_dim is a multiple of 8: whole chunks
      const D* s = src + r * row_stride + c * 8;
      if (vec) {
        cp_async16(smem_addr(d), s);
      } else {
        const unsigned short* s16 = reinterpret_cast<const unsigned short*>(s);
        uint32_t w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          w[i] = static_cast<uint32_t>(s16[2 * i]) | (static_cast<uint32_t>(s16[2 * i + 1]) << 16);
        }
        *reinterpret_cast<uint4*>(d) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    } else {
      *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads)
    fwd_kernel(const __grid_constant__ AttentionParams p, int q_tiles, const int* __restrict__ gcount,
               const int* __restrict__ glist, int gmax, bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using D = typename DeviceType<T>::type;
  static_assert(kD % 16 == 0 && kD <= 128, "head-dim bound");
  constexpr int kLds = kD + 8;   // shared row pitch (elements)
  constexpr int kKD = kD / 16;   // k16 steps of S = Q K^T (head_dim)
  constexpr int kNS = kBN / 8;   // n8 score tiles (keys)
  constexpr int kKP = kBN / 16;  // k16 steps of O += P V (keys)
  constexpr int kND = kD / 8;    // n8 output tiles (head_dim)
  extern __shared__ __align__(16) unsigned char tc_smem[];
  D* sQ = reinterpret_cast<D*>(tc_smem);  // kBM x kLds
  D* sK = sQ + kBM * kLds;                // kBN x kLds
  D* sV = sK + kBN * kLds;                // kBN x kLds
  __shared__ unsigned char sKg[kBN];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int grp = lane / 4, tig = lane % 4;  // groupID, threadID_in_group
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

  // The two rows of this thread in the tile: row0 (c[0], c[1]) and row0 + 8.
  const int row0 = warp * 16 + grp;
  bool qg[2];
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int r = row0 + 8 * rh;
    qg[rh] = g != nullptr && r < qn && g[q0 + r] != 0;
  }
  int mine = 0;
  if (tid < kBM) mine = g != nullptr && tid < qn && g[q0 + tid] != 0;
  const bool q_global = __syncthreads_or(mine) != 0;
  const KeyTiles tiles = forward_key_tiles(w, s, b, q0, qn, kBN, q_global, g, gcount, glist, gmax);

  // Prologue: Q (group 1), the first K tile and its global flags (group 2).
  stage_tile<kBM, kD>(sQ, qp, p.q_row_stride, qn, hd, vec);
  cp_async_commit();
  int it = tiles.next(0);
  if (it < tiles.count()) {
    const int k0 = tiles.at(it) * kBN;
    const int kn = min(kBN, s.sk - k0);
    stage_tile<kBN, kD>(sK, kp + k0 * p.k_row_stride, p.k_row_stride, kn, hd, vec);
    if (tid < kBN) sKg[tid] = g != nullptr && tid < kn && g[k0 + tid] != 0;
  }
  cp_async_commit();
  cp_async_wait<1>();  // Q landed (this thread's copies)
  __syncthreads();     // ... and everyone's

  uint32_t qa[kKD][4];  // Q A fragments, all k-steps (zero past head_dim)
#pragma unroll
  for (int kk = 0; kk < kKD; ++kk) {
    const int r = warp * 16 + (lane % 8) + 8 * ((lane / 8) % 2);
    const int c = 16 * kk + 8 * (lane / 16);
    ldmatrix_x4(qa[kk], smem_addr(sQ + r * kLds + c));
  }

  float o[kND][4];
#pragma unroll
  for (int n = 0; n < kND; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[n][i] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // l: this thread's columns only
  const float scale2 = __fmul_rn(p.scale, kLog2e);

  while (it < tiles.count()) {
    const int k0 = tiles.at(it) * kBN;
    const int kn = min(kBN, s.sk - k0);
    cp_async_wait<0>();  // K of this tile (and sKg, stored synchronously)
    __syncthreads();     // visible to all; every warp is done with sV of the previous tile
    stage_tile<kBN, kD>(sV, vp + k0 * p.v_row_stride, p.v_row_stride, kn, hd, vec);
    cp_async_commit();

    // S = Q K^T, skipping 16-key steps past the end and head-dim steps past head_dim.
    float sc[kNS][4];
#pragma unroll
    for (int n = 0; n < kNS; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[n][i] = 0.0f;
#pragma unroll
    for (int jp = 0; jp < kNS / 2; ++jp) {
      if (jp * 16 >= kn) break;  // uniform
#pragma unroll
      for (int kk = 0; kk < kKD; ++kk) {
        if (kk * 16 >= hd) break;  // uniform
        const int r = 16 * jp + (lane % 8) + 8 * (lane / 16);
        const int c = 16 * kk + 8 * ((lane / 8) % 2);
        uint32_t kb[4];
        ldmatrix_x4(kb, smem_addr(sK + r * kLds + c));
        mma16816<D>(sc[2 * jp], qa[kk], kb[0], kb[1]);
        mma16816<D>(sc[2 * jp + 1], qa[kk], kb[2], kb[3]);
      }
    }

    // Masking only where some pair of the tile may be invisible: a partial
    // key tile, or a window edge crossing the tile (rows [q0, q0 + qn)).
    bool full = kn == kBN;
    if (full) {
      const int64_t dmin = static_cast<int64_t>(k0) - (q0 + qn - 1) - w.off;  // min of j - i - off
      const int64_t dmax = static_cast<int64_t>(k0) + kBN - 1 - q0 - w.off;   // max of j - i - off
      full = (w.left < 0 || dmin >= -w.left) && (w.right < 0 || dmax <= w.right);
    }

    // Online softmax per row (c[0..1]: row0, c[2..3]: row0 + 8); the 4
    // threads of a quad hold one row's 64 keys.
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int row = row0 + 8 * rh;
      float mx = -INFINITY;
#pragma unroll
      for (int n = 0; n < kNS; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = __fmul_rn(sc[n][2 * rh + e], scale2);
          if (!full) {
            const int col = 8 * n + 2 * tig + e;
            const bool vis = row < qn && col < kn &&
                             (w(q0 + row, k0 + col) || (g != nullptr && (qg[rh] || sKg[col] != 0)));
            if (!vis) x = -INFINITY;
          }
          sc[n][2 * rh + e] = x;
          mx = nan_max(mx, x);
        }
      mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = nan_max(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = nan_max(m[rh], mx);  // NaN-propagating (flash_cuda.cu)
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = exp2f(__fsub_rn(m[rh], m_use));  // 0 while m was -inf, 1 if unchanged
      m[rh] = m_new;
      l[rh] = __fmul_rn(l[rh], alpha);
#pragma unroll
      for (int n = 0; n < kND; ++n) {
        o[n][2 * rh] = __fmul_rn(o[n][2 * rh], alpha);
        o[n][2 * rh + 1] = __fmul_rn(o[n][2 * rh + 1], alpha);
      }
#pragma unroll
      for (int n = 0; n < kNS; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pe = exp2f(__fsub_rn(sc[n][2 * rh + e], m_use));
          l[rh] = __fadd_rn(l[rh], pe);
          sc[n][2 * rh + e] = pe;
        }
    }

    // P as A fragments: key n8-tiles 2 kk, 2 kk + 1 form k-step kk.
    uint32_t pa[kKP][4];
#pragma unroll
    for (int kk = 0; kk < kKP; ++kk) {
      pa[kk][0] = pack2<D>(sc[2 * kk][0], sc[2 * kk][1]);
      pa[kk][1] = pack2<D>(sc[2 * kk][2], sc[2 * kk][3]);
      pa[kk][2] = pack2<D>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      pa[kk][3] = pack2<D>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
    }

    const int next = tiles.next(it + 1);
    cp_async_wait<0>();  // V of this tile
    __syncthreads();     // visible to all; every warp is done with sK and sKg of this tile
    if (next < tiles.count()) {
      const int k1 = tiles.at(next) * kBN;
      const int kn1 = min(kBN, s.sk - k1);
      stage_tile<kBN, kD>(sK, kp + k1 * p.k_row_stride, p.k_row_stride, kn1, hd, vec);
      if (tid < kBN) sKg[tid] = g != nullptr && tid < kn1 && g[k1 + tid] != 0;
    }
    cp_async_commit();

    // O += P V (keys past kn have P = 0 and zero-filled V: skipped).
#pragma unroll
    for (int kk = 0; kk < kKP; ++kk) {
      if (kk * 16 >= kn) break;  // uniform
#pragma unroll
      for (int np = 0; np < kND / 2; ++np) {
        if (np * 16 >= hd) break;  // uniform
        const int r = 16 * kk + (lane % 8) + 8 * ((lane / 8) % 2);
        const int c = 16 * np + 8 * (lane / 16);
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, smem_addr(sV + r * kLds + c));
        mma16816<D>(o[2 * np], pa[kk], vb[0], vb[1]);
        mma16816<D>(o[2 * np + 1], pa[kk], vb[2], vb[3]);
      }
    }
    it = next;
  }

  D* op = static_cast<D*>(p.out) + b * p.out_batch_stride + (s.q_start + q0) * p.out_row_stride +
          h * p.out_head_stride;
  float* lp = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + s.q_start + q0;
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    float lt = l[rh];
    lt = __fadd_rn(lt, __shfl_xor_sync(0xffffffffu, lt, 1));
    lt = __fadd_rn(lt, __shfl_xor_sync(0xffffffffu, lt, 2));
    // lt > 0 iff the row saw a key (its max contributes 2^0 = 1); NaN when a
    // visible score was NaN (m is NaN then, and so is every exp2): the row
    // then gets NaN out and lse like softmax, not the no-key 0 / -inf.
    const int row = row0 + 8 * rh;
    if (row < qn) {
      const float inv = lt != 0.0f ? __frcp_rn(lt) : 0.0f;
      D* orow = op + row * p.out_row_stride;
#pragma unroll
      for (int n = 0; n < kND; ++n) {
        const int col = 8 * n + 2 * tig;
        if (col >= hd) break;  // head_dim is a multiple of 8: col + 1 < hd too
        const float x0 = __fmul_rn(o[n][2 * rh], inv), x1 = __fmul_rn(o[n][2 * rh + 1], inv);
        if (vec) {
          *reinterpret_cast<uint32_t*>(orow + col) = pack2<D>(x0, x1);
        } else {
          orow[col] = from_float<D>(x0);
          orow[col + 1] = from_float<D>(x1);
        }
      }
      if (tig == 0) {  // a +inf score: logsumexp +inf (lt is NaN there), as the CPU kernel
        lp[row] = lt != 0.0f ? (m[rh] == INFINITY ? INFINITY : __fadd_rn(__fmul_rn(m[rh], kLn2), logf(lt)))
                             : -INFINITY;
      }
    }
  }
#else
  __trap();  // sm_80+ only: the host never launches it elsewhere
#endif
}

}  // namespace tc
