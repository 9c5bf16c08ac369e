// Fast per-sample denoiser math on a transposed ("packed") basis layout.
//
// Same math as subspace_dae.h, but the bases are stored as Ut [K, dm, n] (row (k, j) is column j
// of U_k, contiguous over n). Every inner loop then runs over n with unit stride: projections are
// dot products, reconstructions and gradient updates are axpys, all of which vectorise. The
// driver packs U once per call (U.transpose(-1, -2).contiguous()) and keeps the packed panel in
// cache while it streams samples; gradients dUt are accumulated in the same layout and unpacked
// once at the end.
#pragma once

#include "subspace_dae.h"

#if defined(__CUDACC__) || !defined(_OPENMP)
#define MOLRG_SIMD_SUM(var)
#define MOLRG_SIMD
#else
#define MOLRG_PRAGMA(x) _Pragma(#x)
#define MOLRG_SIMD_SUM(var) MOLRG_PRAGMA(omp simd reduction(+ : var))
#define MOLRG_SIMD MOLRG_PRAGMA(omp simd)
#endif

namespace molrg::kernels {

template <typename T>
MOLRG_HD T pk_dot(const T* __restrict__ a, const T* __restrict__ b, int n) {
  T s = T(0);
  MOLRG_SIMD_SUM(s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// P_k = U_k^T x (proj [K, dm], padding zero), sq[k] = ||P_k||^2.
template <typename T>
MOLRG_HD void pk_project(const T* __restrict__ x, const T* __restrict__ Ut, int K, int n, int dm,
                         const int32_t* dims, T* __restrict__ proj, T* __restrict__ sq) {
  for (int k = 0; k < K; ++k) {
    const int dk = dims[k];
    T s = T(0);
    for (int j = 0; j < dm; ++j) {
      T v = T(0);
      if (j < dk) v = pk_dot(Ut + ((int64_t)k * dm + j) * n, x, n);
      proj[k * dm + j] = v;
      s += v * v;
    }
    sq[k] = s;
  }
}

// y = c sum_k w_k U_k P_k.
template <typename T>
MOLRG_HD void pk_reconstruct(const T* __restrict__ Ut, const T* __restrict__ proj,
                             const T* __restrict__ w, T c, int K, int n, int dm,
                             const int32_t* dims, T* __restrict__ y) {
  MOLRG_SIMD
  for (int i = 0; i < n; ++i) y[i] = T(0);
  for (int k = 0; k < K; ++k) {
    if (w[k] == T(0)) continue;
    const T a = c * w[k];
    for (int j = 0; j < dims[k]; ++j) {
      const T coef = a * proj[k * dm + j];
      const T* row = Ut + ((int64_t)k * dm + j) * n;
      MOLRG_SIMD
      for (int i = 0; i < n; ++i) y[i] += coef * row[i];
    }
  }
}

template <typename T>
MOLRG_HD void pk_forward_sample(const T* x, const T* Ut, int K, int n, int dm,
                                const int32_t* dims, T c, T phi, const T* bias, int mode, int k0,
                                T* proj, T* w, T* y, T* sq) {
  pk_project(x, Ut, K, n, dm, dims, proj, sq);
  if (mode == kHard && k0 < 0) k0 = dae_argmax(sq, K);
  dae_weights(sq, bias, phi, K, mode, k0, w);
  pk_reconstruct(Ut, proj, w, c, K, n, dm, dims, y);
}

// From r_k = U_k^T g (r [K*dm], padding ignored), proj and w: dlogit [K], dP [K*dm] (padding 0),
// dc and dphi of one sample. Components with w_k == 0 get dP_k = 0.
template <typename T>
MOLRG_HD void dae_dP_from_r(const T* __restrict__ r, const T* __restrict__ proj,
                            const T* __restrict__ w, T c, T phi, int K, int dm,
                            const int32_t* dims, int mode, T* __restrict__ dP,
                            T* __restrict__ dlogit, T* dc, T* dphi) {
  T hbar = T(0), dc_acc = T(0);
  for (int k = 0; k < K; ++k) {
    T rp = T(0);
    if (w[k] != T(0))
      for (int j = 0; j < dims[k]; ++j) rp += r[k * dm + j] * proj[k * dm + j];
    dlogit[k] = rp;  // <r_k, P_k> until the second pass
    dc_acc += w[k] * rp;
    hbar += w[k] * c * rp;
  }
  *dc = dc_acc;
  T dphi_acc = T(0);
  for (int k = 0; k < K; ++k) {
    const int dk = dims[k];
    T dl = T(0);
    if (mode == kSoft && w[k] != T(0)) dl = w[k] * (c * dlogit[k] - hbar);
    dlogit[k] = dl;
    T sq = T(0);
    for (int j = 0; j < dk; ++j) sq += proj[k * dm + j] * proj[k * dm + j];
    dphi_acc += dl * sq;
    const T a = c * w[k];
    const T b = T(2) * phi * dl;
    for (int j = 0; j < dm; ++j)
      dP[k * dm + j] = (j < dk && w[k] != T(0)) ? a * r[k * dm + j] + b * proj[k * dm + j] : T(0);
  }
  *dphi = dphi_acc;
}

// Backward of one sample: writes dP [K*dm], dlogit [K], dc, dphi, dx (if non-null), and
// accumulates dUt [K, dm, n] (if non-null). r is scratch [K*dm].
template <typename T>
MOLRG_HD void pk_backward_sample(const T* __restrict__ g, const T* __restrict__ x,
                                 const T* __restrict__ Ut, const T* __restrict__ proj,
                                 const T* __restrict__ w, T c, T phi, int K, int n, int dm,
                                 const int32_t* dims, int mode, T* __restrict__ r,
                                 T* __restrict__ dP, T* __restrict__ dlogit, T* __restrict__ dx,
                                 T* dc, T* dphi, T* __restrict__ dUt) {
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < dm; ++j)
      r[k * dm + j] = (j < dims[k] && w[k] != T(0))
                          ? pk_dot(Ut + ((int64_t)k * dm + j) * n, g, n) : T(0);
  dae_dP_from_r(r, proj, w, c, phi, K, dm, dims, mode, dP, dlogit, dc, dphi);
  if (dx) {
    MOLRG_SIMD
    for (int i = 0; i < n; ++i) dx[i] = T(0);
  }
  for (int k = 0; k < K; ++k) {
    if (w[k] == T(0)) continue;
    const T a = c * w[k];
    for (int j = 0; j < dims[k]; ++j) {
      const T* row = Ut + ((int64_t)k * dm + j) * n;
      const T dpj = dP[k * dm + j];
      if (dx) {
        MOLRG_SIMD
        for (int i = 0; i < n; ++i) dx[i] += dpj * row[i];
      }
      if (dUt) {
        const T apj = a * proj[k * dm + j];
        T* drow = dUt + ((int64_t)k * dm + j) * n;
        MOLRG_SIMD
        for (int i = 0; i < n; ++i) drow[i] += dpj * x[i] + apj * g[i];
      }
    }
  }
}

}  // namespace molrg::kernels
