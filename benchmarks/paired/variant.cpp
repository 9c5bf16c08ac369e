// One build of the CPU training step (csrc/cpu/dae_blocks.h train_block) for the paired harness:
// compiled twice, from two source trees, with -Dmolrg=<namespace> -DVFUNC=<symbol> so that both
// live in one process (run.sh). -DNEXT_S: the tree's train_block takes the next block's slot count
// (79a0694 and later). Times one step of P instances x M slots; both builds run with the threads
// claiming instances one at a time (as parallel_blocks does since 83b2ce3), so a pair compares
// the kernels only. grad, if given, receives the gradient accumulators [P, 2 K d n8] (n8: n
// rounded up to 8), so that the harness can tell whether two builds give the same numbers. Each
// build's threads run with FTZ/DAZ as the op's do, when its tree has cpu/flush_subnormals.h.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "cpu/dae_blocks.h"
#if __has_include("cpu/flush_subnormals.h")  // FTZ/DAZ as in the op (torch-free from bf468b6)
#include "cpu/flush_subnormals.h"
#define FLUSH_SUBNORMALS const FlushSubnormals ftz;
#else
#define FLUSH_SUBNORMALS
#endif

using namespace molrg::cpu;

extern "C" double VFUNC(const float* X, int P, int N, int n, int K, int d, int M, const float* U,
                        const float* levels, int L, int mode, uint32_t step, float* loss,
                        float* grad) {
  const PanelGeom g = panel_geom<float>(n, K, d);
  std::vector<int32_t> dims(K, d);
  const bool gram = mode == kHard && hard_train_uses_gram(M, dims.data(), K);
  std::vector<float> pan((size_t)P * g.size()), acc((size_t)P * g.acc_size(), 0.f);
  std::atomic<int> claim{0};
  const double t0 = omp_get_wtime();
#pragma omp parallel
  {
    FLUSH_SUBNORMALS
#pragma omp for schedule(static)
    for (int p = 0; p < P; ++p)
      pack_instance<float>(U + (size_t)p * K * n * d, g, dims.data(), pan.data() + p * g.size(),
                           gram);
    BlockScratch<float> sc(g);
#ifdef MOLRG_TRAIN_NEXT_BLOCK
    // As the op's parallel_claim_ahead: the thread claims its next instance at the last block of
    // the current one, and train_block prefetches that instance's first rows.
    auto block_at = [&](int p, int m0) {  // the block of instance p starting at slot m0
      return NextBlock<float>{X + (size_t)p * N * n, (uint32_t)p, (uint32_t)m0,
                              std::min(kBlock, M - m0)};
    };
    for (int p = claim.fetch_add(1); p < P;) {
      int q = P;
      for (int m0 = 0; m0 < M; m0 += kBlock) {
        const int S = std::min(kBlock, M - m0);
        NextBlock<float> nb = block_at(p, m0 + S);
        if (nb.S <= 0) {
          q = claim.fetch_add(1);
          nb = q < P ? block_at(q, 0) : NextBlock<float>{};
        }
        train_block<float>(X + (size_t)p * N * n, N, S, m0, p, {pan.data() + p * g.size(), g},
                           dims.data(), levels, nullptr, L, mode, gram, 7, step, 1.0f / M,
                           loss + (size_t)p * M + m0, acc.data() + p * g.acc_size(), sc, nb);
      }
      p = q;
    }
#else
#pragma omp for schedule(dynamic, 1)
    for (int p = 0; p < P; ++p)
      for (int m0 = 0; m0 < M; m0 += kBlock) {
        const int S = std::min(kBlock, M - m0);
        train_block<float>(X + (size_t)p * N * n, N, S, m0, p, {pan.data() + p * g.size(), g},
                           dims.data(), levels, nullptr, L, mode, gram, 7, step, 1.0f / M,
                           loss + (size_t)p * M + m0, acc.data() + p * g.acc_size(), sc
#ifdef NEXT_S
                           , std::min(kBlock, M - m0 - S)
#endif
        );
      }
#endif
  }
  const double dt = omp_get_wtime() - t0;
  if (grad) std::copy(acc.begin(), acc.end(), grad);  // the raw accumulators, for the comparison
  return dt;
}
