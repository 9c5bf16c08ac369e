// Schemas of the Jacobian-spectrum ops (SPEC section 4). Implementations: csrc/cpu/jacobian_cpu.cpp.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(molrg, m) {
  // Singular values of J = d subspace_dae / dx for every sample. x [P,B,n]; U [P,K,n,dm];
  // R [P,r,D] is the R factor of Ubar = [U_1[:, :d_1] .. U_K[:, :d_K]] = Q R (r = min(n, D),
  // D = sum dims); c, phi [P,B]; bias [P,B,K] or None; assign [P,B] int64 or None (hard only);
  // mode 0 soft / 1 hard. Returns (svals [P,B,r] descending, vecs [P,B,r,r] with column i the
  // eigenvector of R G R^T for svals[i] -- right singular vectors of J are Q @ vecs -- or an
  // empty [0] tensor when vectors is false). Not differentiable.
  m.def(
      "dae_jacobian_spectrum(Tensor x, Tensor U, Tensor R, Tensor c, Tensor phi, Tensor? bias, "
      "Tensor? assign, int[] dims, int mode, bool vectors) -> (Tensor, Tensor)");
  // Batched dense symmetric eigensolver (Householder + implicit QR) for small matrices:
  // A [..., n, n] (its symmetric part (A + A^T)/2 is used) -> (eigenvalues [..., n] ascending,
  // eigenvectors [..., n, n] as columns, or an empty [0] tensor when vectors is false).
  m.def("sym_eig(Tensor A, bool vectors) -> (Tensor, Tensor)");
}
