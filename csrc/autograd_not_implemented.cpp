// Autograd kernels of the ops that have no derivative of their own: the backward ops
// (subspace_dae_backward, optimal_denoiser_backward) and train_step, which returns a loss and a
// gradient computed in the kernel. Without a kernel at the Autograd key, torch's fallback (in
// its default "warn" mode) let their outputs claim to require grad and a backward through them
// gave None or zero gradients after a UserWarning: double backward through subspace_dae or
// optimal_denoiser (create_graph=True, torch.autograd.functional.hessian) was silently zero, and
// train_step's loss.backward() left U.grad None. torch's autogradNotImplementedFallback instead
// raises "derivative for molrg::<op> is not implemented" when such a backward is attempted (and
// refuses forward-mode tangents on the inputs); calls that record no graph run as before.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY_IMPL(molrg, Autograd, m) {
  m.impl("subspace_dae_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("optimal_denoiser_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("train_step", torch::autograd::autogradNotImplementedFallback());
}
