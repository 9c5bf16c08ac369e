// Input validation of molrg::train_step and philox_draws shared by the CPU and CUDA bindings.
#pragma once

#include "checks.h"
#include "kernels/train_step.h"

namespace molrg {

constexpr int64_t kU32 = int64_t(1) << 32;

// The Philox counters hold (seed, step, p, m) in 32-bit words.
inline void check_rng_args(int64_t seed, int64_t step, int64_t P, int64_t M, int64_t N,
                           int64_t L, const char* op) {
  TORCH_CHECK(seed >= 0, op, ": seed must be >= 0, got ", seed);
  TORCH_CHECK(step >= 0 && step < kU32, op, ": step must be in [0, 2^32), got ", step);
  TORCH_CHECK(P >= 0 && P < kU32, op, ": P must be in [0, 2^32), got ", P);
  TORCH_CHECK(M >= 1 && M < kU32, op, ": batch must be in [1, 2^32), got ", M);
  TORCH_CHECK(N >= 1 && N < kU32, op, ": the training set must hold 1 .. 2^32-1 samples, got N = ",
              N);
  TORCH_CHECK(L >= 1 && L < kU32, op, ": the level table must have 1 .. 2^32-1 rows, got L = ",
              L);
}

// train_step's level table [L, 5] (s, gamma, lambda, c, phi), optional level_bias [L, K], and
// the random-stream arguments. Returns L.
inline int64_t check_train_step_levels(const at::Tensor& X, const at::Tensor& levels,
                                       const std::optional<at::Tensor>& level_bias,
                                       const DaeSizes& s, int64_t batch, int64_t seed,
                                       int64_t step, const char* op) {
  using kernels::kLvCols;
  using kernels::kLvLambda;
  check_like(levels, X, op, "levels", "X");
  TORCH_CHECK(levels.dim() == 2 && levels.size(1) == kLvCols, op,
              ": levels must be [L, 5] (s, gamma, lambda, c, phi), got shape ", levels.sizes());
  check_contig(levels, op, "levels");
  const int64_t L = levels.size(0);
  check_rng_args(seed, step, s.P, batch, s.B, L, op);
  check_finite(levels, op, "levels");
  bool lam_ok = true;
  if (levels.is_cpu()) {  // a few hundred values: a loop, not three ATen ops
    AT_DISPATCH_FLOATING_TYPES(levels.scalar_type(), "check_train_step_levels", [&] {
      const scalar_t* lv = levels.const_data_ptr<scalar_t>();
      for (int64_t l = 0; l < L; ++l) lam_ok &= lv[l * kLvCols + kLvLambda] >= 0;
    });
  } else {
    lam_ok = (levels.select(1, kLvLambda) >= 0).all().item<bool>();
  }
  TORCH_CHECK(lam_ok, op, ": levels lambda column must be >= 0");
  if (level_bias) {
    check_like(*level_bias, X, op, "level_bias", "X");
    check_shape(*level_bias, {L, s.K}, op, "level_bias");
    check_contig(*level_bias, op, "level_bias");
    check_logit_bias_values(*level_bias, op, "level_bias", "level");
  }
  return L;
}

// The training set X is large and constant: instead of scanning it every step, the step checks
// its mean loss per instance, which is non-finite exactly when a drawn sample is (or the step
// overflowed).
inline void check_train_loss_finite(bool finite, const char* op) {
  TORCH_CHECK(finite, op,
              ": the loss is not finite: X contains NaN or Inf values in the drawn samples (or "
              "the step overflowed)");
}

// The mean loss per instance [P] of the slot losses [P, M], checked. Returns the loss.
inline at::Tensor checked_train_loss(const at::Tensor& slot_loss, const char* op) {
  auto loss = slot_loss.mean(1);
  check_train_loss_finite(at::isfinite(loss).all().item<bool>(), op);
  return loss;
}

}  // namespace molrg
