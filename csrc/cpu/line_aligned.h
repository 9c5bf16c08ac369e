// Scratch vectors whose data start on a cache line (host only, torch-free).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace molrg::cpu {

// Allocator of 64-byte aligned storage (a cache line, one AVX-512 vector).
template <typename T>
struct LineAligned {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  LineAligned() = default;
  template <typename U>
  LineAligned(const LineAligned<U>&) {}
  T* allocate(std::size_t count) {
    return static_cast<T*>(::operator new(count * sizeof(T), kAlign));
  }
  void deallocate(T* ptr, std::size_t) { ::operator delete(ptr, kAlign); }
  template <typename U>
  bool operator==(const LineAligned<U>&) const { return true; }
};

// A vector whose data start on a cache line. Scratch that is read and written by whole vectors
// from its start (rows of a block): from std::vector's 16-byte aligned storage most accesses of
// 64 bytes span two lines.
template <typename T>
using line_vector = std::vector<T, LineAligned<T>>;

}  // namespace molrg::cpu
