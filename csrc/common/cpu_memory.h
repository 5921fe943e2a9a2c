// Large CPU buffers backed by transparent huge pages.
//
// A fresh multi-MiB tensor from the default allocator is mmap'ed and
// page-faulted 4 KiB at a time on first touch: for a kernel that writes it
// once, the faults (and the kernel zeroing each page) can cost more than the
// kernel. 2 MiB alignment + MADV_HUGEPAGE cuts the faults 512-fold.
#pragma once

#include <ATen/ATen.h>

#include <sys/mman.h>

#include <cstdlib>

namespace llmkit {

inline at::Tensor empty_huge_page_backed(at::IntArrayRef shape, at::TensorOptions options, int64_t min_bytes) {
  constexpr size_t kHugePage = size_t{2} << 20;
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (nbytes < min_bytes) return at::empty(shape, options);
  const size_t rounded = (static_cast<size_t>(nbytes) + kHugePage - 1) / kHugePage * kHugePage;
  void* data = nullptr;
  if (posix_memalign(&data, kHugePage, rounded) != 0) return at::empty(shape, options);
#ifdef MADV_HUGEPAGE
  madvise(data, rounded, MADV_HUGEPAGE);  // advice only: without THP it is a no-op
#endif
  return at::from_blob(data, shape, [](void* p) { std::free(p); }, options);
}

}  // namespace llmkit
