// The molrg operator library: the denoiser's schemas are declared here (the Jacobian, training
// step and optimal-denoiser ops in TORCH_LIBRARY_FRAGMENTs of their own files). Implementations
// are registered per device (csrc/cpu/*.cpp, csrc/cuda/*_cuda.cpp); the denoiser's autograd in
// csrc/subspace_dae_autograd.cpp, the other autograd and the fake kernels from Python.
#include <torch/library.h>

TORCH_LIBRARY(molrg, m) {
  // Multi-subspace denoiser (SPEC section 3). x [P,B,n]; U [P,K,n,dm]; c, phi [P,B];
  // bias [P,B,K] or None; assign [P,B] int64 or None (hard mode only); dims: K ints;
  // mode 0 = soft-max (eq. 9), 1 = hard-max (eq. 16). Returns (y [P,B,n], proj [P,B,K,dm], w [P,B,K]).
  m.def(
      "subspace_dae(Tensor x, Tensor U, Tensor c, Tensor phi, Tensor? bias, Tensor? assign, "
      "int[] dims, int mode) -> (Tensor, Tensor, Tensor)");
  // Backward of subspace_dae from the saved proj and w. Returns (dx, dU, dc, dphi, dbias); dx and
  // dU are empty ([0]) tensors when need_dx / need_dU is false.
  m.def(
      "subspace_dae_backward(Tensor grad_y, Tensor x, Tensor U, Tensor c, Tensor phi, "
      "Tensor proj, Tensor w, int[] dims, int mode, bool need_dx, bool need_dU) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // argmax_k ||U_k^T x|| per sample (ties to the lowest k): x [P,B,n], U [P,K,n,dm] -> [P,B] int64.
  m.def("hard_assign(Tensor x0, Tensor U, int[] dims) -> Tensor");
}
