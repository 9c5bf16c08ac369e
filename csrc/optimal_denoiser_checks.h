// Input validation of molrg::optimal_denoiser and optimal_denoiser_backward shared by the CPU and
// CUDA bindings (every message names the argument). The scan of x, X and lse for NaN/Inf is left to
// each binding (check_finite, checks.h: CPU tensors are scanned in place, without temporaries).
#pragma once

#include <cmath>
#include <limits>

#include "checks.h"

namespace molrg {

struct OdSizes {
  int64_t B, N, n;
};

// The smallest gamma whose logit scale 1 / (2 gamma^2) is finite in double (about 5.27e-155):
// below it every logit is -inf or NaN and y would be NaN.
inline double od_min_gamma() { return std::sqrt(0.5 / std::numeric_limits<double>::max()); }

// x [B, n], X [N, n], s and gamma [B]: dtype, device, shape, contiguity; s, gamma finite and > 0,
// gamma >= od_min_gamma(). Messages name x and X as the public optimal_denoiser does (x_t,
// X_train), which are also the names in the ops' schemas.
inline OdSizes check_od_args(const at::Tensor& x, const at::Tensor& X, const at::Tensor& s,
                             const at::Tensor& gamma, const char* op) {
  check_float(x, op, "x_t");
  // The op's autograd (register_autograd in hidden_gaussian.py) is reverse-mode only and is
  // skipped when nothing requires grad, so a forward-mode tangent would be dropped.
  const auto tangent = [](const at::Tensor& t) { return t._fw_grad(0).defined(); };
  TORCH_CHECK_NOT_IMPLEMENTED(
      !(tangent(x) || tangent(X) || tangent(s) || tangent(gamma)), op,
      ": forward-mode AD (torch.func.jvp, jacfwd, forward_ad dual tensors) is not implemented "
      "by the kernel op; outside torch.compile, molrg_ext.hidden_gaussian.optimal_denoiser "
      "runs a pure-PyTorch composition for it");
  check_like(X, x, op, "X_train", "x_t");
  check_like(s, x, op, "s", "x_t");
  check_like(gamma, x, op, "gamma", "x_t");
  TORCH_CHECK(x.dim() == 2, op, ": x_t must be [B, n], got shape ", x.sizes());
  TORCH_CHECK(X.dim() == 2, op, ": X_train must be [N, n], got shape ", X.sizes());
  OdSizes z{x.size(0), X.size(0), x.size(1)};
  TORCH_CHECK(X.size(1) == z.n, op, ": X_train has n = ", X.size(1), " columns but x_t has n = ",
              z.n);
  TORCH_CHECK(z.N > 0, op, ": X_train must hold at least one training point (N = 0)");
  TORCH_CHECK(z.n > 0, op, ": n must be at least 1");
  check_shape(s, {z.B}, op, "s");
  check_shape(gamma, {z.B}, op, "gamma");
  check_contig(x, op, "x_t");
  check_contig(X, op, "X_train");
  check_contig(s, op, "s");
  check_contig(gamma, op, "gamma");
  if (z.B > 0) {
    TORCH_CHECK((at::isfinite(s) & (s > 0)).all().item<bool>(), op,
                ": s must be finite and > 0");
    TORCH_CHECK((at::isfinite(gamma) & (gamma > 0)).all().item<bool>(), op,
                ": gamma = s * sigma must be finite and > 0");
    const double gmin = gamma.min().item<double>();
    TORCH_CHECK(gmin >= od_min_gamma(), op, ": gamma = s * sigma must be >= ", od_min_gamma(),
                " (1 / (2 gamma^2) overflows float64 below it), got ", gmin);
  }
  return z;
}

// The backward's extra inputs: grad_y and y like x, lse [B] float64 (the forward returns it in
// double for every input type: a float32 lse of |lse| > 2^24 is off by more than 1, which
// distorted or underflowed the recomputed weights exp(l_j - lse)).
inline void check_od_backward_args(const at::Tensor& grad_y, const at::Tensor& y,
                                   const at::Tensor& lse, const at::Tensor& x, const OdSizes& z,
                                   const char* op) {
  check_like(grad_y, x, op, "grad_y", "x_t");
  check_shape(grad_y, x.sizes(), op, "grad_y");
  check_contig(grad_y, op, "grad_y");
  check_like(y, x, op, "y", "x_t");
  check_shape(y, x.sizes(), op, "y");
  check_contig(y, op, "y");
  TORCH_CHECK(lse.scalar_type() == at::kDouble, op, ": lse must be float64 (as optimal_denoiser "
              "returns it), got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == x.device(), op, ": lse is on ", lse.device(), " but x_t is on ",
              x.device());
  check_shape(lse, {z.B}, op, "lse");
  check_contig(lse, op, "lse");
}

// The NaN/Inf scans of x_t and X_train, and the power-of-two shift of x_t, X_train and gamma
// (checks.h: range_shift, od_shift_keeps_range; 0 for data near unit scale, with no pass beyond
// the scans).
inline int od_range_shift(const at::Tensor& x, const at::Tensor& X, const at::Tensor& gamma,
                          const char* op) {
  const double xmax = check_finite_absmax(x, op, "x_t");
  const double Xmax = check_finite_absmax(X, op, "X_train");
  const int emax = dtype_emax(x);
  const int e = range_shift(Xmax, emax / 4, 0);
  if (e == 0 || gamma.numel() == 0) return 0;
  auto [gmin, gmax] = at::aminmax(gamma);
  return od_shift_keeps_range(e, xmax, gmin.item<double>(), gmax.item<double>(), emax) ? e : 0;
}

// The forward's error when a query's log-sum-exp is not finite although gamma is in range: the
// logits overflowed float64 (s or the data so large that s^2 ||X_j||^2 is inf).
constexpr const char* kOdLseNotFinite =
    ": the soft-max of some query is not finite (its logits -||x_t - s X_j||^2 / (2 gamma^2) "
    "overflow float64: s, x_t or X_train too large)";

// The backward's error when the saved lse does not belong to these inputs.
constexpr const char* kOdLseInconsistent =
    ": lse is inconsistent with x (a logit exceeds lse, or every weight exp(l_j - lse) "
    "underflows to 0); pass the lse returned by optimal_denoiser for the same x, X, s, gamma";

}  // namespace molrg
