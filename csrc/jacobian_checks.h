// Shared front half of the dae_jacobian_spectrum bindings (CPU and CUDA): input validation and
// the per-subspace Gram blocks S_k = R_k R_k^T of the stacked-basis factor R.
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
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (soft) or 1 (hard), got ", mode);
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

}  // namespace molrg
