// CUDA implementation of molrg::dae_jacobian_spectrum and molrg::sym_eig (schemas in
// csrc/jacobian.cpp): the CPU op's validation, S_k = R_k R_k^T with ATen, then the thread-per-
// sample kernels of jacobian.cu on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../jacobian_checks.h"
#include "launchers.h"

namespace molrg {
namespace {

constexpr const char* kSpec = "dae_jacobian_spectrum";
constexpr const char* kEig = "sym_eig";

at::Tensor int32_on(const std::vector<int32_t>& v, const at::Tensor& like) {
  auto host = at::empty({(int64_t)v.size()}, at::TensorOptions().dtype(at::kInt));
  std::copy(v.begin(), v.end(), host.data_ptr<int32_t>());
  return host.to(like.device());
}

std::tuple<at::Tensor, at::Tensor> dae_jacobian_spectrum_cuda(
    const at::Tensor& x, const at::Tensor& U, const at::Tensor& R, const at::Tensor& c,
    const at::Tensor& phi, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& assign, at::IntArrayRef dims, int64_t mode, bool vectors) {
  TORCH_CHECK(x.is_cuda(), kSpec, ": x must be a CUDA tensor, got device ", x.device());
  const JacobianSizes js =
      check_jacobian_inputs(x, U, R, c, phi, bias, assign, dims, mode, kSpec);
  const DaeSizes& s = js.s;
  const int64_t D = js.st.D, r = js.st.r;
  const std::vector<int32_t>& offs = js.st.offs;
  const c10::cuda::CUDAGuard guard(x.device());

  auto svals = at::empty({s.P, s.B, r}, x.options());
  auto vecs = vectors ? at::empty({s.P, s.B, r, r}, x.options()) : at::empty({0}, x.options());
  const int64_t total = s.P * s.B;
  if (total == 0) return {svals, vecs};
  const at::Tensor S = stacked_gram_blocks(R, s, js.st);  // [P, K, r, r]
  const int64_t work_per = cuda::jacobian_work_per((int)s.K, (int)s.dm, (int)r, vectors);
  const int64_t workers = cuda::jacobian_workers(total, work_per, x.element_size(), r);
  auto work = at::empty({workers * work_per}, x.options());
  auto order = at::empty({workers * r}, x.options().dtype(at::kInt));
  auto failed = at::zeros({1}, x.options().dtype(at::kInt));
  auto d_dims = int32_on(s.dims, x);
  auto d_offs = int32_on(offs, x);
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dae_jacobian_spectrum_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_dae_jacobian_spectrum<scalar_t>(
        x.data_ptr<scalar_t>(), U.data_ptr<scalar_t>(), R.data_ptr<scalar_t>(),
        S.data_ptr<scalar_t>(), c.data_ptr<scalar_t>(), phi.data_ptr<scalar_t>(),
        bias ? bias->data_ptr<scalar_t>() : nullptr,
        assign ? assign->data_ptr<int64_t>() : nullptr, d_dims.data_ptr<int32_t>(),
        d_offs.data_ptr<int32_t>(), s.P, s.B, (int)s.n, (int)s.K, (int)s.dm, (int)r, (int)D,
        (int)mode, svals.data_ptr<scalar_t>(), vectors ? vecs.data_ptr<scalar_t>() : nullptr,
        work.data_ptr<scalar_t>(), order.data_ptr<int32_t>(), failed.data_ptr<int>(),
        stream.stream()));
  });
  TORCH_CHECK(failed.item<int>() == 0, kSpec,
              ": the symmetric eigensolver did not converge for some sample (extreme values?)");
  return {svals, vecs};
}

std::tuple<at::Tensor, at::Tensor> sym_eig_cuda(const at::Tensor& A, bool vectors) {
  check_float(A, kEig, "A");
  TORCH_CHECK(A.is_cuda(), kEig, ": A must be a CUDA tensor, got device ", A.device());
  const c10::cuda::CUDAGuard guard(A.device());
  SymEigSetup e = prepare_sym_eig(A, vectors, kEig);
  const int64_t n = e.n, total = e.total;
  auto& evals = e.evals;
  auto& evecs = e.evecs;
  if (!e.Ac.defined()) return {evals, evecs};
  auto& Ac = e.Ac;
  const int64_t work_per = cuda::sym_eig_work_per((int)n, vectors);
  const int64_t workers = cuda::jacobian_workers(total, work_per, A.element_size(), n);
  auto work = at::empty({workers * work_per}, A.options());
  auto order = at::empty({workers * n}, A.options().dtype(at::kInt));
  auto failed = at::zeros({1}, A.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream(A.device().index());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "sym_eig_cuda", [&] {
    C10_CUDA_CHECK(cuda::launch_sym_eig<scalar_t>(
        Ac.data_ptr<scalar_t>(), total, (int)n, evals.data_ptr<scalar_t>(),
        vectors ? evecs.data_ptr<scalar_t>() : nullptr, work.data_ptr<scalar_t>(),
        order.data_ptr<int32_t>(), failed.data_ptr<int>(), stream.stream()));
  });
  TORCH_CHECK(failed.item<int>() == 0, kEig, ": the QR iteration did not converge for some matrix");
  return {evals, evecs};
}

}  // namespace

TORCH_LIBRARY_IMPL(molrg, CUDA, m) {
  m.impl("dae_jacobian_spectrum", &dae_jacobian_spectrum_cuda);
  m.impl("sym_eig", &sym_eig_cuda);
}

}  // namespace molrg
