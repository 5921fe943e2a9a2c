// CUDA kernels of nf4_linear (y = x @ W.T + bias) and nf4_linear_grad_input
// (dx = grad_out @ W) for an NF4 weight W of shape (out_features N,
// in_features K), on the current stream, with float32 accumulation and
// without ever materialising W in full. M is the number of rows of x (or
// grad_out) once flattened to 2-D.
//
// Layout facts the kernels rely on (nf4.h): quantization blocks run over the
// FLAT row-major index e = n * K + k of W; element e lives in byte e / 2, in
// the high nibble when e is even. When K % 8 == 0 every row starts on a 4-byte
// packed word, and the 8 elements of a word never straddle a block (blocksize
// is a power of two >= 32), so a word has exactly one scale. That is the
// condition of the fast ("word") kernels; any other shape, or a packed buffer
// that is not 4-byte aligned, takes the per-element ("generic") kernels,
// which are exact for every layout.
//
// Decoding: a warp keeps the 16 NF4 codes in registers (lane l holds
// code[l & 15]) and looks a nibble up with one shfl. shfl reads only the low
// 5 bits of its lane argument, so `word >> shift` needs no mask. The block
// scale (plain absmax, or code2[q[b]] * absmax2[b / nested_blocksize] +
// offset for double quant, the two float32 roundings of dequantize_nf4) is
// computed in registers once per packed word and applied to the word's dot
// product, so it costs one fma per 8 elements.
//
// M <= kGemvMaxRows (decode), the kernels stream the packed bytes once:
//   nf4_gemv_kernel (K % 8 == 0): one CTA of 4 warps per group of kWRows
//       output rows; the CTA's 128 threads split K by packed word (thread t
//       takes words t, t + 128, ...), so each warp load is 128 coalesced
//       bytes per row. A thread loads kUnroll words of each of its kWRows rows
//       before decoding any (kUnroll * kWRows independent loads in flight),
//       reads the x values of a word once (L1-resident, converted to float)
//       and reuses them for all kWRows rows, which is what keeps the L1/shfl
//       pipe below the HBM rate (with more x rows than W rows the order
//       flips: the words are decoded once and the x rows loaded in turn, to
//       bound registers). x is read from global memory, not staged in smem:
//       any K x M fits, and every CTA reads the same x, so L1 holds it.
//       Partial sums: shfl tree in the warp, then the 4 warps in a fixed
//       order through shared memory; bias added once.
//   nf4_gemv_generic_kernel: one warp per output row, one element per lane
//       step, scale cached across steps; warp tree reduction.
//   nf4_gemv_t_kernel (grad, K % 8 == 0): a CTA owns 32 word columns (256
//       input features, one word column per lane) and a range of output rows
//       (a split); its 8 warps take rows w, w + 8, ... of the range and
//       accumulate all 8 columns of their word for every grad row in
//       registers (the scale is folded into grad_out[m, n] once per word).
//       The 8 warps are summed in a fixed order through shared memory into a
//       float32 workspace [split][M][K]; sum_splits_kernel then adds the
//       splits in order. No float atomics: deterministic.
//   nf4_gemv_t_generic_kernel: one thread per input feature, same splits.
// M > kGemvMaxRows (prefill, training), tiled: W is dequantized in chunks of
// about 8 MB into a reused scratch buffer in x's dtype
// (dequant_tile_*_kernel, the exact values of dequantize_nf4) and multiplied
// by cuBLAS through ATen: forward chunks are row ranges of W, written into
// column slices of y by addmm (bias of the slice, so once per column); grad
// chunks are column ranges of W, written into column slices of dx. Every
// output element comes out of one GEMM over the full reduction dimension, so
// cuBLAS's float32 accumulation is the only one.
//
// LLMKIT_NF4_LINEAR_CUDA="gemv_rows,chunk_kib" overrides the GEMV row limit
// and the chunk size (see linear_paths). The build passes --fmad=false; dot
// products use explicit __fmaf_rn.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "common/cuda_convert.cuh"
#include "quant/nf4.h"

namespace llmkit::quant {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

// Rows of x up to which the streaming GEMV beats dequantize + GEMM (also the
// largest row bucket the GEMV kernels are built for).
constexpr int64_t kGemvMaxRows = 8;

struct LinearPaths {
  int64_t gemv_rows = kGemvMaxRows;  // GEMV up to this many rows of x / grad_out
  int64_t chunk_bytes = 8 << 20;     // scratch of one dequantized chunk (tiled path): stays in L2
};

// LLMKIT_NF4_LINEAR_CUDA="gemv_rows,chunk_kib" overrides the defaults (tuning,
// and tests that force a path); gemv_rows is capped at kGemvMaxRows. Read once.
LinearPaths linear_paths() {
  static const LinearPaths paths = [] {
    LinearPaths p;
    if (const char* env = std::getenv("LLMKIT_NF4_LINEAR_CUDA")) {
      long g = 0, c = 0;
      if (std::sscanf(env, "%ld,%ld", &g, &c) == 2 && g >= 0 && c > 0) {
        p = {std::min<int64_t>(g, kGemvMaxRows), static_cast<int64_t>(c) << 10};
      }
    }
    return p;
  }();
  return paths;
}

using llmkit::Convert;  // common/cuda_convert.cuh

__constant__ float kNF4CodeTable[16] = {
    kNF4Codes[0], kNF4Codes[1], kNF4Codes[2],  kNF4Codes[3],  kNF4Codes[4],  kNF4Codes[5],
    kNF4Codes[6], kNF4Codes[7], kNF4Codes[8],  kNF4Codes[9],  kNF4Codes[10], kNF4Codes[11],
    kNF4Codes[12], kNF4Codes[13], kNF4Codes[14], kNF4Codes[15]};

// The per-block absmax source, plain (absmax != nullptr) or double-quantized.
struct NF4Scales {
  const float* absmax;    // plain: float32 per block
  const uint8_t* codes;   // double quant: uint8 code per block,
  const float* absmax2;   //   scaled per nested block,
  const float* code2;     //   256-entry code,
  const float* offset;    //   plus offset[0]
  int log2_blocksize;
  int log2_nested_blocksize;
};

template <bool kNested>
__device__ __forceinline__ float block_scale(const NF4Scales& s, int64_t block, float offset) {
  if constexpr (kNested) {
    const float decoded = __fmul_rn(__ldg(s.code2 + __ldg(s.codes + block)),
                                    __ldg(s.absmax2 + (block >> s.log2_nested_blocksize)));
    return __fadd_rn(decoded, offset);
  } else {
    return __ldg(s.absmax + block);
  }
}

__device__ __forceinline__ float block_scale_any(const NF4Scales& s, int64_t block, float offset) {
  return s.absmax != nullptr ? block_scale<false>(s, block, offset) : block_scale<true>(s, block, offset);
}

__device__ __forceinline__ float load_offset(const NF4Scales& s) {
  return s.absmax == nullptr ? __ldg(s.offset) : 0.0f;
}

// Packed bytes are read exactly once: keep them out of L1, which holds x.
__device__ __forceinline__ uint32_t load_streaming(const uint32_t* p) {
  uint32_t v;
  asm("ld.global.nc.L1::no_allocate.b32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// The 8 codes of a packed word (4 bytes, first byte lowest): element 2i is
// the high nibble of byte i, element 2i + 1 the low one. `table` is lane l's
// code[l & 15]; shfl uses bits [4:0] of the lane argument, so the bit above
// each nibble selects a duplicate entry and needs no mask.
__device__ __forceinline__ void decode_word(uint32_t word, float table, float c[8]) {
  c[0] = __shfl_sync(kFullMask, table, static_cast<int>(word >> 4));
  c[1] = __shfl_sync(kFullMask, table, static_cast<int>(word));
  c[2] = __shfl_sync(kFullMask, table, static_cast<int>(word >> 12));
  c[3] = __shfl_sync(kFullMask, table, static_cast<int>(word >> 8));
  c[4] = __shfl_sync(kFullMask, table, static_cast<int>(word >> 20));
  c[5] = __shfl_sync(kFullMask, table, static_cast<int>(word >> 16));
  c[6] = __shfl_sync(kFullMask, table, static_cast<int>(word >> 28));
  c[7] = __shfl_sync(kFullMask, table, static_cast<int>(word >> 24));
}

// 8 consecutive elements (16-byte aligned) as float; fp16/bf16 widen exactly.
__device__ __forceinline__ void load8(const float* p, float v[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const __half* p, float v[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // little endian: the lower address is the low half
    v[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] & 0xffffu)));
    v[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[i] >> 16)));
  }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float v[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bf16 is the top half of a float32
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

// x[8 * wi : 8 * wi + 8] of one row (wi in range), or zeros when !live:
// the load stays unconditional so the step has no branch.
template <typename D>
__device__ __forceinline__ void load8_live(const D* row, int wi, bool live, float v[8]) {
  load8(row + 8 * static_cast<int64_t>(wi), v);
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = live ? v[j] : 0.0f;
}

__device__ __forceinline__ float dot8(const float c[8], const float v[8]) {
  float dot = __fmul_rn(c[0], v[0]);
#pragma unroll
  for (int j = 1; j < 8; ++j) dot = __fmaf_rn(c[j], v[j], dot);
  return dot;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(kFullMask, v, s);
  return v;
}

// ------------------------------------------------------------ forward GEMV --

constexpr int kGemvThreads = 128;
constexpr int kGemvWarps = kGemvThreads / 32;

// Per x-row bucket: output rows per CTA (x reuse, loads in flight) and packed
// words per thread and row loaded before the first decode.
template <int kXRows> struct GemvTile;
template <> struct GemvTile<1> { static constexpr int kWRows = 8, kUnroll = 2; };
template <> struct GemvTile<2> { static constexpr int kWRows = 4, kUnroll = 2; };
template <> struct GemvTile<4> { static constexpr int kWRows = 4, kUnroll = 2; };
template <> struct GemvTile<8> { static constexpr int kWRows = 4, kUnroll = 2; };

// Scale lookups along one W row: the row's first block is resolved once, so
// a word's scale costs a 32-bit block offset (no 64-bit index math per word).
template <bool kNested> struct RowScales;
template <> struct RowScales<false> {
  const float* absmax;  // at the row's first block
  __device__ void init(const NF4Scales& s, int64_t block) { absmax = s.absmax + block; }
  __device__ float operator()(const NF4Scales&, int block_offset, float) const { return __ldg(absmax + block_offset); }
};
template <> struct RowScales<true> {
  const uint8_t* codes;  // at the row's first block
  int64_t block;
  __device__ void init(const NF4Scales& s, int64_t b) {
    codes = s.codes + b;
    block = b;
  }
  __device__ float operator()(const NF4Scales& s, int block_offset, float offset) const {
    const float decoded = __fmul_rn(__ldg(s.code2 + __ldg(codes + block_offset)),
                                    __ldg(s.absmax2 + ((block + block_offset) >> s.log2_nested_blocksize)));
    return __fadd_rn(decoded, offset);
  }
};

// y[m, n] = sum_k x[m, k] W[n, k] + bias[n] for n in this CTA's kWRows rows.
// x rows m >= x_rows read row x_rows - 1, W rows past n_out read row
// n_out - 1 (valid memory either way); neither is stored.
template <typename T, int kXRows, bool kNested>
__global__ void __launch_bounds__(kGemvThreads)
    nf4_gemv_kernel(const uint32_t* __restrict__ packed_words, const NF4Scales scales, const T* __restrict__ x,
                    int x_rows, int64_t n_out, int k_words, const T* __restrict__ bias, T* __restrict__ y) {
  using C = Convert<T>;
  using D = typename C::Device;
  constexpr int kWRows = GemvTile<kXRows>::kWRows;
  constexpr int kUnroll = GemvTile<kXRows>::kUnroll;
  constexpr int kStepWords = kGemvThreads * kUnroll;
  static_assert(kWRows * kXRows <= kGemvThreads, "one thread per output in the epilogue");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const float table = kNF4CodeTable[lane & 15];
  const float offset = kNested ? __ldg(scales.offset) : 0.0f;
  const int block_shift = scales.log2_blocksize - 3;  // packed words per block = 2^block_shift
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kWRows;

  // Per W row: its packed words, its first block, and the index of its first
  // word inside that block (rows need not start on a block when K % blocksize != 0).
  const uint32_t* wrow[kWRows];
  RowScales<kNested> row_scales[kWRows];
  int row_skew[kWRows];
#pragma unroll
  for (int r = 0; r < kWRows; ++r) {
    const int64_t first_word = min(n0 + r, n_out - 1) * k_words;
    wrow[r] = packed_words + first_word;
    row_scales[r].init(scales, first_word >> block_shift);
    row_skew[r] = static_cast<int>(first_word & ((int64_t{1} << block_shift) - 1));
  }
  const D* xrow[kXRows];
#pragma unroll
  for (int m = 0; m < kXRows; ++m) {
    xrow[m] = reinterpret_cast<const D*>(x) + min(m, x_rows - 1) * (8 * static_cast<int64_t>(k_words));
  }

  float acc[kWRows][kXRows];
#pragma unroll
  for (int r = 0; r < kWRows; ++r) {
#pragma unroll
    for (int m = 0; m < kXRows; ++m) acc[r][m] = 0.0f;
  }

  // One step = kUnroll words of each row per thread. Full steps need no
  // bounds; the tail step clamps to the row's last word (valid memory) and
  // zeroes the scale and x of the words past the end, so they add exactly 0.
  // Every lane runs every step: shfl needs whole warps.
  auto step = [&](int base, auto tail_tag) {
    constexpr bool kTail = decltype(tail_tag)::value;
    uint32_t word[kUnroll][kWRows];
    float scale[kUnroll][kWRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int wi = base + u * kGemvThreads + static_cast<int>(threadIdx.x);
      const int wl = kTail ? min(wi, k_words - 1) : wi;
#pragma unroll
      for (int r = 0; r < kWRows; ++r) {
        word[u][r] = load_streaming(wrow[r] + wl);
        const float sc = row_scales[r](scales, (row_skew[r] + wl) >> block_shift, offset);
        scale[u][r] = !kTail || wi < k_words ? sc : 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int wi = base + u * kGemvThreads + static_cast<int>(threadIdx.x);
      const int wl = kTail ? min(wi, k_words - 1) : wi;
      const bool live = !kTail || wi < k_words;
      if constexpr (kWRows >= kXRows) {
        // x of every row in registers, one word's codes at a time.
        float xv[kXRows][8];
#pragma unroll
        for (int m = 0; m < kXRows; ++m) load8_live(xrow[m], wl, live, xv[m]);
#pragma unroll
        for (int r = 0; r < kWRows; ++r) {
          float c[8];
          decode_word(word[u][r], table, c);
#pragma unroll
          for (int m = 0; m < kXRows; ++m) acc[r][m] = __fmaf_rn(scale[u][r], dot8(c, xv[m]), acc[r][m]);
        }
      } else {
        // More x rows than W rows: the codes of every row in registers, one x row at a time.
        float c[kWRows][8];
#pragma unroll
        for (int r = 0; r < kWRows; ++r) decode_word(word[u][r], table, c[r]);
#pragma unroll
        for (int m = 0; m < kXRows; ++m) {
          float xv[8];
          load8_live(xrow[m], wl, live, xv);
#pragma unroll
          for (int r = 0; r < kWRows; ++r) acc[r][m] = __fmaf_rn(scale[u][r], dot8(c[r], xv), acc[r][m]);
        }
      }
    }
  };
  int base = 0;
  for (; base + kStepWords <= k_words; base += kStepWords) step(base, std::false_type{});
  if (base < k_words) step(base, std::true_type{});

  __shared__ float partial[kGemvWarps][kWRows * kXRows];
#pragma unroll
  for (int r = 0; r < kWRows; ++r) {
#pragma unroll
    for (int m = 0; m < kXRows; ++m) {
      const float v = warp_sum(acc[r][m]);
      if (lane == 0) partial[warp][r * kXRows + m] = v;
    }
  }
  __syncthreads();
  const int i = threadIdx.x;
  const int r = i / kXRows;
  const int m = i % kXRows;
  const int64_t n = n0 + r;
  if (i < kWRows * kXRows && n < n_out && m < x_rows) {
    float sum = partial[0][i];
#pragma unroll
    for (int w = 1; w < kGemvWarps; ++w) sum += partial[w][i];
    const D* bd = reinterpret_cast<const D*>(bias);
    if (bd != nullptr) sum += C::to_float(bd[n]);
    reinterpret_cast<D*>(y)[m * n_out + n] = C::from_float(sum);
  }
}

constexpr int kGenericThreads = 256;
constexpr int kGenericWarps = kGenericThreads / 32;

// Any layout: one warp per output row, lane steps of one element. Each weight
// is the dequantized float32 value (code * scale), exactly as dequantize_nf4.
template <typename T, int kXRows>
__global__ void __launch_bounds__(kGenericThreads)
    nf4_gemv_generic_kernel(const uint8_t* __restrict__ packed, const NF4Scales scales, const T* __restrict__ x,
                            int x_rows, int64_t n_out, int64_t k, const T* __restrict__ bias, T* __restrict__ y) {
  using C = Convert<T>;
  using D = typename C::Device;
  __shared__ float table[16];  // 16 words in 16 banks: any lookup pattern is conflict-free
  if (threadIdx.x < 16) table[threadIdx.x] = kNF4CodeTable[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGenericWarps + (threadIdx.x >> 5);
  if (n >= n_out) return;  // uniform over the warp
  const float offset = load_offset(scales);

  const D* xrow[kXRows];
#pragma unroll
  for (int m = 0; m < kXRows; ++m) xrow[m] = reinterpret_cast<const D*>(x) + min(m, x_rows - 1) * k;
  float acc[kXRows];
#pragma unroll
  for (int m = 0; m < kXRows; ++m) acc[m] = 0.0f;

  int64_t cached_block = -1;
  float cached_scale = 0.0f;
  for (int64_t col = lane; col < k; col += 32) {
    const int64_t e = n * k + col;
    const uint32_t byte = __ldg(packed + (e >> 1));
    const uint32_t nibble = (e & 1) ? (byte & 15u) : (byte >> 4);
    const int64_t block = e >> scales.log2_blocksize;
    if (block != cached_block) {
      cached_scale = block_scale_any(scales, block, offset);
      cached_block = block;
    }
    const float w = __fmul_rn(table[nibble], cached_scale);
#pragma unroll
    for (int m = 0; m < kXRows; ++m) acc[m] = __fmaf_rn(w, C::to_float(xrow[m][col]), acc[m]);
  }
#pragma unroll
  for (int m = 0; m < kXRows; ++m) acc[m] = warp_sum(acc[m]);
  if (lane == 0) {
    const D* bd = reinterpret_cast<const D*>(bias);
    D* yd = reinterpret_cast<D*>(y);
    const float b = bd != nullptr ? C::to_float(bd[n]) : 0.0f;
#pragma unroll
    for (int m = 0; m < kXRows; ++m) {
      if (m < x_rows) yd[m * n_out + n] = C::from_float(bd != nullptr ? acc[m] + b : acc[m]);
    }
  }
}

// ------------------------------------------------- transposed GEMV (grad) --

constexpr int kGemvTThreads = 256;
constexpr int kGemvTWarps = kGemvTThreads / 32;
constexpr int kGemvTColumns = 32 * 8;  // input features per CTA: one packed word per lane

// Rows of W each warp loads before decoding, per grad-row bucket (the
// accumulators are 8 * kGRows floats per thread).
template <int kGRows> struct GemvTTile { static constexpr int kUnroll = kGRows >= 8 ? 2 : 4; };

// ws[split][m][k] = sum over rows n of this split of grad[m, n] W[n, k], for
// the CTA's 256 columns k. grad rows m >= g_rows read row g_rows - 1 and are
// not stored.
template <typename T, int kGRows, bool kNested>
__global__ void __launch_bounds__(kGemvTThreads)
    nf4_gemv_t_kernel(const uint32_t* __restrict__ packed_words, const NF4Scales scales, const T* __restrict__ grad,
                      int g_rows, int64_t n_out, int k_words, int64_t rows_per_split, float* __restrict__ ws) {
  using C = Convert<T>;
  using D = typename C::Device;
  constexpr int kUnroll = GemvTTile<kGRows>::kUnroll;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const float table = kNF4CodeTable[lane & 15];
  const float offset = kNested ? __ldg(scales.offset) : 0.0f;
  const int block_shift = scales.log2_blocksize - 3;  // packed word index -> block index
  const int64_t k = 8 * static_cast<int64_t>(k_words);
  const int wi = static_cast<int>(blockIdx.x) * 32 + lane;
  const bool col_live = wi < k_words;
  const int wi_load = min(wi, k_words - 1);  // lanes past the last column load valid memory
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t n_end = min(n_out, n_begin + rows_per_split);

  const D* grow[kGRows];
#pragma unroll
  for (int m = 0; m < kGRows; ++m) grow[m] = reinterpret_cast<const D*>(grad) + min(m, g_rows - 1) * n_out;

  float acc[kGRows][8];
#pragma unroll
  for (int m = 0; m < kGRows; ++m) {
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[m][j] = 0.0f;
  }

  // Warp w takes rows base + w, base + 8 + w, ...; the trip count is uniform
  // over the CTA, so every shfl sees whole warps (and the compiler knows it).
  // Loads are unconditional (rows past the split and columns past K are
  // clamped to valid ones); their scale and grad are zeroed, so they add 0.
  for (int64_t base = n_begin; base < n_end; base += kGemvTWarps * kUnroll) {
    uint32_t word[kUnroll];
    float scale[kUnroll];
    float gv[kUnroll][kGRows];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t row = base + u * kGemvTWarps + warp;
      const bool row_live = row < n_end;
      const int64_t row_load = min(row, n_end - 1);
      const int64_t word_index = row_load * k_words + wi_load;
      word[u] = load_streaming(packed_words + word_index);
      const float sc = block_scale<kNested>(scales, word_index >> block_shift, offset);
      scale[u] = row_live && col_live ? sc : 0.0f;
#pragma unroll
      for (int m = 0; m < kGRows; ++m) {
        const float g = C::to_float(grow[m][row_load]);
        gv[u][m] = row_live ? g : 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float c[8];
      decode_word(word[u], table, c);
#pragma unroll
      for (int m = 0; m < kGRows; ++m) {
        const float gs = __fmul_rn(scale[u], gv[u][m]);  // the block scale, once per word
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[m][j] = __fmaf_rn(c[j], gs, acc[m][j]);
      }
    }
  }

  // Sum the 8 warps in a fixed order, one grad row at a time (8 KB of smem).
  __shared__ float4 red[kGemvTWarps][kGemvTColumns / 4];
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kGemvTColumns;
  float* ws_split = ws + static_cast<int64_t>(blockIdx.y) * g_rows * k;
#pragma unroll
  for (int m = 0; m < kGRows; ++m) {
    if (m >= g_rows) break;  // uniform over the CTA
    red[warp][2 * lane] = make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
    red[warp][2 * lane + 1] = make_float4(acc[m][4], acc[m][5], acc[m][6], acc[m][7]);
    __syncthreads();
    const float* red_f = reinterpret_cast<const float*>(&red[0][0]);
    float sum = red_f[threadIdx.x];
#pragma unroll
    for (int w = 1; w < kGemvTWarps; ++w) sum += red_f[w * kGemvTColumns + threadIdx.x];
    const int64_t col = k0 + threadIdx.x;
    if (col < k) ws_split[m * k + col] = sum;
    __syncthreads();
  }
}

// Any layout: one thread per input feature, the rows of one split.
template <typename T, int kGRows>
__global__ void __launch_bounds__(kGenericThreads)
    nf4_gemv_t_generic_kernel(const uint8_t* __restrict__ packed, const NF4Scales scales, const T* __restrict__ grad,
                              int g_rows, int64_t n_out, int64_t k, int64_t rows_per_split, float* __restrict__ ws) {
  using C = Convert<T>;
  using D = typename C::Device;
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = kNF4CodeTable[threadIdx.x];
  __syncthreads();
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kGenericThreads + threadIdx.x;
  if (col >= k) return;
  const float offset = load_offset(scales);
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t n_end = min(n_out, n_begin + rows_per_split);

  const D* grow[kGRows];
#pragma unroll
  for (int m = 0; m < kGRows; ++m) grow[m] = reinterpret_cast<const D*>(grad) + min(m, g_rows - 1) * n_out;
  float acc[kGRows];
#pragma unroll
  for (int m = 0; m < kGRows; ++m) acc[m] = 0.0f;

  int64_t cached_block = -1;
  float cached_scale = 0.0f;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t e = n * k + col;
    const uint32_t byte = __ldg(packed + (e >> 1));
    const uint32_t nibble = (e & 1) ? (byte & 15u) : (byte >> 4);
    const int64_t block = e >> scales.log2_blocksize;
    if (block != cached_block) {
      cached_scale = block_scale_any(scales, block, offset);
      cached_block = block;
    }
    const float w = __fmul_rn(table[nibble], cached_scale);
#pragma unroll
    for (int m = 0; m < kGRows; ++m) acc[m] = __fmaf_rn(w, C::to_float(grow[m][n]), acc[m]);
  }
  float* ws_split = ws + static_cast<int64_t>(blockIdx.y) * g_rows * k;
#pragma unroll
  for (int m = 0; m < kGRows; ++m) {
    if (m < g_rows) ws_split[m * k + col] = acc[m];
  }
}

// out[i] = sum over splits s (in order) of ws[s * count + i], in out's dtype.
template <typename T>
__global__ void sum_splits_kernel(const float* __restrict__ ws, int64_t splits, int64_t count, T* __restrict__ out) {
  using C = Convert<T>;
  auto* od = reinterpret_cast<typename C::Device*>(out);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = ws[i];
    for (int64_t s = 1; s < splits; ++s) sum += ws[s * count + i];
    od[i] = C::from_float(sum);
  }
}

// ------------------------------------------------- tiled path: dequantize --

constexpr int kTileThreads = 256;

// Walks items i = start, start + step, ... of a rows x cols grid, keeping
// (row, col) up to date with one compare instead of a 64-bit division per item.
struct GridWalk {
  int64_t row, col, step_rows, step_cols;
  __device__ GridWalk(int64_t start, int64_t step, int64_t cols)
      : row(start / cols), col(start % cols), step_rows(step / cols), step_cols(step % cols) {}
  __device__ void advance(int64_t cols) {
    row += step_rows;
    col += step_cols;
    if (col >= cols) {
      col -= cols;
      ++row;
    }
  }
};

// out (rows x cols, row-major) = W[row0 : row0 + rows, col0 : col0 + cols],
// 8 elements (one packed word, one block) per item. Needs K, col0 and cols
// multiples of 8, packed 4-byte aligned and out 16-byte aligned.
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    dequant_tile_words_kernel(const uint32_t* __restrict__ packed_words, const NF4Scales scales, int64_t k_words,
                              int64_t row0, int64_t col0_words, int64_t rows, int64_t col_words, T* __restrict__ out) {
  using C = Convert<T>;
  using D = typename C::Device;
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = kNF4CodeTable[threadIdx.x];
  __syncthreads();
  const float offset = load_offset(scales);
  const int64_t items = rows * col_words;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (start >= items) return;
  D* od = reinterpret_cast<D*>(out);
  GridWalk pos(start, step, col_words);
  for (int64_t i = start; i < items; i += step, pos.advance(col_words)) {
    const int64_t word_index = (row0 + pos.row) * k_words + col0_words + pos.col;
    const uint32_t word = load_streaming(packed_words + word_index);
    const float scale = block_scale_any(scales, (8 * word_index) >> scales.log2_blocksize, offset);
    alignas(16) D vals[8];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const uint32_t byte = (word >> (8 * b)) & 0xffu;
      vals[2 * b] = C::from_float(__fmul_rn(table[byte >> 4], scale));
      vals[2 * b + 1] = C::from_float(__fmul_rn(table[byte & 15u], scale));
    }
    D* dst = od + pos.row * (8 * col_words) + 8 * pos.col;
    if constexpr (sizeof(D) == 4) {
      reinterpret_cast<float4*>(dst)[0] = *reinterpret_cast<const float4*>(vals);
      reinterpret_cast<float4*>(dst)[1] = *reinterpret_cast<const float4*>(vals + 4);
    } else {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(vals);
    }
  }
}

// Same tile for any layout, one element per item.
template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    dequant_tile_elements_kernel(const uint8_t* __restrict__ packed, const NF4Scales scales, int64_t k, int64_t row0,
                                 int64_t col0, int64_t rows, int64_t cols, T* __restrict__ out) {
  using C = Convert<T>;
  using D = typename C::Device;
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = kNF4CodeTable[threadIdx.x];
  __syncthreads();
  const float offset = load_offset(scales);
  const int64_t items = rows * cols;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if (start >= items) return;
  D* od = reinterpret_cast<D*>(out);
  GridWalk pos(start, step, cols);
  for (int64_t i = start; i < items; i += step, pos.advance(cols)) {
    const int64_t e = (row0 + pos.row) * k + col0 + pos.col;
    const uint32_t byte = __ldg(packed + (e >> 1));
    const uint32_t nibble = (e & 1) ? (byte & 15u) : (byte >> 4);
    od[i] = C::from_float(__fmul_rn(table[nibble], block_scale_any(scales, e >> scales.log2_blocksize, offset)));
  }
}

// ------------------------------------------------------------------ host --

int log2_exact(int64_t v) {  // v is a checked power of two
  int l = 0;
  while ((int64_t{1} << l) < v) ++l;
  return l;
}

// The NF4 state, contiguous, and the kernels' view of it.
struct NF4Weight {
  at::Tensor packed, absmax, absmax2, code2, offset;
  NF4Scales scales{};
  bool nested = false;
  bool words_aligned = false;  // packed starts on a 4-byte boundary
};

NF4Weight prepare_weight(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                         const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  NF4Weight w;
  w.packed = packed.contiguous();
  w.absmax = absmax.contiguous();
  w.nested = nested_absmax.has_value();
  w.scales.log2_blocksize = log2_exact(blocksize);
  if (w.nested) {
    w.absmax2 = nested_absmax->contiguous();
    w.code2 = nested_code->contiguous();
    w.offset = offset->contiguous();
    w.scales.codes = w.absmax.const_data_ptr<uint8_t>();
    w.scales.absmax2 = w.absmax2.const_data_ptr<float>();
    w.scales.code2 = w.code2.const_data_ptr<float>();
    w.scales.offset = w.offset.const_data_ptr<float>();
    w.scales.log2_nested_blocksize = log2_exact(nested_blocksize);
  } else {
    w.scales.absmax = w.absmax.const_data_ptr<float>();
  }
  w.words_aligned = reinterpret_cast<uintptr_t>(w.packed.const_data_ptr()) % 4 == 0;
  return w;
}

void check_on_cuda(const char* op, const at::Tensor& input, const at::Tensor& packed) {
  // The shared checks have already put every tensor on packed's device.
  TORCH_CHECK_VALUE(input.is_cuda() && packed.is_cuda(), op, ": expected CUDA tensors, got ", input.device(),
                    " and ", packed.device());
}

// The word kernels: K % 8 == 0 (rows start on a packed word), an aligned
// packed buffer, and word indices that fit an int.
bool use_word_kernels(const NF4Weight& w, int64_t k) {
  return w.words_aligned && k % 8 == 0 && k / 8 <= (int64_t{1} << 30);
}

// Calls f(std::integral_constant<int, B>) for the row bucket B in {1, 2, 4, 8} holding `rows`.
template <typename F>
void with_row_bucket(int64_t rows, F&& f) {
  if (rows <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (rows <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (rows <= 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

template <typename F>
void with_nested(bool nested, F&& f) {
  if (nested) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

unsigned grid_stride_ctas(int64_t items, int64_t threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(items, threads), 1, sms * 16));
}

// Dequantizes W[row0 : row0 + rows, col0 : col0 + cols] into `out` (contiguous,
// rows x cols, fresh so 16-byte aligned), the exact values of dequantize_nf4.
void dequantize_tile(const NF4Weight& w, int64_t k, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
                     at::Tensor& out) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool words = w.words_aligned && k % 8 == 0 && col0 % 8 == 0 && cols % 8 == 0 &&
                     reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  LLMKIT_DISPATCH_FLOAT_HALF_BF16(out.scalar_type(), "nf4_dequantize_tile", [&] {
    if (words) {
      const int64_t items = rows * (cols / 8);
      dequant_tile_words_kernel<scalar_t><<<grid_stride_ctas(items, kTileThreads), kTileThreads, 0, stream>>>(
          reinterpret_cast<const uint32_t*>(w.packed.const_data_ptr<uint8_t>()), w.scales, k / 8, row0, col0 / 8,
          rows, cols / 8, out.data_ptr<scalar_t>());
    } else {
      dequant_tile_elements_kernel<scalar_t><<<grid_stride_ctas(rows * cols, kTileThreads), kTileThreads, 0, stream>>>(
          w.packed.const_data_ptr<uint8_t>(), w.scales, k, row0, col0, rows, cols, out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Chunk extent along a dimension of `total` lines of `line_bytes` each, so a
// chunk holds about `budget` bytes: a multiple of 128 lines when that many fit
// (GEMM tile friendly), else of 8 (keeps column chunks word-aligned), and at
// least 8.
int64_t chunk_lines(int64_t total, int64_t line_bytes, int64_t budget) {
  int64_t lines = budget / std::max<int64_t>(line_bytes, 1);
  lines = lines >= 128 ? lines / 128 * 128 : std::max<int64_t>(8, lines / 8 * 8);
  return std::min(lines, total);
}

// Row splits of the transposed GEMV: about 4 CTAs per SM over col_tiles x
// splits, and at least min_rows rows per split (it bounds the workspace).
struct RowSplits {
  int64_t rows_per_split;
  int64_t splits;
};
RowSplits plan_row_splits(int64_t n_out, int64_t col_tiles, int64_t min_rows) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t max_splits = std::clamp<int64_t>(n_out / min_rows, 1, 65535);
  const int64_t splits = std::clamp<int64_t>(ceil_div(4 * sms, col_tiles), 1, max_splits);
  const int64_t rows = ceil_div(ceil_div(n_out, splits), 32) * 32;
  return {rows, ceil_div(n_out, rows)};
}

at::Tensor nf4_linear_cuda(const at::Tensor& x_, const at::Tensor& packed_, const at::Tensor& absmax_,
                           int64_t blocksize, c10::SymIntArrayRef shape_,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                           int64_t nested_blocksize, const std::optional<at::Tensor>& bias_) {
  const auto shape = C10_AS_INTARRAYREF_SLOW(shape_);
  const NF4LinearShape s = check_nf4_linear_args("nf4_linear", x_, false, packed_, absmax_, blocksize, shape,
                                                 nested_absmax, nested_code, offset, nested_blocksize, bias_);
  check_on_cuda("nf4_linear", x_, packed_);
  const c10::cuda::CUDAGuard guard(packed_.device());
  const int64_t n_out = s.out_features;
  const int64_t k = s.in_features;
  std::vector<int64_t> out_sizes(x_.sizes().begin(), x_.sizes().end());
  out_sizes.back() = n_out;
  const int64_t rows = x_.numel() / k;
  if (rows == 0) return at::empty(out_sizes, x_.options());

  const NF4Weight w = prepare_weight(packed_, absmax_, blocksize, nested_absmax, nested_code, offset, nested_blocksize);
  at::Tensor x = x_.contiguous().view({rows, k});
  const at::Tensor bias = bias_.has_value() ? bias_->contiguous() : at::Tensor();
  at::Tensor y = at::empty({rows, n_out}, x.options());
  auto stream = at::cuda::getCurrentCUDAStream();

  if (rows <= linear_paths().gemv_rows) {
    const bool words = use_word_kernels(w, k);
    if (words && reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 != 0) x = x.clone();  // 16-byte x loads
    LLMKIT_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "nf4_linear_cuda", [&] {
      const scalar_t* bias_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
      with_row_bucket(rows, [&](auto bucket) {
        constexpr int kXRows = decltype(bucket)::value;
        if (words) {
          with_nested(w.nested, [&](auto nested) {
            constexpr bool kNested = decltype(nested)::value;
            const auto ctas = static_cast<unsigned>(ceil_div(n_out, GemvTile<kXRows>::kWRows));
            nf4_gemv_kernel<scalar_t, kXRows, kNested><<<ctas, kGemvThreads, 0, stream>>>(
                reinterpret_cast<const uint32_t*>(w.packed.const_data_ptr<uint8_t>()), w.scales,
                x.const_data_ptr<scalar_t>(), static_cast<int>(rows), n_out, static_cast<int>(k / 8), bias_ptr,
                y.data_ptr<scalar_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        } else {
          const auto ctas = static_cast<unsigned>(ceil_div(n_out, kGenericWarps));
          nf4_gemv_generic_kernel<scalar_t, kXRows><<<ctas, kGenericThreads, 0, stream>>>(
              w.packed.const_data_ptr<uint8_t>(), w.scales, x.const_data_ptr<scalar_t>(), static_cast<int>(rows),
              n_out, k, bias_ptr, y.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
    return y.view(out_sizes);
  }

  // Tiled: row chunks of W, y[:, n0:n1] = x @ W[n0:n1].T (+ bias[n0:n1]).
  const int64_t chunk = chunk_lines(n_out, k * x.element_size(), linear_paths().chunk_bytes);
  at::Tensor scratch = at::empty({chunk, k}, x.options());
  for (int64_t n0 = 0; n0 < n_out; n0 += chunk) {
    const int64_t nc = std::min(chunk, n_out - n0);
    at::Tensor w_chunk = scratch.narrow(0, 0, nc);
    dequantize_tile(w, k, n0, nc, 0, k, w_chunk);
    at::Tensor y_cols = y.narrow(1, n0, nc);
    if (bias.defined()) {
      at::addmm_out(y_cols, bias.narrow(0, n0, nc), x, w_chunk.t());
    } else {
      at::mm_out(y_cols, x, w_chunk.t());
    }
  }
  return y.view(out_sizes);
}

at::Tensor nf4_linear_grad_input_cuda(const at::Tensor& grad_, const at::Tensor& packed_, const at::Tensor& absmax_,
                                      int64_t blocksize, c10::SymIntArrayRef shape_,
                                      const std::optional<at::Tensor>& nested_absmax,
                                      const std::optional<at::Tensor>& nested_code,
                                      const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  const auto shape = C10_AS_INTARRAYREF_SLOW(shape_);
  const NF4LinearShape s = check_nf4_linear_args("nf4_linear_grad_input", grad_, true, packed_, absmax_, blocksize,
                                                 shape, nested_absmax, nested_code, offset, nested_blocksize,
                                                 std::nullopt);
  check_on_cuda("nf4_linear_grad_input", grad_, packed_);
  const c10::cuda::CUDAGuard guard(packed_.device());
  const int64_t n_out = s.out_features;
  const int64_t k = s.in_features;
  std::vector<int64_t> out_sizes(grad_.sizes().begin(), grad_.sizes().end());
  out_sizes.back() = k;
  const int64_t rows = grad_.numel() / n_out;
  if (rows == 0) return at::empty(out_sizes, grad_.options());

  const NF4Weight w = prepare_weight(packed_, absmax_, blocksize, nested_absmax, nested_code, offset, nested_blocksize);
  const at::Tensor grad = grad_.contiguous().view({rows, n_out});
  at::Tensor dx = at::empty({rows, k}, grad.options());
  auto stream = at::cuda::getCurrentCUDAStream();

  if (rows <= linear_paths().gemv_rows) {
    const bool words = use_word_kernels(w, k);
    const int64_t col_tiles = words ? ceil_div(k, kGemvTColumns) : ceil_div(k, kGenericThreads);
    // The word kernel's warps share a split: 128 rows = 16 per warp at least.
    const RowSplits plan = plan_row_splits(n_out, col_tiles, words ? 128 : 32);
    at::Tensor ws = at::empty({plan.splits, rows, k}, grad.options().dtype(at::kFloat));
    const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(plan.splits));
    LLMKIT_DISPATCH_FLOAT_HALF_BF16(grad.scalar_type(), "nf4_linear_grad_input_cuda", [&] {
      with_row_bucket(rows, [&](auto bucket) {
        constexpr int kGRows = decltype(bucket)::value;
        if (words) {
          with_nested(w.nested, [&](auto nested) {
            constexpr bool kNested = decltype(nested)::value;
            nf4_gemv_t_kernel<scalar_t, kGRows, kNested><<<grid, kGemvTThreads, 0, stream>>>(
                reinterpret_cast<const uint32_t*>(w.packed.const_data_ptr<uint8_t>()), w.scales,
                grad.const_data_ptr<scalar_t>(), static_cast<int>(rows), n_out, static_cast<int>(k / 8),
                plan.rows_per_split, ws.data_ptr<float>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        } else {
          nf4_gemv_t_generic_kernel<scalar_t, kGRows><<<grid, kGenericThreads, 0, stream>>>(
              w.packed.const_data_ptr<uint8_t>(), w.scales, grad.const_data_ptr<scalar_t>(), static_cast<int>(rows),
              n_out, k, plan.rows_per_split, ws.data_ptr<float>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
      const int64_t count = rows * k;
      sum_splits_kernel<scalar_t><<<grid_stride_ctas(count, 256), 256, 0, stream>>>(
          ws.const_data_ptr<float>(), plan.splits, count, dx.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return dx.view(out_sizes);
  }

  // Tiled: column chunks of W, dx[:, k0:k1] = grad @ W[:, k0:k1].
  const int64_t chunk = chunk_lines(k, n_out * grad.element_size(), linear_paths().chunk_bytes);
  at::Tensor scratch = at::empty({n_out * chunk}, grad.options());
  for (int64_t k0 = 0; k0 < k; k0 += chunk) {
    const int64_t kc = std::min(chunk, k - k0);
    at::Tensor w_chunk = scratch.narrow(0, 0, n_out * kc).view({n_out, kc});
    dequantize_tile(w, k, 0, n_out, k0, kc, w_chunk);
    at::Tensor dx_cols = dx.narrow(1, k0, kc);
    at::mm_out(dx_cols, grad, w_chunk);
  }
  return dx.view(out_sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkit, CUDA, m) {
  m.impl("nf4_linear", &nf4_linear_cuda);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cuda);
}

}  // namespace llmkit::quant
