// CUDA implementation of molrg::subspace_dae, subspace_dae_backward and hard_assign: validation
// (same checks and messages as the CPU path, csrc/checks.h), allocation, device guard and the
// current stream; the kernels are the torch-free launchers of launchers.h. Compiled only in CUDA
// builds (CMake globs csrc/cuda/*.cpp when torch has CUDA and nvcc is found).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"
#include "launchers.h"

namespace molrg {
namespace {

constexpr const char* kFwd = "subspace_dae";
constexpr const char* kBwd = "subspace_dae_backward";

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

// The K subspace dimensions as a device int32 tensor for the kernels.
at::Tensor dims_on_device(const DaeSizes& s, const at::Tensor& x) {
  auto host = at::empty({s.K}, at::TensorOptions().dtype(at::kInt));
  std::copy(s.dims.begin(), s.dims.end(), host.data_ptr<int32_t>());
  return host.to(x.device(), /*non_blocking=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> subspace_dae_cuda(
    const at::Tensor& x, const at::Tensor& U, const at::Tensor& c, const at::Tensor& phi,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& assign,
    at::IntArrayRef dims, int64_t mode) {
  check_dae_mode(mode, kFwd);
  check_cuda(x, kFwd, "x");
  DaeSizes s = check_dae_xU(x, U, dims, kFwd);
  check_dae_scales(c, phi, s, x, kFwd);
  const c10::cuda::CUDAGuard guard(x.device());
  check_finite(U, kFwd, "U");  // small; NaN/Inf in x stay in their own samples' outputs
  check_finite(c, kFwd, "c");
  check_finite(phi, kFwd, "phi");
  if (bias) check_dae_bias(*bias, s, x, kFwd);
  if (assign) check_dae_assign(*assign, mode, s, x, kFwd);

  auto y = at::empty_like(x);
  auto proj = at::empty({s.P, s.B, s.K, s.dm}, x.options());
  auto w = at::empty({s.P, s.B, s.K}, x.options());
  if (s.P * s.B == 0) return {y, proj, w};
  auto d_dims = dims_on_device(s, x);
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "subspace_dae_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_subspace_dae_forward<scalar_t>(
        x.data_ptr<scalar_t>(), U.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(),
        phi.data_ptr<scalar_t>(), bias ? bias->data_ptr<scalar_t>() : nullptr,
        assign ? assign->data_ptr<int64_t>() : nullptr, d_dims.data_ptr<int32_t>(), s.P, s.B,
        (int)s.n, (int)s.K, (int)s.dm, (int)mode, y.data_ptr<scalar_t>(),
        proj.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), stream.stream()));
  });
  return {y, proj, w};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> subspace_dae_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& U, const at::Tensor& c,
    const at::Tensor& phi, const at::Tensor& proj, const at::Tensor& w, at::IntArrayRef dims,
    int64_t mode, bool need_dx, bool need_dU) {
  check_dae_mode(mode, kBwd);
  check_cuda(x, kBwd, "x");
  DaeSizes s = check_dae_xU(x, U, dims, kBwd);
  check_dae_scales(c, phi, s, x, kBwd);
  check_like(grad_y, x, kBwd, "grad_y", "x");
  check_shape(grad_y, x.sizes(), kBwd, "grad_y");
  check_contig(grad_y, kBwd, "grad_y");
  check_like(proj, x, kBwd, "proj", "x");
  check_shape(proj, {s.P, s.B, s.K, s.dm}, kBwd, "proj");
  check_contig(proj, kBwd, "proj");
  check_like(w, x, kBwd, "w", "x");
  check_shape(w, {s.P, s.B, s.K}, kBwd, "w");
  check_contig(w, kBwd, "w");
  const c10::cuda::CUDAGuard guard(x.device());

  auto dx = need_dx ? at::empty_like(x) : at::empty({0}, x.options());
  auto dU = need_dU ? at::empty_like(U) : at::empty({0}, x.options());
  auto dc = at::empty({s.P, s.B}, x.options());
  auto dphi = at::empty({s.P, s.B}, x.options());
  auto dbias = at::empty({s.P, s.B, s.K}, x.options());
  const int n = (int)s.n, K = (int)s.K, dm = (int)s.dm;
  auto ws = at::empty({cuda::subspace_dae_backward_workspace(s.P, s.B, n, K, dm, need_dU)},
                      x.options());
  auto d_dims = dims_on_device(s, x);
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "subspace_dae_backward_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_subspace_dae_backward<scalar_t>(
        grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), U.data_ptr<scalar_t>(),
        c.data_ptr<scalar_t>(), phi.data_ptr<scalar_t>(), proj.data_ptr<scalar_t>(),
        w.data_ptr<scalar_t>(), d_dims.data_ptr<int32_t>(), s.P, s.B, n, K, dm, (int)mode,
        need_dx ? dx.data_ptr<scalar_t>() : nullptr, need_dU ? dU.data_ptr<scalar_t>() : nullptr,
        dc.data_ptr<scalar_t>(), dphi.data_ptr<scalar_t>(), dbias.data_ptr<scalar_t>(),
        ws.data_ptr<scalar_t>(), stream.stream()));
  });
  return {dx, dU, dc, dphi, dbias};
}

at::Tensor hard_assign_cuda(const at::Tensor& x, const at::Tensor& U, at::IntArrayRef dims) {
  check_cuda(x, "hard_assign", "x0");
  DaeSizes s = check_dae_xU(x, U, dims, "hard_assign", "x0");
  // An argmax of NaN energies would be a silent label; the scans also give the range shifts
  // (checks.h): far from unit scale, float32 energies overflow or flush to zero and tie at k = 0.
  const auto [xs, us] = assign_shifts(check_finite_absmax(x, "hard_assign", "x0"),
                                       check_finite_absmax(U, "hard_assign", "U"), dtype_emax(x));
  if (xs != 0 || us != 0)  // argmax_k ||U_k^T x|| does not change with either scale
    return hard_assign_cuda(times_pow2(x, -xs), times_pow2(U, -us), dims);
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({s.P, s.B}, x.options().dtype(at::kLong));
  if (s.P * s.B == 0) return out;
  auto d_dims = dims_on_device(s, x);
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "hard_assign_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_hard_assign<scalar_t>(
        x.data_ptr<scalar_t>(), U.data_ptr<scalar_t>(), d_dims.data_ptr<int32_t>(), s.P, s.B,
        (int)s.n, (int)s.K, (int)s.dm, out.data_ptr<int64_t>(), stream.stream()));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(molrg, CUDA, m) {
  m.impl("subspace_dae", &subspace_dae_cuda);
  m.impl("subspace_dae_backward", &subspace_dae_backward_cuda);
  m.impl("hard_assign", &hard_assign_cuda);
}

}  // namespace molrg
