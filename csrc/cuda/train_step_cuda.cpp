// CUDA implementation of molrg::train_step (schema in csrc/cpu/train_step_cpu.cpp): the same
// validation as the CPU op, then the warp-per-slot kernel of train_step.cu on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../train_step_checks.h"
#include "launchers.h"

namespace molrg {
namespace {

constexpr const char* kTs = "train_step";

std::tuple<at::Tensor, at::Tensor> train_step_cuda(const at::Tensor& X, const at::Tensor& U,
                                                   const at::Tensor& levels,
                                                   const std::optional<at::Tensor>& level_bias,
                                                   at::IntArrayRef dims, int64_t batch,
                                                   int64_t seed, int64_t step, int64_t mode) {
  check_dae_mode(mode, kTs);
  TORCH_CHECK(X.is_cuda(), kTs, ": X must be a CUDA tensor, got device ", X.device());
  DaeSizes s = check_dae_xU(X, U, dims, kTs, "X", "[P, N, n]");  // s.B is N
  const c10::cuda::CUDAGuard guard(X.device());
  TORCH_CHECK(X.size(1) > 0, kTs, ": X holds no training samples (N = 0)");
  // X is not scanned: checked_train_loss catches a drawn non-finite sample (train_step_checks.h).
  check_finite(U, kTs, "U");
  const int64_t L = check_train_step_levels(X, levels, level_bias, s, batch, seed, step, kTs);
  const int64_t M = batch;
  const int n = (int)s.n, K = (int)s.K, dm = (int)s.dm;
  auto slot_loss = at::empty({s.P, M}, X.options());
  auto grad = at::empty_like(U);
  auto host_dims = at::empty({s.K}, at::TensorOptions().dtype(at::kInt));
  std::copy(s.dims.begin(), s.dims.end(), host_dims.data_ptr<int32_t>());
  auto d_dims = host_dims.to(X.device());
  auto stream = c10::cuda::getCurrentCUDAStream(X.device().index());
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "train_step_cuda", [&] {
    const int64_t need = cuda::train_step_smem_bytes<scalar_t>(n, K, dm);
    TORCH_CHECK(need <= cuda::train_step_max_smem_bytes(), kTs,
                ": the CUDA kernel keeps 2 n + 2 K dmax + 2 K values per slot in shared memory (",
                need, " bytes), more than ", cuda::train_step_max_smem_bytes(),
                "; n = ", n, " is too large for it");
    // dU is summed with atomicAdd (train_step.cu), so its last bits vary run to run: under
    // torch.use_deterministic_algorithms(True) this raises (warn_only=True: warns), as torch's
    // own nondeterministic kernels do; after every check, so a bad argument is named first.
    // The CPU op is deterministic and does not alert.
    at::globalContext().alertNotDeterministic(
        "molrg::train_step (CUDA: grad_U is summed with atomicAdd)");
    C10_CUDA_CHECK(cuda::launch_train_step<scalar_t>(
        X.data_ptr<scalar_t>(), s.B, U.data_ptr<scalar_t>(), levels.data_ptr<scalar_t>(),
        level_bias ? level_bias->data_ptr<scalar_t>() : nullptr, L, d_dims.data_ptr<int32_t>(),
        s.P, M, n, K, dm, (int)mode, (uint64_t)seed, (uint32_t)step,
        slot_loss.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), stream.stream()));
  });
  return {checked_train_loss(slot_loss, kTs), grad};
}

}  // namespace

TORCH_LIBRARY_IMPL(molrg, CUDA, m) { m.impl("train_step", &train_step_cuda); }

}  // namespace molrg
