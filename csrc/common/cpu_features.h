// Run-time choice of the CPU kernels' AVX2 + FMA builds. Kernels compile an
// AVX2 copy (target attributes) next to a portable one and pick at run time,
// so one binary runs on any x86-64; LLMKIT_FORCE_SCALAR=1 forces the portable
// copies so that tests cover them too.
#pragma once

#include <cstdlib>

namespace llmkit {

inline bool force_scalar() {
  static const bool forced = [] {
    const char* env = std::getenv("LLMKIT_FORCE_SCALAR");
    return env != nullptr && env[0] == '1';
  }();
  return forced;
}

// AVX2 and FMA present and not forced off.
inline bool use_avx2_fma() {
#if defined(__x86_64__)
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2 && !force_scalar();
#else
  return false;
#endif
}

}  // namespace llmkit
