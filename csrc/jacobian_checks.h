// Shared front halves of the Jacobian bindings (CPU and CUDA): dae_jacobian_spectrum's input
// validation and per-subspace Gram blocks S_k = R_k R_k^T of the stacked-basis factor R, and
// sym_eig's validation, outputs and symmetrised working copy.
#pragma once

#include "checks.h"

namespace molrg {

struct JacobianSizes {
  DaeSizes s;
  StackedSizes st;
};

inline JacobianSizes check_jacobian_inputs(const at::Tensor& x, const at::Tensor& U,
                                           const at::Tensor& R, const at::Tensor& c,
                                           const at::Tensor& phi,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& assign,
                                           at::IntArrayRef dims, int64_t mode, const char* op) {
  check_dae_mode(mode, op);
  DaeSizes s = check_dae_xU(x, U, dims, op);
  check_dae_scales(c, phi, s, x, op);
  check_finite(x, op, "x");
  check_finite(U, op, "U");
  check_finite(c, op, "c");
  check_finite(phi, op, "phi");
  StackedSizes st = check_stacked_R(R, s, x, op);
  if (bias) check_dae_bias(*bias, s, x, op);
  if (assign) check_dae_assign(*assign, mode, s, x, op);
  return {std::move(s), std::move(st)};
}

// S_k = R_k R_k^T per instance: [P, K, r, r], R_k the columns of R that belong to U_k.
inline at::Tensor stacked_gram_blocks(const at::Tensor& R, const DaeSizes& s,
                                      const StackedSizes& st) {
  auto S = at::empty({s.P, s.K, st.r, st.r}, R.options());
  for (int64_t k = 0; k < s.K; ++k) {
    auto Rk = R.narrow(2, st.offs[k], s.dims[k]);
    S.select(1, k).copy_(at::matmul(Rk, Rk.transpose(1, 2)));
  }
  return S;
}

// sym_eig(A [..., n, n], vectors): validated, with its outputs allocated (eigenvalues [..., n],
// eigenvectors [..., n, n] or empty) and Ac, the contiguous symmetric part (A + A^T) / 2 that the
// solver may destroy. total = number of matrices; Ac is undefined when there is nothing to do.
struct SymEigSetup {
  int64_t n = 0, total = 0;
  at::Tensor evals, evecs, Ac;
};

inline SymEigSetup prepare_sym_eig(const at::Tensor& A, bool vectors, const char* op) {
  TORCH_CHECK(A.dim() >= 2, op, ": A must be [..., n, n], got shape ", A.sizes());
  SymEigSetup e;
  e.n = A.size(-1);
  TORCH_CHECK(A.size(-2) == e.n, op, ": A must be square, got shape ", A.sizes());
  TORCH_CHECK(e.n <= 4096, op, ": n = ", e.n, " is too large for this small-matrix solver");
  check_finite(A, op, "A");
  auto shape = A.sizes().slice(0, A.dim() - 2).vec();
  shape.push_back(e.n);
  e.evals = at::empty(shape, A.options());
  shape.push_back(e.n);
  e.evecs = vectors ? at::empty(shape, A.options()) : at::empty({0}, A.options());
  e.total = e.evals.numel() / std::max<int64_t>(e.n, 1);
  if (e.total > 0 && e.n > 0) e.Ac = ((A + A.transpose(-1, -2)) * 0.5).contiguous();
  return e;
}

}  // namespace molrg
