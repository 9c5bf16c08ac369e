// Per-sample math of the multi-subspace denoiser (SPEC section 3, paper eqs. (9), (16), (17)).
//
// Layout (one problem instance): U is [K, n, dm] row-major (U_k = U + k*n*dm, an n x dm matrix
// whose first dims[k] columns are used), x and y are [n], proj is [K, dm] (P_k = U_k^T x, padded
// entries set to zero), w is [K].
//
//   soft:  logit_k = phi ||P_k||^2 + beta_k,  w = softmax(logit)  (max-subtracted)
//   hard:  w = onehot(k0),  k0 = argmax_k ||P_k||^2 (ties -> lowest k) or given
//   y = c sum_k w_k U_k P_k
//
// Backward for one sample, with g = dL/dy, r_k = U_k^T g, h_k = c <r_k, P_k>:
//   dlogit_k = w_k (h_k - sum_j w_j h_j)           (0 in hard mode; evaluated as dae_dlogit)
//   dP_k     = c w_k r_k + 2 phi dlogit_k P_k
//   dx       = sum_k U_k dP_k
//   dU_k    += x dP_k^T + g (c w_k P_k)^T
//   dbias_k  = dlogit_k,  dphi = sum_k dlogit_k ||P_k||^2,  dc = sum_k w_k <r_k, P_k>
// A component with w_k == 0 contributes nothing to y or to any gradient, so it is skipped.
#pragma once

#include "common.h"

namespace molrg::kernels {

enum DaeMode : int { kSoft = 0, kHard = 1 };

// P_k = U_k^T x for every k; sq[k] = ||P_k||^2.
template <typename T>
MOLRG_HD void dae_project(const T* x, const T* U, int K, int n, int dm, const int32_t* dims,
                          T* proj, T* sq) {
  for (int k = 0; k < K; ++k) {
    T* pk = proj + (int64_t)k * dm;
    for (int j = 0; j < dm; ++j) pk[j] = T(0);
    const int dk = dims[k];
    const T* Uk = U + (int64_t)k * n * dm;
    for (int i = 0; i < n; ++i) {
      const T xi = x[i];
      const T* row = Uk + (int64_t)i * dm;
      for (int j = 0; j < dk; ++j) pk[j] += row[j] * xi;
    }
    T s = T(0);
    for (int j = 0; j < dk; ++j) s += pk[j] * pk[j];
    sq[k] = s;
  }
}

// Index of the largest sq; ties go to the lowest index. Written as selects (max and a
// conditional index, no branch): called once per sample on random components, the branch of
// `if (sq[k] > sq[best]) best = k` was mispredicted about every other sample on the CPU.
template <typename T>
MOLRG_HD int dae_argmax(const T* sq, int K) {
  int best = 0;
  T top = sq[0];
  for (int k = 1; k < K; ++k) {
    const T v = sq[k];
    const bool gt = v > top;
    best = gt ? k : best;
    top = gt ? v : top;
  }
  return best;
}

// Mixture weights from the squared projection norms. bias may be null (all zeros).
template <typename T>
MOLRG_HD void dae_weights(const T* sq, const T* bias, T phi, int K, int mode, int k0, T* w) {
  if (mode == kHard) {
    for (int k = 0; k < K; ++k) w[k] = k == k0 ? T(1) : T(0);
    return;
  }
  T mx = -INFINITY;
  for (int k = 0; k < K; ++k) {
    w[k] = phi * sq[k] + (bias ? bias[k] : T(0));
    mx = m_max(mx, w[k]);
  }
  T total = T(0);
  for (int k = 0; k < K; ++k) {
    w[k] = m_exp(w[k] - mx);
    total += w[k];
  }
  const T inv = T(1) / total;
  for (int k = 0; k < K; ++k) w[k] *= inv;
}

// dlogit_k = w_k (h_k - sum_j w_j h_j) with h_j = c rp_j, rp_j = <r_j, P_j> (rp[j * rs],
// w[j * ws]), evaluated as c w_k sum_j w_j (rp_k - rp_j), which is the same since the weights
// sum to 1. The differences make it exactly 0 for a saturated soft-max (w one-hot), as the hard
// mode's. The first form is not: with FMA contraction c rp_k - hbar becomes fma(c, rp_k, -hbar),
// the rounding error of c rp_k, and dP multiplies dlogit by 2 phi (phi = 1e12 moved a float32 dx
// by 3e5, float64 by 6e-4; at phi = 1e3, 3e-4 in float32). For nearly one-hot weights the
// differences also keep the small terms w_j (rp_k - rp_j) that the first form cancels away.
template <typename T>
MOLRG_HD T dae_dlogit(const T* rp, int rs, const T* w, int ws, int K, int k, T c) {
  const T wk = w[k * ws];
  if (wk == T(0)) return T(0);
  const T rk = rp[k * rs];
  T acc = T(0);
  for (int j = 0; j < K; ++j)
    if (j != k) acc += w[j * ws] * (rk - rp[j * rs]);
  return c * wk * acc;
}

// The backward of one sample in two steps, from r_k = U_k^T g (r [K*dm], padding ignored), proj
// and w. Components with w_k == 0 get rp_k = 0 and dP_k = 0.
// Step 1: rp [K] = <r_k, P_k> (every dlogit_k reads all of them); returns dc = sum_k w_k rp_k.
template <typename T>
MOLRG_HD T dae_r_dot_proj(const T* r, const T* __restrict__ proj, const T* __restrict__ w, int K,
                          int dm, const int32_t* dims, T* __restrict__ rp) {
  T dc = T(0);
  for (int k = 0; k < K; ++k) {
    T acc = T(0);
    if (w[k] != T(0))
      for (int j = 0; j < dims[k]; ++j) acc += r[k * dm + j] * proj[k * dm + j];
    rp[k] = acc;
    dc += w[k] * acc;
  }
  return dc;
}

// Step 2: dP_k = c w_k r_k + 2 phi dlogit_k P_k ([K*dm], padding 0). dP may be r itself (each
// entry of r is read before the same entry of dP is written), which is how both CUDA kernels
// keep them. dlogit [K] and dphi = sum_k dlogit_k ||P_k||^2 are stored where not null (the
// training step needs neither).
template <typename T>
MOLRG_HD void dae_dP_from_rp(const T* r, const T* __restrict__ proj, const T* __restrict__ w,
                             const T* __restrict__ rp, T c, T phi, int K, int dm,
                             const int32_t* dims, int mode, T* dP, T* __restrict__ dlogit,
                             T* dphi) {
  T dphi_acc = T(0);
  for (int k = 0; k < K; ++k) {
    const int dk = dims[k];
    const T dl = mode == kSoft ? dae_dlogit<T>(rp, 1, w, 1, K, k, c) : T(0);
    if (dlogit) dlogit[k] = dl;
    if (dphi) {
      T sq = T(0);
      for (int j = 0; j < dk; ++j) sq += proj[k * dm + j] * proj[k * dm + j];
      dphi_acc += dl * sq;
    }
    const T a = c * w[k];
    const T b = T(2) * phi * dl;
    for (int j = 0; j < dm; ++j)
      dP[k * dm + j] = (j < dk && w[k] != T(0)) ? a * r[k * dm + j] + b * proj[k * dm + j] : T(0);
  }
  if (dphi) *dphi = dphi_acc;
}

// Both steps: dlogit [K], dP [K*dm] (may be r), dc and dphi of one sample; rp [K] is workspace.
template <typename T>
MOLRG_HD void dae_dP_from_r(const T* r, const T* __restrict__ proj, const T* __restrict__ w, T c,
                            T phi, int K, int dm, const int32_t* dims, int mode, T* dP,
                            T* __restrict__ dlogit, T* __restrict__ rp, T* dc, T* dphi) {
  *dc = dae_r_dot_proj<T>(r, proj, w, K, dm, dims, rp);
  dae_dP_from_rp<T>(r, proj, w, rp, c, phi, K, dm, dims, mode, dP, dlogit, dphi);
}

}  // namespace molrg::kernels
