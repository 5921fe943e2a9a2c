// CPU kernels of the fused NF4 matmul (QLoRA's frozen base layer):
//   nf4_linear:             y  = x @ W^T + bias    x (M x K), W (N x K) in NF4
//   nf4_linear_grad_input:  dx = dy @ W            dy (M x N)
// W is never materialised in full precision. Three paths, by the number of rows M:
//   * decode GEMV (forward, M <= gemv_rows, K % blocksize == 0, AVX2): threads
//     own output features; nibbles are decoded in registers and multiplied
//     straight into x (pre-shuffled into the order nibbles decode in), the block
//     scale applied once per block. It reads 4.5 bits per weight instead of 32:
//     the batch-1 decode step is bound by that read, not by the FLOPs.
//   * small-M tiles (M <= small_rows): each thread dequantizes L2-sized tiles
//     of W into its own buffer and runs a single-threaded sgemm on each. The
//     forward tiles rows of W (a thread owns output columns), the backward tiles
//     columns (a thread owns columns of dx), so no two threads write one output
//     and the result does not depend on the thread count.
//   * large-M chunks: W is dequantized a few MiB at a time by all threads, and
//     each chunk goes to a multithreaded sgemm; the O(N K) dequantization is
//     noise next to the O(M N K) product, and x is re-packed once per chunk.
// All paths compute in fp32 (fp16/bf16 inputs are widened once, the result
// narrowed), as bitsandbytes' matmul_4bit accumulates in fp32.
// LLMKIT_NF4_LINEAR="gemv_rows,small_rows,chunk_kib" overrides the thresholds (tuning).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/cpu_blas.h"
#include "quant/nf4.h"
#include "quant/nf4_cpu_simd.h"

namespace llmkit::quant {
namespace {

struct LinearPaths {
  int64_t gemv_rows = 8;          // decode GEMV up to this many rows of x (4 per pass)
  int64_t small_rows = 16;        // per-thread L2 tiles up to this many
  int64_t chunk_bytes = 8 << 20;  // fp32 bytes of W dequantized at once (large M)
};

LinearPaths linear_paths() {
  static const LinearPaths paths = [] {
    LinearPaths p;
    if (const char* env = std::getenv("LLMKIT_NF4_LINEAR")) {
      long g = 0, s = 0, c = 0;
      if (std::sscanf(env, "%ld,%ld,%ld", &g, &s, &c) == 3 && g >= 0 && s >= 0 && c > 0) {
        p = {g, s, static_cast<int64_t>(c) << 10};
      }
    }
    return p;
  }();
  return paths;
}

// Per-thread tile budget of the small-M paths: fits a core's L2 with x beside it.
constexpr int64_t kTileBytes = 256 << 10;

// The state of one NF4 weight, as raw pointers.
struct NF4Matrix {
  const uint8_t* packed;
  BlockScales scales;
  int64_t blocksize;
  int64_t rows;  // N, out_features
  int64_t cols;  // K, in_features
};

// ---------------------------------------------- dequantize a flat range --
// Elements [e0, e1) of the flat weight into out[0 .. e1 - e0) as fp32. The
// range may start mid-block or on a low nibble (rows of a weight whose K is
// not a multiple of the blocksize); values equal dequantize_nf4's exactly.

void dequant_flat_range_scalar(const NF4Matrix& w, int64_t e0, int64_t e1, float* out) {
  for (int64_t e = e0; e < e1;) {
    const int64_t b = e / w.blocksize, end = std::min(e1, (b + 1) * w.blocksize);
    const float scale = w.scales(b);
    if (e & 1) {  // a range starting on a low nibble
      *out++ = kNF4Codes[w.packed[e / 2] & 15] * scale;
      if (++e == end) continue;
    }
    dequantize_bytes_scalar(w.packed + e / 2, end - e, scale, out);
    out += end - e;
    e = end;
  }
}

#ifdef LLMKIT_X86
LLMKIT_AVX2 void dequant_flat_range_avx2(const NF4Matrix& w, int64_t e0, int64_t e1, float* out) {
  for (int64_t e = e0; e < e1;) {
    const int64_t b = e / w.blocksize, end = std::min(e1, (b + 1) * w.blocksize);
    const float scale = w.scales(b);
    if (e & 1) {
      *out++ = kNF4Codes[w.packed[e / 2] & 15] * scale;
      if (++e == end) continue;
    }
    dequantize_bytes_avx2(w.packed + e / 2, end - e, scale, out);
    out += end - e;
    e = end;
  }
}
#endif

void dequant_flat_range(const NF4Matrix& w, int64_t e0, int64_t e1, float* out, bool simd) {
#ifdef LLMKIT_X86
  if (simd) return dequant_flat_range_avx2(w, e0, e1, out);
#endif
  dequant_flat_range_scalar(w, e0, e1, out);
}

// Rows [r0, r1), columns [c0, c1) of W into a dense (r1 - r0) x (c1 - c0) tile.
void dequant_tile(const NF4Matrix& w, int64_t r0, int64_t r1, int64_t c0, int64_t c1, float* tile, bool simd) {
  const int64_t width = c1 - c0;
  if (c0 == 0 && c1 == w.cols) return dequant_flat_range(w, r0 * w.cols, r1 * w.cols, tile, simd);
  for (int64_t r = r0; r < r1; ++r) dequant_flat_range(w, r * w.cols + c0, r * w.cols + c1, tile + (r - r0) * width, simd);
}

// Large-M paths: rows [r0, r1) of W dequantized by all threads into one
// reused buffer of about chunk_bytes, then handed to `use` (a multithreaded GEMM).
template <typename Use>
void for_each_dequantized_chunk(const NF4Matrix& w, int64_t chunk_bytes, bool simd, Use&& use) {
  const int64_t N = w.rows, K = w.cols;
  const int64_t chunk_rows = std::clamp<int64_t>(chunk_bytes / (4 * K), 1, N);
  std::vector<float> chunk(chunk_rows * K);
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    const int64_t r1 = std::min(N, r0 + chunk_rows);
    at::parallel_for(r0, r1, 1, [&](int64_t a, int64_t b) {
      dequant_tile(w, a, b, 0, K, chunk.data() + (a - r0) * K, simd);
    });
    use(r0, r1, chunk.data());
  }
}

// ------------------------------------------------------- decode GEMV --
#ifdef LLMKIT_X86
// The GEMV's dot products use FMA (accuracy is an fp32 bound here, not the
// format's bit-exact rounding that the dequantize path keeps FMA-free for).
#define LLMKIT_AVX2_FMA __attribute__((target("avx2,fma,f16c")))

LLMKIT_AVX2_FMA LLMKIT_INLINE float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The decoder (below) turns 16 packed bytes = 32 elements into four vectors
// f0..f3; f_k's low 128-bit lane holds elements 2j and its high lane elements
// 2j + 1, for j = 4k .. 4k + 3. x is pre-shuffled into that order once, so
// the decoded weights multiply x without any shuffling per row of W.
constexpr int64_t kDecodeGroup = 32;

int64_t decode_order(int64_t i) {  // position i of a shuffled group -> element of the group
  const int64_t k = i / 8, lane = (i % 8) / 4, t = i % 4;
  return 2 * (4 * k + t) + lane;
}

void shuffle_for_decode(const float* x, int64_t rows, int64_t k, float* xs) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < k; g += kDecodeGroup) {
      for (int64_t i = 0; i < kDecodeGroup; ++i) xs[r * k + g + i] = x[r * k + g + decode_order(i)];
    }
  }
}

// The NF4 code table as four byte planes (byte p of each code's float bits),
// each repeated in both 128-bit lanes for vpshufb.
struct CodeBytePlanes {
  __m256i plane[4];
};

LLMKIT_AVX2_FMA CodeBytePlanes code_byte_planes() {
  alignas(16) uint8_t bytes[4][16];
  for (int c = 0; c < 16; ++c) {
    uint32_t bits;
    std::memcpy(&bits, &kNF4Codes[c], 4);
    for (int p = 0; p < 4; ++p) bytes[p][c] = static_cast<uint8_t>(bits >> (8 * p));
  }
  CodeBytePlanes planes;
  for (int p = 0; p < 4; ++p) {
    planes.plane[p] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes[p])));
  }
  return planes;
}

// 16 packed bytes -> 32 NF4 values (unscaled) as f[0..3], in decode order.
// Byte-plane lookups (vpshufb) and unpacks are single-cycle on every x86
// core, where a 16-entry float table via vpermps costs several cycles.
LLMKIT_AVX2_FMA LLMKIT_INLINE void decode32_avx2(const uint8_t* in, const CodeBytePlanes& t, __m256 f[4]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in));
  const __m128i low4 = _mm_set1_epi8(15);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);  // elements 0, 2, ..., 30
  const __m128i lo = _mm_and_si128(bytes, low4);                     // elements 1, 3, ..., 31
  const __m256i idx = _mm256_inserti128_si256(_mm256_castsi128_si256(hi), lo, 1);
  const __m256i b0 = _mm256_shuffle_epi8(t.plane[0], idx), b1 = _mm256_shuffle_epi8(t.plane[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(t.plane[2], idx), b3 = _mm256_shuffle_epi8(t.plane[3], idx);
  const __m256i w01_lo = _mm256_unpacklo_epi8(b0, b1), w01_hi = _mm256_unpackhi_epi8(b0, b1);
  const __m256i w23_lo = _mm256_unpacklo_epi8(b2, b3), w23_hi = _mm256_unpackhi_epi8(b2, b3);
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01_lo, w23_lo));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01_lo, w23_lo));
  f[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(w01_hi, w23_hi));
  f[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(w01_hi, w23_hi));
}

// Output features [n0, n1) for R rows of x (shuffled, row stride K). With
// K % blocksize == 0 every row of W starts on a byte and on a block, and a
// block is a whole number of 32-element groups (blocksize >= 32). Two
// accumulators per row and block keep the FMA latency chains short.
template <int R>
LLMKIT_AVX2_FMA void decode_gemv_avx2(const NF4Matrix& w, const float* xs, const float* bias, int64_t n0, int64_t n1,
                                      float* out, int64_t ldo) {
  const int64_t K = w.cols, bs = w.blocksize, blocks_per_row = K / bs;
  const CodeBytePlanes planes = code_byte_planes();
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.packed + n * (K / 2);
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t j = 0; j < blocks_per_row; ++j) {
      const uint8_t* bytes = row + j * (bs / 2);
      const float* xb = xs + j * bs;
      __m256 even[R], odd[R];
      for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm256_setzero_ps();
      for (int64_t g = 0; g < bs; g += kDecodeGroup) {
        __m256 f[4];
        decode32_avx2(bytes + g / 2, planes, f);
        for (int r = 0; r < R; ++r) {
          const float* xg = xb + r * K + g;
          even[r] = _mm256_fmadd_ps(f[0], _mm256_loadu_ps(xg), even[r]);
          odd[r] = _mm256_fmadd_ps(f[1], _mm256_loadu_ps(xg + 8), odd[r]);
          even[r] = _mm256_fmadd_ps(f[2], _mm256_loadu_ps(xg + 16), even[r]);
          odd[r] = _mm256_fmadd_ps(f[3], _mm256_loadu_ps(xg + 24), odd[r]);
        }
      }
      const __m256 scale = _mm256_set1_ps(w.scales(n * blocks_per_row + j));
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_add_ps(even[r], odd[r]), scale, acc[r]);
    }
    const float b = bias != nullptr ? bias[n] : 0.0f;
    for (int r = 0; r < R; ++r) out[r * ldo + n] = hsum_avx2(acc[r]) + b;
  }
}

void decode_gemv(const NF4Matrix& w, const float* xs, int64_t rows, const float* bias, int64_t n0, int64_t n1,
                 float* out, int64_t ldo) {
  switch (rows) {
    case 1: return decode_gemv_avx2<1>(w, xs, bias, n0, n1, out, ldo);
    case 2: return decode_gemv_avx2<2>(w, xs, bias, n0, n1, out, ldo);
    case 3: return decode_gemv_avx2<3>(w, xs, bias, n0, n1, out, ldo);
    default: return decode_gemv_avx2<4>(w, xs, bias, n0, n1, out, ldo);
  }
}
#endif  // LLMKIT_X86

// ------------------------------------------------------------ forward --

void linear_forward_fp32(const NF4Matrix& w, const float* x, int64_t M, const float* bias, float* out) {
  const int64_t N = w.rows, K = w.cols;
  const LinearPaths paths = linear_paths();
  const bool simd = use_simd();
  if (M == 0) return;

#ifdef LLMKIT_X86
  if (simd && M <= paths.gemv_rows && K % w.blocksize == 0) {
    std::vector<float> xs(M * K);
    shuffle_for_decode(x, M, K, xs.data());
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t r = 0; r < M; r += 4) {
        decode_gemv(w, xs.data() + r * K, std::min<int64_t>(4, M - r), bias, n0, n1, out + r * N, N);
      }
    });
    return;
  }
#endif

  if (M <= paths.small_rows) {
    const int64_t tile_rows = std::clamp<int64_t>(kTileBytes / (4 * K), 1, N);
    const int64_t tiles = ceil_div(N, tile_rows);
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      const SingleThreadedBlas single_threaded_blas;
      std::vector<float> tile(tile_rows * K);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * tile_rows, r1 = std::min(N, r0 + tile_rows);
        dequant_tile(w, r0, r1, 0, K, tile.data(), simd);
        gemm(false, true, M, r1 - r0, K, 1.0f, x, K, tile.data(), K, 0.0f, out + r0, N);
      }
    });
  } else {
    for_each_dequantized_chunk(w, paths.chunk_bytes, simd, [&](int64_t r0, int64_t r1, const float* chunk) {
      gemm(false, true, M, r1 - r0, K, 1.0f, x, K, chunk, K, 0.0f, out + r0, N);
    });
  }
  if (bias != nullptr) {
    for (int64_t m = 0; m < M; ++m) {
      float* o = out + m * N;
      for (int64_t n = 0; n < N; ++n) o[n] += bias[n];
    }
  }
}

// ----------------------------------------------------------- backward --

void linear_grad_input_fp32(const NF4Matrix& w, const float* dy, int64_t M, float* dx) {
  const int64_t N = w.rows, K = w.cols;
  const LinearPaths paths = linear_paths();
  const bool simd = use_simd();
  if (M == 0) return;

  if (M <= paths.small_rows) {
    // Threads own column panels of dx; each panel walks W's rows in L2-sized tiles.
    const int64_t panel = std::min<int64_t>(K, 128);
    const int64_t tile_rows = std::clamp<int64_t>(kTileBytes / (4 * panel), 1, N);
    at::parallel_for(0, ceil_div(K, panel), 1, [&](int64_t p0, int64_t p1) {
      const SingleThreadedBlas single_threaded_blas;
      std::vector<float> tile(tile_rows * panel);
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t c0 = p * panel, c1 = std::min(K, c0 + panel);
        for (int64_t r0 = 0; r0 < N; r0 += tile_rows) {
          const int64_t r1 = std::min(N, r0 + tile_rows);
          dequant_tile(w, r0, r1, c0, c1, tile.data(), simd);
          gemm(false, false, M, c1 - c0, r1 - r0, 1.0f, dy + r0, N, tile.data(), c1 - c0, r0 == 0 ? 0.0f : 1.0f,
               dx + c0, K);
        }
      }
    });
    return;
  }
  for_each_dequantized_chunk(w, paths.chunk_bytes, simd, [&](int64_t r0, int64_t r1, const float* chunk) {
    gemm(false, false, M, K, r1 - r0, 1.0f, dy + r0, N, chunk, K, r0 == 0 ? 0.0f : 1.0f, dx, K);
  });
}

// ---------------------------------------------------------------- ops --

struct NF4Operands {
  at::Tensor packed, absmax, absmax2, code2;  // keep contiguous copies alive
  NF4Matrix matrix;
};

NF4Operands nf4_operands(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                         const NF4LinearShape& s, const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                         int64_t nested_blocksize) {
  NF4Operands ops;
  ops.packed = packed.contiguous();
  ops.absmax = absmax.contiguous();
  NF4Matrix& m = ops.matrix;
  m.packed = ops.packed.const_data_ptr<uint8_t>();
  m.blocksize = blocksize;
  m.rows = s.out_features;
  m.cols = s.in_features;
  if (nested_absmax.has_value()) {
    ops.absmax2 = nested_absmax->contiguous();
    ops.code2 = nested_code->contiguous();
    m.scales.q = ops.absmax.const_data_ptr<uint8_t>();
    m.scales.absmax2 = ops.absmax2.const_data_ptr<float>();
    m.scales.code2 = ops.code2.const_data_ptr<float>();
    m.scales.offset = offset->item<float>();
    m.scales.nested_blocksize = nested_blocksize;
  } else {
    m.scales.absmax = ops.absmax.const_data_ptr<float>();
  }
  return ops;
}

void check_cpu(const char* op, const at::Tensor& input) {
  TORCH_CHECK_VALUE(input.device().is_cpu(), op, ": expected CPU tensors, got ", input.device());
}

// The leading dimensions of `input` with a new last dimension.
std::vector<int64_t> with_last_dim(const at::Tensor& input, int64_t last) {
  std::vector<int64_t> sizes(input.sizes().begin(), input.sizes().end());
  sizes.back() = last;
  return sizes;
}

at::Tensor nf4_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          int64_t blocksize, c10::SymIntArrayRef shape_,
                          const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                          int64_t nested_blocksize, const std::optional<at::Tensor>& bias) {
  const auto shape = C10_AS_INTARRAYREF_SLOW(shape_);
  const NF4LinearShape s = check_nf4_linear_args("nf4_linear", x, false, packed, absmax, blocksize, shape,
                                                 nested_absmax, nested_code, offset, nested_blocksize, bias);
  check_cpu("nf4_linear", x);
  const NF4Operands w = nf4_operands(packed, absmax, blocksize, s, nested_absmax, nested_code, offset,
                                     nested_blocksize);
  const at::Tensor x2 = x.reshape({-1, s.in_features}).to(at::kFloat).contiguous();
  const int64_t M = x2.size(0);
  at::Tensor out = at::empty({M, s.out_features}, x.options().dtype(at::kFloat));
  at::Tensor bias_f;
  if (bias.has_value()) bias_f = bias->to(at::kFloat).contiguous();
  linear_forward_fp32(w.matrix, x2.const_data_ptr<float>(), M, bias.has_value() ? bias_f.const_data_ptr<float>() : nullptr,
                      out.data_ptr<float>());
  return out.to(x.scalar_type()).reshape(with_last_dim(x, s.out_features));
}

at::Tensor nf4_linear_grad_input_cpu(const at::Tensor& grad_out, const at::Tensor& packed, const at::Tensor& absmax,
                                     int64_t blocksize, c10::SymIntArrayRef shape_,
                                     const std::optional<at::Tensor>& nested_absmax,
                                     const std::optional<at::Tensor>& nested_code,
                                     const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  const auto shape = C10_AS_INTARRAYREF_SLOW(shape_);
  const NF4LinearShape s = check_nf4_linear_args("nf4_linear_grad_input", grad_out, true, packed, absmax, blocksize,
                                                 shape, nested_absmax, nested_code, offset, nested_blocksize,
                                                 std::nullopt);
  check_cpu("nf4_linear_grad_input", grad_out);
  const NF4Operands w = nf4_operands(packed, absmax, blocksize, s, nested_absmax, nested_code, offset,
                                     nested_blocksize);
  const at::Tensor dy = grad_out.reshape({-1, s.out_features}).to(at::kFloat).contiguous();
  const int64_t M = dy.size(0);
  at::Tensor dx = at::empty({M, s.in_features}, grad_out.options().dtype(at::kFloat));
  linear_grad_input_fp32(w.matrix, dy.const_data_ptr<float>(), M, dx.data_ptr<float>());
  return dx.to(grad_out.scalar_type()).reshape(with_last_dim(grad_out, s.in_features));
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkit, CPU, m) {
  m.impl("nf4_linear", &nf4_linear_cpu);
  m.impl("nf4_linear_grad_input", &nf4_linear_grad_input_cpu);
}

}  // namespace llmkit::quant
