// The BLAS that torch ships (MKL on x86 wheels, OpenBLAS elsewhere), for
// the CPU kernels that call sgemm on their own tiles (attention blocks, NF4
// dequantized tiles) without going through the dispatcher.
#pragma once

#include <cstdint>

// Fortran BLAS sgemm (LP64), exported by libtorch_cpu on builds with MKL or
// OpenBLAS. Weak: null when absent, and the portable loop is used.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (the Fortran-style entry: by pointer). Our
// products run inside our own parallel region, so MKL must not start threads
// of its own (oversubscription).
extern "C" int mkl_set_num_threads_local(const int* nthreads) __attribute__((weak));

namespace llmkit {

// Keeps the BLAS of the calling thread single-threaded for its lifetime.
struct SingleThreadedBlas {
  int previous = 0;
  SingleThreadedBlas() {
    const int one = 1;
    if (mkl_set_num_threads_local != nullptr) previous = mkl_set_num_threads_local(&one);
  }
  ~SingleThreadedBlas() {
    if (mkl_set_num_threads_local != nullptr) mkl_set_num_threads_local(&previous);
  }
};

// C (m x n, row-major, ldc) = alpha * op(A) @ op(B) + beta * C, op(A) m x k.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (sgemm_ != nullptr && k > 0) {
    // Row-major C = A B is column-major C^T = B^T A^T: swap the operands.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      float sum = 0.f;
      for (int64_t t = 0; t < k; ++t) {
        const float av = trans_a ? a[t * lda + i] : a[i * lda + t];
        const float bv = trans_b ? b[j * ldb + t] : b[t * ldb + j];
        sum += av * bv;
      }
      c[i * ldc + j] = alpha * sum + (beta == 0.f ? 0.f : beta * c[i * ldc + j]);
    }
  }
}

}  // namespace llmkit
