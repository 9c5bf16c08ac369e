// ATen side of the sample-blocked CPU kernels (cpu/dae_blocks.h): pack the bases of every
// instance into panels, and unpack the reduced gradient accumulators into dU.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>

#include "../checks.h"
#include "dae_blocks.h"

namespace molrg {

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

// Gradient accumulators of the blocked kernels for P instances. With enough instances
// (P >= 2 threads) a thread owns whole instances (by_instance: parallel_blocks splits by instance)
// and one accumulator per instance suffices; otherwise one per thread and instance, summed once.
template <typename T>
struct GradAccumulators {
  bool by_instance;
  int64_t P, size;
  at::Tensor acc;
  T* base;
  GradAccumulators(const cpu::PanelGeom& g, int64_t P_, const at::TensorOptions& opt)
      : by_instance(P_ >= 2 * at::get_num_threads()), P(P_), size(g.acc_size()) {
    acc = at::zeros({by_instance ? int64_t(1) : int64_t(at::get_num_threads()), P, size}, opt);
    base = acc.data_ptr<T>();
  }
  // The accumulator of instance p for the calling thread (inside parallel_blocks).
  T* of(int64_t p) const { return base + ((by_instance ? 0 : at::get_thread_num() * P) + p) * size; }
  // dU [P, K, n, dm] from the (reduced) accumulators.
  void unpack(const cpu::PanelGeom& g, const DaeSizes& s, at::Tensor& dU) const {
    unpack_grads<T>(by_instance ? acc.select(0, 0) : acc.sum(0), g, s, dU);
  }
};

// Runs fn(p, scratch) for every instance p < P, each on one thread: the threads take the next
// unclaimed instance from a shared counter instead of a fixed share (on a shared VM one core often
// runs 20-40% slower than the other for a while, and a fixed half would make the other wait).
template <typename T, typename F>
inline void parallel_instances(const cpu::PanelGeom& g, int64_t P, F&& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, P, 1, [&](int64_t, int64_t) {
    cpu::BlockScratch<T> sc(g);
    for (int64_t p = next.fetch_add(1); p < P; p = next.fetch_add(1)) fn(p, sc);
  });
}

// Runs fn(p, start, S, scratch) on every block of kBlock samples [start, start + S) of every
// instance p, split over threads with at::parallel_for: by instance (a thread owns whole instances,
// so it may write their gradients directly) or block by block.
// By instance, the threads claim instances (parallel_instances). Each instance is still done by
// one thread, block after block, so the results do not depend on which thread took it. Block by
// block (few instances), the split stays fixed: there the threads' partial gradients are summed in
// thread order, and a fixed split keeps that sum reproducible.
template <typename T, typename F>
inline void parallel_blocks(const cpu::PanelGeom& g, int64_t P, int64_t B, bool by_instance,
                            F&& fn) {
  const int64_t nb = (B + cpu::kBlock - 1) / cpu::kBlock;
  auto run = [&](int64_t b0, int64_t b1, cpu::BlockScratch<T>& sc) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t p = blk / nb, start = (blk % nb) * cpu::kBlock;
      fn(p, start, (int)std::min<int64_t>(cpu::kBlock, B - start), sc);
    }
  };
  if (by_instance) {
    parallel_instances<T>(g, P, [&](int64_t p, cpu::BlockScratch<T>& sc) {
      run(p * nb, (p + 1) * nb, sc);
    });
  } else {
    at::parallel_for(0, P * nb, 1, [&](int64_t b0, int64_t b1) {
      cpu::BlockScratch<T> sc(g);
      run(b0, b1, sc);
    });
  }
}

}  // namespace molrg
