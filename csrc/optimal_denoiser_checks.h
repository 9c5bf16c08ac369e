// Input validation of molrg::optimal_denoiser and optimal_denoiser_backward shared by the CPU and
// CUDA bindings (every message names the argument). The scan of x, X and lse for NaN/Inf is left to
// each binding (check_finite, checks.h: CPU tensors are scanned in place, without temporaries).
#pragma once

#include "checks.h"

namespace molrg {

struct OdSizes {
  int64_t B, N, n;
};

// x [B, n], X [N, n], s and gamma [B]: dtype, device, shape, contiguity; s, gamma finite and > 0.
inline OdSizes check_od_args(const at::Tensor& x, const at::Tensor& X, const at::Tensor& s,
                             const at::Tensor& gamma, const char* op) {
  check_float(x, op, "x");
  check_like(X, x, op, "X", "x");
  check_like(s, x, op, "s", "x");
  check_like(gamma, x, op, "gamma", "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be [B, n], got shape ", x.sizes());
  TORCH_CHECK(X.dim() == 2, op, ": X must be [N, n], got shape ", X.sizes());
  OdSizes z{x.size(0), X.size(0), x.size(1)};
  TORCH_CHECK(X.size(1) == z.n, op, ": X has n = ", X.size(1), " columns but x has n = ", z.n);
  TORCH_CHECK(z.N > 0, op, ": X must hold at least one training point (N = 0)");
  TORCH_CHECK(z.n > 0, op, ": n must be at least 1");
  check_shape(s, {z.B}, op, "s");
  check_shape(gamma, {z.B}, op, "gamma");
  check_contig(x, op, "x");
  check_contig(X, op, "X");
  check_contig(s, op, "s");
  check_contig(gamma, op, "gamma");
  if (z.B > 0) {
    TORCH_CHECK((at::isfinite(s) & (s > 0)).all().item<bool>(), op,
                ": s must be finite and > 0");
    TORCH_CHECK((at::isfinite(gamma) & (gamma > 0)).all().item<bool>(), op,
                ": gamma must be finite and > 0");
  }
  return z;
}

// The backward's extra inputs: grad_y and y like x, lse [B] float64 (the forward returns it in
// double for every input type: a float32 lse of |lse| > 2^24 is off by more than 1, which
// distorted or underflowed the recomputed weights exp(l_j - lse)).
inline void check_od_backward_args(const at::Tensor& grad_y, const at::Tensor& y,
                                   const at::Tensor& lse, const at::Tensor& x, const OdSizes& z,
                                   const char* op) {
  check_like(grad_y, x, op, "grad_y", "x");
  check_shape(grad_y, x.sizes(), op, "grad_y");
  check_contig(grad_y, op, "grad_y");
  check_like(y, x, op, "y", "x");
  check_shape(y, x.sizes(), op, "y");
  check_contig(y, op, "y");
  TORCH_CHECK(lse.scalar_type() == at::kDouble, op, ": lse must be float64 (as optimal_denoiser "
              "returns it), got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == x.device(), op, ": lse is on ", lse.device(), " but x is on ",
              x.device());
  check_shape(lse, {z.B}, op, "lse");
  check_contig(lse, op, "lse");
}

// The backward's error when the saved lse does not belong to these inputs.
constexpr const char* kOdLseInconsistent =
    ": lse is inconsistent with x (a logit exceeds lse, or every weight exp(l_j - lse) "
    "underflows to 0); pass the lse returned by optimal_denoiser for the same x, X, s, gamma";

}  // namespace molrg
