// Fused training step (SPEC section 3, last paragraph) and its random-number generator, CPU.
//
//   molrg::train_step(X [P,N,n], U [P,K,n,dm], levels [L,5], level_bias [L,K]?, dims, batch,
//                     seed, step, mode) -> (loss [P], grad_U [P,K,n,dm])
//   molrg::philox_draws(seed, step, P, batch, N, L, n, double) -> (idx [P,M] int64,
//                     level [P,M] int64, eps [P,M,n])
// The per-slot math is in kernels/train_step.h; draws come from kernels/philox.h keyed by
// (seed, step) with counters (block, m, p, step), so no [P, M, n] noise tensor is written.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../train_step_checks.h"

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
  TORCH_CHECK(mode == kSoft || mode == kHard, kTs, ": mode must be 0 (soft) or 1 (hard), got ",
              mode);
  DaeSizes s = check_dae_xU(X, U, dims, kTs);  // s.B is N, the training-set size
  TORCH_CHECK(X.size(1) > 0, kTs, ": X holds no training samples (N = 0)");
  // X is the (large, constant) training set: rather than scanning all of it every step, the
  // step checks its loss below, which is non-finite exactly when a drawn sample is.
  check_finite(U, kTs, "U");
  const int64_t L = check_train_step_levels(X, levels, level_bias, s, batch, seed, step, kTs);
  const int64_t P = s.P, M = batch, K = s.K, n = s.n, dm = s.dm;
  auto Ut = U.transpose(2, 3).contiguous();  // packed [P, K, dm, n]
  auto slot_loss = at::empty({P, M}, X.options());
  const int64_t usize = K * dm * n;
  const int64_t nthreads = at::get_num_threads();
  // Enough instances: one thread owns whole instances and writes their gradient directly.
  // Otherwise split the (p, m) slots and keep one packed accumulator per thread.
  const bool by_instance = P >= 2 * nthreads;
  auto dUt = at::zeros({by_instance ? int64_t(1) : nthreads, P, K, dm, n}, X.options());

  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "train_step_cpu", [&] {
    const scalar_t* Xp = X.data_ptr<scalar_t>();
    const scalar_t* Utp = Ut.data_ptr<scalar_t>();
    const scalar_t* lvp = levels.data_ptr<scalar_t>();
    const scalar_t* lbp = level_bias ? level_bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* lossp = slot_loss.data_ptr<scalar_t>();
    scalar_t* accp = dUt.data_ptr<scalar_t>();
    const int32_t* dp = s.dims.data();
    const scalar_t inv_M = scalar_t(1) / scalar_t(M);
    const int64_t N = s.B;
    auto run_slots = [&](int64_t begin, int64_t end, scalar_t* acc_base) {
      std::vector<scalar_t> buf(2 * n + 3 * K * dm + 3 * K);
      TrainScratch<scalar_t> sc;
      sc.xt = buf.data();
      sc.y = sc.xt + n;
      sc.proj = sc.y + n;
      sc.r = sc.proj + K * dm;
      sc.dP = sc.r + K * dm;
      sc.sq = sc.dP + K * dm;
      sc.w = sc.sq + K;
      sc.dlogit = sc.w + K;
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t p = idx / M, m = idx % M;
        lossp[idx] = train_slot<scalar_t>(
            Xp + p * N * n, (uint32_t)N, Utp + p * usize, (int)K, (int)n, (int)dm, dp, lvp, lbp,
            (uint32_t)L, (int)mode, (uint64_t)seed, (uint32_t)step, (uint32_t)p, (uint32_t)m,
            inv_M, sc, acc_base + p * usize);
      }
    };
    if (by_instance) {
      at::parallel_for(0, P, 1, [&](int64_t pb, int64_t pe) {
        run_slots(pb * M, pe * M, accp);
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, n * K * dm));
      at::parallel_for(0, P * M, grain, [&](int64_t b, int64_t e) {
        run_slots(b, e, accp + at::get_thread_num() * P * usize);
      });
    }
  });
  auto loss = slot_loss.mean(1);
  TORCH_CHECK(at::isfinite(loss).all().item<bool>(), kTs,
              ": the loss is not finite: X contains NaN or Inf values in the drawn samples (or "
              "the step overflowed)");
  auto grad = (by_instance ? dUt.select(0, 0) : dUt.sum(0)).transpose(2, 3).contiguous();
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
    at::parallel_for(0, P * M, 256, [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        const PhiloxSlot sl =
            philox_slot((uint64_t)seed, (uint32_t)step, (uint32_t)(k / M), (uint32_t)(k % M));
        uint32_t i, l;
        philox_index_level(sl, (uint32_t)N, (uint32_t)L, &i, &l);
        ip[k] = i;
        lp[k] = l;
        philox_normals<scalar_t>(sl, (int)n, ep + k * n);
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
  m.def("philox_draws(int seed, int step, int P, int batch, int N, int L, int n, bool float64) "
        "-> (Tensor, Tensor, Tensor)",
        &philox_draws_cpu);
}

TORCH_LIBRARY_IMPL(molrg, CPU, m) { m.impl("train_step", &train_step_cpu); }

}  // namespace molrg
