// Jacobian spectrum of the multi-subspace denoiser for one sample (SPEC section 4).
//
// y = c sum_k w_k U_k P_k, P_k = U_k^T x, w = softmax(phi ||P_k||^2 + beta_k) gives
//   dy/dx = J = Ubar G Ubar^T,  Ubar = [U_1 .. U_K] (n x D),
//   G = c ( blockdiag_k(w_k (I + 2 phi P_k P_k^T)) - 2 phi m m^T ),  m = [w_k P_k]_k   (soft)
//   G = c blockdiag_k(w_k I)                                                         (hard)
// With Ubar = Q R (Q n x r orthonormal, R r x D, r = min(n, D)), J = Q (R G R^T) Q^T, so the
// singular values of J are |eig(M)|, M = R G R^T (r x r), and its right singular vectors are
// Q times the eigenvectors of M. Writing R_k for the d_k columns of R that belong to U_k,
// a_k = R_k P_k and S_k = R_k R_k^T (per instance, precomputed):
//   M = c [ sum_k w_k S_k + 2 phi sum_k w_k d_k d_k^T ],  d_k = a_k - sum_j w_j a_j
//                                                          = sum_{j != k} w_j (a_k - a_j),
// using sum_k w_k a_k a_k^T - b b^T = sum_k w_k (a_k - b)(a_k - b)^T (b = sum_k w_k a_k). This
// form has no cancellation between huge terms: at small noise phi ~ 1e8 while w_k (1 - w_k) ~ 0,
// and the naive 2 phi (w_k - w_k^2) P P^T would lose every digit in float32.
#pragma once

#include "subspace_dae.h"
#include "sym_eig.h"

namespace molrg::kernels {

// Scratch (in elements of T) needed by dae_jacobian_sample.
MOLRG_HD int64_t dae_jacobian_work(int K, int dm, int r, bool vectors) {
  return (int64_t)K * dm + 2 * K + 2 * (int64_t)K * r + (int64_t)r * r * (vectors ? 2 : 1) +
         4 * (int64_t)r;
}

// x [n]; U [K, n, dm]; R [r, D] (row-major); S [K, r, r]; offs[k] = column of U_k's block in R.
// Writes svals [r] (descending) and, when vecs is non-null, vecs [r, r] with column i the unit
// eigenvector of M for svals[i]. order: int scratch [r]. Returns false if the eigensolver failed.
template <typename T>
MOLRG_HD bool dae_jacobian_sample(const T* x, const T* U, const T* R, const T* S, int K, int n,
                                  int dm, int r, int D, const int32_t* dims, const int32_t* offs,
                                  T c, T phi, const T* bias, int mode, int k0, T* svals, T* vecs,
                                  T* work, int32_t* order) {
  T* proj = work;
  T* sq = proj + (int64_t)K * dm;
  T* w = sq + K;
  T* a = w + K;                   // [K, r]
  T* dlt = a + (int64_t)K * r;    // [K, r]
  T* M = dlt + (int64_t)K * r;    // [r, r]
  T* lam = M + (int64_t)r * r;    // [r]
  T* e = lam + r;                 // [r]
  T* tmp = e + r;                 // [r]
  T* key = tmp + r;               // [r]
  T* Vt = vecs ? key + r : nullptr;  // [r, r]

  dae_project(x, U, K, n, dm, dims, proj, sq);
  if (mode == kHard && k0 < 0) k0 = dae_argmax(sq, K);
  dae_weights(sq, bias, phi, K, mode, k0, w);

  const int64_t rr = (int64_t)r * r;
  for (int64_t i = 0; i < rr; ++i) M[i] = T(0);
  for (int k = 0; k < K; ++k) {
    if (w[k] == T(0)) continue;
    const T wk = c * w[k];
    const T* Sk = S + k * rr;
    for (int64_t i = 0; i < rr; ++i) M[i] += wk * Sk[i];
  }
  if (mode == kSoft) {
    for (int k = 0; k < K; ++k) {
      T* ak = a + (int64_t)k * r;
      const T* pk = proj + (int64_t)k * dm;
      const int dk = dims[k], off = offs[k];
      for (int i = 0; i < r; ++i) {
        const T* Ri = R + (int64_t)i * D + off;
        T s = T(0);
        for (int j = 0; j < dk; ++j) s += Ri[j] * pk[j];
        ak[i] = s;
      }
    }
    for (int k = 0; k < K; ++k) {
      if (w[k] == T(0)) continue;
      T* dk = dlt + (int64_t)k * r;
      const T* ak = a + (int64_t)k * r;
      for (int i = 0; i < r; ++i) dk[i] = T(0);
      for (int j = 0; j < K; ++j) {
        if (j == k || w[j] == T(0)) continue;
        const T* aj = a + (int64_t)j * r;
        for (int i = 0; i < r; ++i) dk[i] += w[j] * (ak[i] - aj[i]);
      }
      const T coef = T(2) * c * phi * w[k];
      if (coef == T(0)) continue;
      for (int i = 0; i < r; ++i) {
        const T ci = coef * dk[i];
        if (ci == T(0)) continue;
        T* Mi = M + (int64_t)i * r;
        for (int j = 0; j < r; ++j) Mi[j] += ci * dk[j];
      }
    }
  }
  const bool ok = sym_eig_unsorted(M, r, lam, Vt, e, tmp);
  for (int i = 0; i < r; ++i) key[i] = m_abs(lam[i]);
  argsort_desc(key, r, order);
  for (int i = 0; i < r; ++i) svals[i] = key[order[i]];
  if (vecs) {
    for (int i = 0; i < r; ++i) {
      const T* v = Vt + (int64_t)order[i] * r;
      for (int j = 0; j < r; ++j) vecs[(int64_t)j * r + i] = v[j];
    }
  }
  return ok;
}

}  // namespace molrg::kernels
