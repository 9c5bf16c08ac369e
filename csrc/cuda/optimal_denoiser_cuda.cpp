// CUDA implementation of molrg::optimal_denoiser and optimal_denoiser_backward (schemas and the
// contract in csrc/cpu/optimal_denoiser_cpu.cpp): the CPU op's validation
// (optimal_denoiser_checks.h), then the tiled kernels of optimal_denoiser.cu on the current
// stream. The `block` argument is validated but the CUDA tile is fixed (32 training points).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../optimal_denoiser_checks.h"
#include "launchers.h"

namespace molrg {
namespace {

constexpr const char* kFwd = "optimal_denoiser";
constexpr const char* kBwd = "optimal_denoiser_backward";

// After check_x_cuda and the device guard.
OdSizes check_od_cuda(const at::Tensor& x, const at::Tensor& X, const at::Tensor& s,
                      const at::Tensor& gamma, const char* op, int* shift) {
  OdSizes z = check_od_args(x, X, s, gamma, op);
  TORCH_CHECK(z.B <= cuda::optimal_denoiser_max_batch(), op, ": B = ", z.B,
              " queries exceed the CUDA grid (at most ", cuda::optimal_denoiser_max_batch(), ")");
  *shift = od_range_shift(x, X, gamma, op);  // as the CPU op
  return z;
}

// The dispatcher picks this kernel when any input is on CUDA; x decides the device (before the
// guard, which would reject a CPU device without naming the argument).
void check_x_cuda(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x_t must be a CUDA tensor, got device ", x.device());
}

// Partial-state workspace for `splits` training ranges (none needed for one split).
at::Tensor part_workspace(const OdSizes& z, int64_t splits, const at::Tensor& like) {
  return at::empty({splits > 1 ? splits * z.B * z.n : 0}, like.options());
}

std::tuple<at::Tensor, at::Tensor> optimal_denoiser_cuda(const at::Tensor& x, const at::Tensor& X,
                                                         const at::Tensor& s,
                                                         const at::Tensor& gamma, int64_t block) {
  TORCH_CHECK(block >= 1, kFwd, ": block must be >= 1, got ", block);
  check_x_cuda(x, kFwd);
  const c10::cuda::CUDAGuard guard(x.device());
  int shift = 0;
  const OdSizes z = check_od_cuda(x, X, s, gamma, kFwd, &shift);
  if (shift != 0) {  // data far from unit scale (see the CPU op)
    auto [ys, lse] = optimal_denoiser_cuda(times_pow2(x, -shift), times_pow2(X, -shift), s,
                                           times_pow2(gamma, -shift), block);
    return {times_pow2(ys, shift), lse};
  }
  auto y = at::empty_like(x);
  auto lse = at::empty({z.B}, x.options().dtype(at::kDouble));  // double for every input type
  if (z.B == 0) return {y, lse};
  const int64_t splits = cuda::optimal_denoiser_splits(z.B, z.N);
  auto part = part_workspace(z, splits, x);
  auto stats = at::empty({2 * splits * z.B}, x.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "optimal_denoiser_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_optimal_denoiser<scalar_t>(
        x.data_ptr<scalar_t>(), X.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(),
        gamma.data_ptr<scalar_t>(), z.B, z.N, z.n, splits,
        splits > 1 ? part.data_ptr<scalar_t>() : nullptr, stats.data_ptr<double>(),
        y.data_ptr<scalar_t>(), lse.data_ptr<double>(), stream.stream()));
  });
  TORCH_CHECK(at::isfinite(lse).all().item<bool>(), kFwd, kOdLseNotFinite);
  return {y, lse};
}

at::Tensor optimal_denoiser_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                          const at::Tensor& X, const at::Tensor& s,
                                          const at::Tensor& gamma, const at::Tensor& y,
                                          const at::Tensor& lse) {
  check_x_cuda(x, kBwd);
  const c10::cuda::CUDAGuard guard(x.device());
  int shift = 0;
  const OdSizes z = check_od_cuda(x, X, s, gamma, kBwd, &shift);
  check_od_backward_args(grad_y, y, lse, x, z, kBwd);
  check_finite(lse, kBwd, "lse");
  if (shift != 0)  // as the forward did; lse and dx do not change with the scale
    return optimal_denoiser_backward_cuda(grad_y, times_pow2(x, -shift), times_pow2(X, -shift), s,
                                          times_pow2(gamma, -shift), times_pow2(y, -shift), lse);
  auto dx = at::empty_like(x);
  if (z.B == 0) return dx;
  const int64_t splits = cuda::optimal_denoiser_splits(z.B, z.N);
  auto part = part_workspace(z, splits, x);
  auto stats = at::empty({2 * splits * z.B}, x.options().dtype(at::kDouble));
  auto failed = at::zeros({1}, x.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "optimal_denoiser_backward_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_optimal_denoiser_backward<scalar_t>(
        grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), X.data_ptr<scalar_t>(),
        s.data_ptr<scalar_t>(), gamma.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
        lse.data_ptr<double>(), z.B, z.N, z.n, splits,
        splits > 1 ? part.data_ptr<scalar_t>() : nullptr, stats.data_ptr<double>(),
        dx.data_ptr<scalar_t>(), failed.data_ptr<int>(), stream.stream()));
  });
  TORCH_CHECK(failed.item<int>() == 0, kBwd, kOdLseInconsistent);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(molrg, CUDA, m) {
  m.impl("optimal_denoiser", &optimal_denoiser_cuda);
  m.impl("optimal_denoiser_backward", &optimal_denoiser_backward_cuda);
}

}  // namespace molrg
