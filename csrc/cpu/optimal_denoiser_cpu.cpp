// CPU kernels of the empirical optimal (multi-delta) denoiser (seed 003, eq. (5)).
// Schemas are declared here (TORCH_LIBRARY_FRAGMENT); the math is in kernels/optimal_denoiser.h.
// Parallel over queries with at::parallel_for; each query streams over the training set in blocks
// (online soft-max), so no B x N matrix is ever formed. The forward saves only y and the per-query
// log-sum-exp; the backward recomputes the soft-max weights from them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../kernels/optimal_denoiser.h"

TORCH_LIBRARY_FRAGMENT(molrg, m) {
  // x [B, n] queries; X [N, n] training points; s, gamma [B] (x = s x_0 + gamma eps);
  // block: training points per streamed block. Returns (y [B, n], lse [B]).
  m.def("optimal_denoiser(Tensor x, Tensor X, Tensor s, Tensor gamma, int block) -> (Tensor, Tensor)");
  // dL/dx from grad_y and the saved y and lse. Returns dx [B, n].
  m.def(
      "optimal_denoiser_backward(Tensor grad_y, Tensor x, Tensor X, Tensor s, Tensor gamma, "
      "Tensor y, Tensor lse) -> Tensor");
}

namespace molrg {
namespace {

using namespace molrg::kernels;

struct OdSizes {
  int64_t B, N, n;
};

OdSizes check_od(const at::Tensor& x, const at::Tensor& X, const at::Tensor& s,
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
  check_finite(x, op, "x");
  check_finite(X, op, "X");
  if (z.B > 0) {
    TORCH_CHECK((at::isfinite(s) & (s > 0)).all().item<bool>(), op,
                ": s must be finite and > 0");
    TORCH_CHECK((at::isfinite(gamma) & (gamma > 0)).all().item<bool>(), op,
                ": gamma must be finite and > 0");
  }
  return z;
}

int64_t grain_for(const OdSizes& z) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, z.N * z.n));
}

std::tuple<at::Tensor, at::Tensor> optimal_denoiser_cpu(const at::Tensor& x, const at::Tensor& X,
                                                        const at::Tensor& s,
                                                        const at::Tensor& gamma, int64_t block) {
  constexpr const char* op = "optimal_denoiser";
  TORCH_CHECK(block >= 1, op, ": block must be >= 1, got ", block);
  OdSizes z = check_od(x, X, s, gamma, op);
  auto y = at::empty_like(x);
  auto lse = at::empty({z.B}, x.options());
  if (z.B == 0) return {y, lse};
  const int64_t blk = std::min(block, z.N);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "optimal_denoiser_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* Xp = X.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* gp = gamma.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* lp = lse.data_ptr<scalar_t>();
    at::parallel_for(0, z.B, grain_for(z), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> buf(blk);
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t inv2g2 = scalar_t(0.5) / (gp[b] * gp[b]);
        od_forward_query<scalar_t>(xp + b * z.n, Xp, z.N, z.n, sp[b], inv2g2, blk, buf.data(),
                                   yp + b * z.n, lp + b);
      }
    });
  });
  return {y, lse};
}

at::Tensor optimal_denoiser_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& X, const at::Tensor& s,
                                         const at::Tensor& gamma, const at::Tensor& y,
                                         const at::Tensor& lse) {
  constexpr const char* op = "optimal_denoiser_backward";
  OdSizes z = check_od(x, X, s, gamma, op);
  check_like(grad_y, x, op, "grad_y", "x");
  check_shape(grad_y, x.sizes(), op, "grad_y");
  check_contig(grad_y, op, "grad_y");
  check_like(y, x, op, "y", "x");
  check_shape(y, x.sizes(), op, "y");
  check_contig(y, op, "y");
  check_like(lse, x, op, "lse", "x");
  check_shape(lse, {z.B}, op, "lse");
  check_contig(lse, op, "lse");
  auto dx = at::empty_like(x);
  if (z.B == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "optimal_denoiser_backward_cpu", [&] {
    const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* Xp = X.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* gp = gamma.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* lp = lse.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    at::parallel_for(0, z.B, grain_for(z), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t inv2g2 = scalar_t(0.5) / (gp[b] * gp[b]);
        od_backward_query<scalar_t>(gyp + b * z.n, xp + b * z.n, Xp, z.N, z.n, sp[b], inv2g2,
                                    yp + b * z.n, lp[b], dxp + b * z.n);
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(molrg, CPU, m) {
  m.impl("optimal_denoiser", &optimal_denoiser_cpu);
  m.impl("optimal_denoiser_backward", &optimal_denoiser_backward_cpu);
}

}  // namespace molrg
