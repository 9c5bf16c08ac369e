// ATen side of the sample-blocked CPU kernels (cpu/dae_blocks.h): pack the bases of every
// instance into panels, and unpack the reduced gradient accumulators into dU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>

#include "../checks.h"
#include "dae_blocks.h"
#include "flush_subnormals.h"

namespace molrg {

// at::parallel_for(begin, end, grain, f) with each call of f under cpu::FlushSubnormals (FTZ and
// DAZ on the worker thread, restored when f returns).
template <typename F>
inline void parallel_for_flushed(int64_t begin, int64_t end, int64_t grain, F&& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    const cpu::FlushSubnormals ftz;
    f(b, e);
  });
}

// Packed panels of every instance [P, g.size()] (cpu/dae_blocks.h); the Gram panels only if gram.
template <typename T>
inline at::Tensor pack_panels(const at::Tensor& U, const cpu::PanelGeom& g, const DaeSizes& s,
                              bool gram = false) {
  auto pan = at::empty({s.P, g.size()}, U.options());
  const T* up = U.data_ptr<T>();
  T* out = pan.data_ptr<T>();
  at::parallel_for(0, s.P, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      cpu::pack_instance<T>(up + p * s.K * s.n * s.dm, g, s.dims.data(), out + p * g.size(), gram);
  });
  return pan;
}

// dU [P, K, n, dm] from the reduced accumulators [P, g.acc_size()].
template <typename T>
inline void unpack_grads(const at::Tensor& acc, const cpu::PanelGeom& g, const DaeSizes& s,
                  at::Tensor& dU) {
  auto accc = acc.contiguous();
  const T* ap = accc.data_ptr<T>();
  T* out = dU.data_ptr<T>();
  at::parallel_for(0, s.P, 1, [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      cpu::unpack_grad<T>(ap + p * g.acc_size(), g, s.dims.data(), out + p * s.K * s.n * s.dm);
  });
}

// Blocks per chunk when the blocks of few instances are split over the threads
// (parallel_blocks): 16 (1024 samples), and more when an instance would have over 256 chunks.
// Chunks of 4 blocks made the fwd+bwd of (48, 2, 6, 65536) 13-18% slower (paired, two threads):
// the backward 25%, the forward 3-4% (the 256 chunks' accumulators were then summed entry by
// entry, GradAccumulators::unpack). Fewer than 64 blocks (B <= 4032) are cut into 4 chunks of at
// least 4 blocks instead, when a chunk's gradient accumulator is small (n = 48: a few KiB; at
// n = 3072, D = 400 one takes 10 MB), so that a batch of 512-4032 samples is split over the
// threads instead of running on one or two chunks. A function of the block count and the
// geometry only, so the chunks, and the order in which their partial gradients are summed, do
// not depend on the threads.
constexpr int64_t kSmallAccumulator = int64_t(1) << 16;  // entries
inline int64_t chunk_blocks(int64_t nb, const cpu::PanelGeom& g) {
  if (g.acc_size() <= kSmallAccumulator && nb < 64) return std::max<int64_t>(4, nb / 4);
  return std::max<int64_t>(16, (nb + 255) / 256);
}
inline int64_t chunks_per_instance(int64_t B, const cpu::PanelGeom& g) {
  const int64_t nb = (B + cpu::kBlock - 1) / cpu::kBlock, cb = chunk_blocks(nb, g);
  return std::max<int64_t>(1, (nb + cb - 1) / cb);
}

// Gradient accumulators of the blocked kernels for P instances of B samples. With enough
// instances (P >= 2 threads) a thread owns whole instances (by_instance: parallel_blocks splits by
// instance) and one accumulator per instance suffices; otherwise one per chunk of blocks
// (chunks_per_instance per instance), summed in chunk order once at the end.
template <typename T>
struct GradAccumulators {
  bool by_instance;
  int64_t P, size, per_instance;
  at::Tensor acc;
  T* base;
  GradAccumulators(const cpu::PanelGeom& g, int64_t P_, int64_t B, const at::TensorOptions& opt)
      : by_instance(P_ >= 2 * at::get_num_threads()), P(P_), size(g.acc_size()),
        per_instance(by_instance ? 1 : chunks_per_instance(B, g)) {
    acc = at::zeros({P, per_instance, size}, opt);
    base = acc.data_ptr<T>();
  }
  // The accumulator of a slot of parallel_blocks (the instance, or the chunk).
  T* of(int64_t slot) const { return base + slot * size; }
  // dU [P, K, n, dm] from the accumulators, the chunks of an instance summed in chunk order.
  void unpack(const cpu::PanelGeom& g, const DaeSizes& s, at::Tensor& dU) const {
    if (per_instance == 1) return unpack_grads<T>(acc.select(1, 0), g, s, dU);
    auto red = at::empty({P, size}, acc.options());
    T* rp = red.data_ptr<T>();
    const int64_t C = per_instance, sz = size;
    // Chunk by chunk over contiguous runs of entries (vector loads, each chunk's accumulator read
    // once in order), each entry summed in chunk order. Entry by entry, with a stride of a whole
    // accumulator between chunks, the loads missed the caches once there were many chunks: 64
    // chunks of 16 blocks per instance at B = 65536.
    constexpr int64_t kRun = 1024;
    const int64_t runs = (sz + kRun - 1) / kRun;
    at::parallel_for(0, P * runs, 1, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t p = r / runs, j0 = (r % runs) * kRun, len = std::min(kRun, sz - j0);
        const T* a = base + p * C * sz + j0;
        T* out = rp + p * sz + j0;
        std::copy(a, a + len, out);
        for (int64_t c = 1; c < C; ++c) {
          const T* ac = a + c * sz;
          for (int64_t j = 0; j < len; ++j) out[j] += ac[j];
        }
      }
    });
    unpack_grads<T>(red, g, s, dU);
  }
};

// Runs fn(i, scratch, claim_next) for every item i < count (an instance, or a chunk of an
// instance's blocks), each on one thread with that thread's scratch: the threads take the next
// unclaimed item from a shared counter instead of a fixed share (on a shared VM one core often
// runs 20-40% slower than the other for a while, and a fixed half would make the other wait).
// claim_next() claims the item this thread runs after i and returns it (-1: none left; later
// calls return the same), so that i's last block can prefetch its first rows instead of that
// item's first block loading them in a burst (the training step, paired harness on the Xeon VM,
// two threads: hard 0.989, soft 0.985).
template <typename T, typename F>
inline void parallel_claim_ahead(const cpu::PanelGeom& g, int64_t count, F&& fn) {
  std::atomic<int64_t> next{0};
  parallel_for_flushed(0, count, 1, [&](int64_t, int64_t) {
    cpu::BlockScratch<T> sc(g);
    for (int64_t i = next.fetch_add(1); i < count;) {
      int64_t j = -2;  // not claimed yet
      auto claim_next = [&]() -> int64_t {
        if (j == -2) j = next.fetch_add(1);
        return j < count ? j : -1;
      };
      fn(i, sc, claim_next);
      i = j == -2 ? next.fetch_add(1) : j;
    }
  });
}

// The same for an fn(i, scratch) that claims nothing ahead.
template <typename T, typename F>
inline void parallel_claim(const cpu::PanelGeom& g, int64_t count, F&& fn) {
  parallel_claim_ahead<T>(g, count,
                          [&](int64_t i, cpu::BlockScratch<T>& sc, auto&&) { fn(i, sc); });
}

// Runs fn(p, start, S, scratch, slot) on every block of kBlock samples [start, start + S) of
// every instance p, split over threads: by instance (a thread owns whole instances, so it may
// write their gradients directly; slot = p) or by chunks of chunk_blocks consecutive blocks of one
// instance (slot = the chunk's index, p * chunks_per_instance(B, g) + its rank in the instance).
// Either way the threads claim the next unclaimed instance or chunk from a shared counter: on a
// shared VM one core often runs 20-40% slower than the other for a while, and a fixed share
// would make the other wait. An instance or a chunk is done by one thread, block after block,
// and the chunks' partial gradients are summed in chunk order (GradAccumulators), so either split
// gives the same results whatever the thread count. The two splits sum an instance of more than
// one chunk (B > 256 samples at n = 48, chunk_blocks) in different orders, so a P between the
// thread counts of two runs (by instance in one, by chunks in the other) can differ in the last
// bits between them.
template <typename T, typename F>
inline void parallel_blocks(const cpu::PanelGeom& g, int64_t P, int64_t B, bool by_instance,
                            F&& fn) {
  const int64_t nb = (B + cpu::kBlock - 1) / cpu::kBlock;
  auto run = [&](int64_t p, int64_t b0, int64_t b1, cpu::BlockScratch<T>& sc, int64_t slot) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t start = blk * cpu::kBlock;
      fn(p, start, (int)std::min<int64_t>(cpu::kBlock, B - start), sc, slot);
    }
  };
  if (by_instance) {
    parallel_claim<T>(g, P, [&](int64_t p, cpu::BlockScratch<T>& sc) { run(p, 0, nb, sc, p); });
    return;
  }
  const int64_t cb = chunk_blocks(nb, g), C = chunks_per_instance(B, g);
  parallel_claim<T>(g, P * C, [&](int64_t ch, cpu::BlockScratch<T>& sc) {
    const int64_t p = ch / C, b0 = (ch % C) * cb;
    run(p, b0, std::min(nb, b0 + cb), sc, ch);
  });
}

}  // namespace molrg
