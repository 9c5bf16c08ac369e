// Fused training step (SPEC section 3, last paragraph) and its random-number generator, CPU.
//
//   molrg::train_step(X [P,N,n], U [P,K,n,dm], levels [L,5], level_bias [L,K]?, dims, batch,
//                     seed, step, mode) -> (loss [P], grad_U [P,K,n,dm])
//   molrg::philox_draws(seed, step, P, batch, N, L, n, double) -> (idx [P,M] int64,
//                     level [P,M] int64, eps [P,M,n])
// The math is in cpu/dae_blocks.h (train_block); draws come from kernels/philox.h keyed by
// (seed, step) with counters (block, m, p, step), so no [P, M, n] noise tensor is written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../train_step_checks.h"
#include "dae_panels_at.h"

namespace molrg {
namespace {

using namespace molrg::kernels;

constexpr const char* kTs = "train_step";
constexpr const char* kDraws = "philox_draws";
std::tuple<at::Tensor, at::Tensor> train_step_cpu(const at::Tensor& X, const at::Tensor& U,
                                                  const at::Tensor& levels,
                                                  const std::optional<at::Tensor>& level_bias,
                                                  at::IntArrayRef dims, int64_t batch,
                                                  int64_t seed, int64_t step, int64_t mode) {
  check_dae_mode(mode, kTs);
  DaeSizes s = check_dae_xU(X, U, dims, kTs, "X", "[P, N, n]");  // s.B is N
  TORCH_CHECK(X.size(1) > 0, kTs, ": X holds no training samples (N = 0)");
  // X is not scanned: the loss check catches a drawn non-finite sample (train_step_checks.h).
  check_finite(U, kTs, "U");
  const int64_t L = check_train_step_levels(X, levels, level_bias, s, batch, seed, step, kTs);
  const int64_t P = s.P, M = batch;
  auto loss = at::empty({P}, X.options());
  auto grad = at::empty_like(U);
  // The loss of instance p is the mean of its M slot losses: each block sums its own (in double,
  // slot order) into block_sum, and the block sums are added in block order below, so the result
  // does not depend on the threads.
  const int64_t nb = (M + cpu::kBlock - 1) / cpu::kBlock;
  std::vector<double> block_sum(P * nb);
  bool finite = true;

  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "train_step_cpu", [&] {
    const cpu::PanelGeom g = cpu::panel_geom<scalar_t>((int)s.n, (int)s.K, (int)s.dm);
    const bool gram = mode == kHard && cpu::hard_train_uses_gram(M, s.dims.data(), (int)s.K);
    const scalar_t* Up = U.data_ptr<scalar_t>();
    const scalar_t* Xp = X.data_ptr<scalar_t>();
    const scalar_t* lvp = levels.data_ptr<scalar_t>();
    const scalar_t* lbp = level_bias ? level_bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t inv_M = scalar_t(1) / scalar_t(M);
    const int64_t N = s.B, Usize = s.K * s.n * s.dm;
    // Slots m0 .. m0 + S - 1 of instance p against its panels pan, gradient into acc; next: the
    // block this thread runs after it.
    auto block = [&](int64_t p, int64_t m0, int S, const scalar_t* pan, scalar_t* acc,
                     cpu::BlockScratch<scalar_t>& sc, const cpu::NextBlock<scalar_t>& next) {
      scalar_t slot_loss[cpu::kBlock];
      cpu::train_block<scalar_t>(Xp + p * N * s.n, (uint32_t)N, S, (uint32_t)m0, (uint32_t)p,
                                 {pan, g}, s.dims.data(), lvp, lbp, (uint32_t)L, (int)mode, gram,
                                 (uint64_t)seed, (uint32_t)step, inv_M, slot_loss, acc, sc, next);
      double sum = 0;
      for (int t = 0; t < S; ++t) sum += (double)slot_loss[t];
      block_sum[p * nb + m0 / cpu::kBlock] = sum;
    };
    // The block of instance p that starts at slot m0 (none when m0 = M).
    auto block_at = [&](int64_t p, int64_t m0) {
      return cpu::NextBlock<scalar_t>{Xp + p * N * s.n, (uint32_t)p, (uint32_t)m0,
                                      (int)std::min<int64_t>(cpu::kBlock, M - m0)};
    };
    if (P >= 2 * at::get_num_threads()) {
      // Enough instances for every thread: the thread that claims an instance packs its panels,
      // runs its blocks and writes its gradient, all in its own buffers (which stay in cache),
      // in one parallel region. Its last block claims the thread's next instance and prefetches
      // that instance's first rows.
      parallel_claim_ahead<scalar_t>(g, P, [&](int64_t p, cpu::BlockScratch<scalar_t>& sc,
                                               auto&& claim_next) {
        sc.pan.resize(g.size());
        sc.acc.assign(g.acc_size(), scalar_t(0));
        cpu::pack_instance<scalar_t>(Up + p * Usize, g, s.dims.data(), sc.pan.data(), gram);
        for (int64_t m0 = 0; m0 < M; m0 += cpu::kBlock) {
          const int S = (int)std::min<int64_t>(cpu::kBlock, M - m0);
          cpu::NextBlock<scalar_t> next = block_at(p, m0 + S);
          if (next.S <= 0) {
            const int64_t q = claim_next();
            if (q >= 0) next = block_at(q, 0);
          }
          block(p, m0, S, sc.pan.data(), sc.acc.data(), sc, next);
        }
        cpu::unpack_grad<scalar_t>(sc.acc.data(), g, s.dims.data(), gp + p * Usize);
      });
    } else {  // few instances: their blocks are split over the threads
      auto pan = pack_panels<scalar_t>(U, g, s, gram);
      const GradAccumulators<scalar_t> acc(g, P, M, X.options());
      const scalar_t* panp = pan.data_ptr<scalar_t>();
      parallel_blocks<scalar_t>(g, P, M, acc.by_instance, [&](int64_t p, int64_t m0, int S,
                                                              auto& sc, int64_t slot) {
        block(p, m0, S, panp + p * g.size(), acc.of(slot), sc, block_at(p, m0 + S));
      });
      acc.unpack(g, s, grad);
    }
    scalar_t* lossp = loss.data_ptr<scalar_t>();
    for (int64_t p = 0; p < P; ++p) {
      double sum = 0;
      for (int64_t b = 0; b < nb; ++b) sum += block_sum[p * nb + b];
      lossp[p] = (scalar_t)(sum / (double)M);
      finite &= std::isfinite(lossp[p]);
    }
  });
  check_train_loss_finite(finite, kTs);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> philox_draws_cpu(int64_t seed, int64_t step,
                                                                int64_t P, int64_t batch,
                                                                int64_t N, int64_t L, int64_t n,
                                                                bool float64) {
  check_rng_args(seed, step, P, batch, N, L, kDraws);
  TORCH_CHECK(n >= 0, kDraws, ": n must be >= 0, got ", n);
  const int64_t M = batch;
  auto lopt = at::TensorOptions().dtype(at::kLong);
  auto idx = at::empty({P, M}, lopt);
  auto lev = at::empty({P, M}, lopt);
  auto eps = at::empty({P, M, n}, at::TensorOptions().dtype(float64 ? at::kDouble : at::kFloat));
  int64_t* ip = idx.data_ptr<int64_t>();
  int64_t* lp = lev.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(eps.scalar_type(), "philox_draws_cpu", [&] {
    scalar_t* ep = eps.data_ptr<scalar_t>();
    // Slot by slot in runs of consecutive slots of one instance, with the lane-parallel
    // generator the training step uses (bit-identical draws).
    const int64_t nb = (M + cpu::kBlock - 1) / cpu::kBlock;
    at::parallel_for(0, P * nb, 1, [&](int64_t b0, int64_t b1) {
      std::vector<uint32_t> iv(cpu::kBlock), lv(cpu::kBlock);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t p = blk / nb, m0 = (blk % nb) * cpu::kBlock;
        const int S = (int)std::min<int64_t>(cpu::kBlock, M - m0);
        cpu::philox_index_level_slots((uint64_t)seed, (uint32_t)step, (uint32_t)p, (uint32_t)m0,
                                      S, (uint32_t)N, (uint32_t)L, iv.data(), lv.data());
        for (int t = 0; t < S; ++t) {
          ip[p * M + m0 + t] = iv[t];
          lp[p * M + m0 + t] = lv[t];
        }
        cpu::philox_normals_slots<scalar_t>((uint64_t)seed, (uint32_t)step, (uint32_t)p,
                                            (uint32_t)m0, S, (int)n, ep + (p * M + m0) * n);
      }
    });
  });
  return {idx, lev, eps};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(molrg, m) {
  // Fused training step of the subspace denoiser (loss (6), Algorithm 1). X [P,N,n] training
  // sets; U [P,K,n,dm]; levels [L,5] = (s, gamma, lambda, c, phi) per noise level; level_bias
  // [L,K] or None; mode 0 soft / 1 hard (assignment from the clean sample, eq. (17)).
  // Returns (loss [P], grad_U [P,K,n,dm]): loss_p = mean_m lambda ||x_theta(x_t) - x_i||^2.
  m.def(
      "train_step(Tensor X, Tensor U, Tensor levels, Tensor? level_bias, int[] dims, int batch, "
      "int seed, int step, int mode) -> (Tensor, Tensor)");
  // The random numbers train_step draws: (idx [P,M] int64, level [P,M] int64, eps [P,M,n]).
  // No tensor argument, so no backend key: the kernel is CompositeExplicitAutograd (always the
  // CPU tensors it makes), which leaves room for the fake kernel (molrg_ext/train_step.py) that
  // opcheck and torch.compile need; a kernel given to def would be CompositeImplicitAutograd and
  // run on fake tensors.
  m.def("philox_draws(int seed, int step, int P, int batch, int N, int L, int n, bool float64) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(molrg, CPU, m) { m.impl("train_step", &train_step_cpu); }

TORCH_LIBRARY_IMPL(molrg, CompositeExplicitAutograd, m) {
  m.impl("philox_draws", &philox_draws_cpu);
}

}  // namespace molrg
