// One batch slot of the fused training step (SPEC sections 1 and 3, Algorithm 1 with loss (6)).
//
// For instance p and slot m: draw (i, l, eps) from the Philox stream (philox.h), form
// x_t = s_l x_i + gamma_l eps, denoise it (hard: component from the CLEAN x_i, eq. (17); soft:
// eq. (9) with the level's c, phi, bias), and return lambda_l ||x_theta - x_i||^2 while adding
// d/dU of (1/M) lambda_l ||x_theta - x_i||^2 into dUt (packed [K, dm, n] layout).
//
// levels is [L, 5] with columns (s, gamma, lambda, c, phi); level_bias is [L, K] or null.
#pragma once

#include "philox.h"
#include "subspace_dae_packed.h"

namespace molrg::kernels {

enum LevelColumn : int { kLvS = 0, kLvGamma = 1, kLvLambda = 2, kLvC = 3, kLvPhi = 4, kLvCols = 5 };

// Scratch per call: xt [n], y [n], proj/r/dP [K*dm] each, sq/w/dlogit [K] each.
template <typename T>
struct TrainScratch {
  T *xt, *y, *proj, *r, *dP, *sq, *w, *dlogit;
};

template <typename T>
MOLRG_HD T train_slot(const T* X, uint32_t N, const T* Ut, int K, int n, int dm,
                      const int32_t* dims, const T* levels, const T* level_bias, uint32_t L,
                      int mode, uint64_t seed, uint32_t step, uint32_t p, uint32_t m, T inv_M,
                      TrainScratch<T> s, T* dUt) {
  const PhiloxSlot slot = philox_slot(seed, step, p, m);
  uint32_t i, l;
  philox_index_level(slot, N, L, &i, &l);
  const T* x0 = X + (int64_t)i * n;
  const T* lv = levels + (int64_t)l * kLvCols;
  const T sc = lv[kLvS], gm = lv[kLvGamma], lam = lv[kLvLambda], c = lv[kLvC], phi = lv[kLvPhi];
  philox_normals<T>(slot, n, s.xt);
  MOLRG_SIMD
  for (int e = 0; e < n; ++e) s.xt[e] = sc * x0[e] + gm * s.xt[e];
  int k0 = -1;
  if (mode == kHard) {
    pk_project(x0, Ut, K, n, dm, dims, s.proj, s.sq);
    k0 = dae_argmax(s.sq, K);
  }
  pk_forward_sample(s.xt, Ut, K, n, dm, dims, c, phi,
                    level_bias ? level_bias + (int64_t)l * K : (const T*)nullptr, mode, k0,
                    s.proj, s.w, s.y, s.sq);
  T err = T(0);
  MOLRG_SIMD_SUM(err)
  for (int e = 0; e < n; ++e) {
    const T d = s.y[e] - x0[e];
    err += d * d;
  }
  const T gscale = T(2) * lam * inv_M;
  MOLRG_SIMD
  for (int e = 0; e < n; ++e) s.y[e] = gscale * (s.y[e] - x0[e]);  // g = dL/dy in place
  T dc, dphi;
  pk_backward_sample(s.y, s.xt, Ut, s.proj, s.w, c, phi, K, n, dm, dims, mode, s.r, s.dP,
                     s.dlogit, (T*)nullptr, &dc, &dphi, dUt);
  return lam * err;
}

}  // namespace molrg::kernels
