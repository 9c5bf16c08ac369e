// Transparent huge pages for large fresh outputs (host only, torch-free).
//
// glibc serves allocations above its mmap threshold (at most 32 MiB once it has adapted) from
// fresh mappings, so a large output such as the denoiser's y or dx at n = 3072, B = 4096 (50 MB)
// is faulted in 4 KiB page by page on every call: in a GEMM writing such an output that took
// 12 of 51 ms (2 threads, Xeon VM). Where the kernel's transparent huge pages are in `madvise`
// mode (the default of many distributions), asking for them before the first touch makes the
// faults 2 MiB ones: the same GEMM took 43 ms. Values are unchanged; where huge pages are off,
// already faulted in or not Linux, the call does nothing.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace molrg::cpu {

// Outputs smaller than this are left alone (they are usually reused heap memory anyway).
constexpr std::size_t kHugePageMinBytes = std::size_t(8) << 20;

// madvise(MADV_HUGEPAGE) on the 2 MiB-aligned interior of [p, p + bytes).
inline void advise_huge_pages(void* p, std::size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p == nullptr || bytes < kHugePageMinBytes) return;
  constexpr std::uintptr_t kHuge = std::uintptr_t(2) << 20;
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t lo = (a + kHuge - 1) & ~(kHuge - 1);
  const std::uintptr_t hi = (a + bytes) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

}  // namespace molrg::cpu
