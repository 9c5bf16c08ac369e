// Software prefetches spread over a stretch of compute (host only, torch-free).
#pragma once

#include <algorithm>
#include <cstdint>

namespace molrg::cpu {

// Software prefetches into L2 (prefetcht2), a few per call of next(): the caller spreads them over
// a long compute-bound stretch, so that they never wait for a free miss buffer, which a burst of
// them does: a burst of a block's 192-384 lines at its start cost the blocked denoiser 3-6% of its
// time on the Xeon VM (paired, 2 threads), more than it saved there. The lines are those of up to
// two contiguous byte ranges (the denoiser's next block of rows of each of two inputs, not listed:
// a list cost it more than its prefetches) or of a list (the training step's next block of
// scattered rows). Counts its next() calls, so that a caller running blocks of one shape can
// spread the next block's lines over as many calls as the last block made.
struct RangePrefetch {
  const char* at[2] = {nullptr, nullptr};
  const char* end[2] = {nullptr, nullptr};
  const char* const* list = nullptr;  // list mode: the lines left start here
  int64_t count = 0;  // lines left
  int per_call = 0, calls = 0;
  // Adds [p, p + bytes), from the line of its first byte to that of its last one (at most two
  // ranges).
  void add(const void* p, int64_t bytes) {
    if (bytes <= 0) return;
    const int r = at[0] == end[0] ? 0 : 1;
    const uintptr_t first = (uintptr_t)p & ~(uintptr_t)63, last = (uintptr_t)p + bytes - 1;
    at[r] = (const char*)first;
    end[r] = (const char*)((last | 63) + 1);
    count += (int64_t)(end[r] - at[r]) / 64;
  }
  // List mode: the `c` lines at l (instead of ranges).
  void add_list(const char* const* l, int64_t c) {
    list = l;
    count = c;
  }
  void spread(int n_calls) {
    per_call = (int)(n_calls > 0 ? (count + n_calls - 1) / n_calls : count);
  }
  void next() {
    ++calls;
    issue(per_call);
  }
  void finish() { issue(count); }
  void issue(int64_t k) {  // into L2: the lines are read a block later
    count -= k = std::min(k, count);
    if (list) {
      for (; k > 0; --k) __builtin_prefetch(*list++, 0, 1);
      return;
    }
    for (int r = 0; r < 2 && k > 0; ++r)
      for (; k > 0 && at[r] != end[r]; --k, at[r] += 64) __builtin_prefetch(at[r], 0, 1);
  }
};

}  // namespace molrg::cpu
