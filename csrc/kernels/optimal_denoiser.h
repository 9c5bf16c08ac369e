// Torch-free math of the empirical optimal (multi-delta) denoiser of seed 003, eq. (5):
//   D(x) = sum_i softmax_i(l_i) X_i,   l_i = -||x - s X_i||^2 / (2 gamma^2),
// the posterior mean E[x_0 | x_t = x] when x_0 is uniform over the N training points X_i and
// x_t = s x_0 + gamma eps. One query at a time, streaming over the training points in blocks with
// an online (max-subtracted) soft-max, as in flash attention: nothing of size N is kept except a
// block of logits. The distance is computed directly (not as ||x||^2 - 2<x,X_i> + ...), so that at
// tiny gamma the logits do not suffer from cancellation.
#pragma once

#include "common.h"

namespace molrg::kernels {

// Host builds vectorise the reductions with OpenMP SIMD (strict IEEE order would forbid the
// compiler to reassociate a running sum); CUDA builds see plain loops.
#if defined(_OPENMP) && !defined(__CUDACC__)
#define MOLRG_PRAGMA(x) _Pragma(#x)
#define MOLRG_SIMD_SUM(v) MOLRG_PRAGMA(omp simd reduction(+ : v))
#define MOLRG_SIMD _Pragma("omp simd")
#else
#define MOLRG_SIMD_SUM(v)
#define MOLRG_SIMD
#endif

// Logit of training point X_i (row of length n) for query x.
template <typename T>
MOLRG_HD T od_logit(const T* x, const T* Xi, int64_t n, T s, T inv2g2) {
  T d2 = T(0);
  MOLRG_SIMD_SUM(d2)
  for (int64_t k = 0; k < n; ++k) {
    const T diff = x[k] - s * Xi[k];
    d2 += diff * diff;
  }
  return -d2 * inv2g2;
}

// <a, b> over n entries.
template <typename T>
MOLRG_HD T od_dot(const T* a, const T* b, int64_t n) {
  T out = T(0);
  MOLRG_SIMD_SUM(out)
  for (int64_t k = 0; k < n; ++k) out += a[k] * b[k];
  return out;
}

// y += p * v over n entries.
template <typename T>
MOLRG_HD void od_axpy(T* y, T p, const T* v, int64_t n) {
  MOLRG_SIMD
  for (int64_t k = 0; k < n; ++k) y[k] += p * v[k];
}

// Forward for one query. x, y: n; X: N x n row-major; buf: blk scratch logits.
// Writes y = D(x) and lse = log sum_i exp(l_i) (the only statistic the backward needs besides y).
template <typename T>
MOLRG_HD void od_forward_query(const T* x, const T* X, int64_t N, int64_t n, T s, T inv2g2,
                               int64_t blk, T* buf, T* y, T* lse) {
  for (int64_t k = 0; k < n; ++k) y[k] = T(0);
  T m = T(0), l = T(0);
  bool started = false;
  for (int64_t b0 = 0; b0 < N; b0 += blk) {
    const int64_t cnt = (N - b0 < blk) ? (N - b0) : blk;
    T bm = od_logit(x, X + b0 * n, n, s, inv2g2);
    buf[0] = bm;
    for (int64_t j = 1; j < cnt; ++j) {
      buf[j] = od_logit(x, X + (b0 + j) * n, n, s, inv2g2);
      bm = m_max(bm, buf[j]);
    }
    if (!started) {
      m = bm;
      started = true;
    } else if (bm > m) {
      const T scale = m_exp(m - bm);
      l *= scale;
      for (int64_t k = 0; k < n; ++k) y[k] *= scale;
      m = bm;
    }
    for (int64_t j = 0; j < cnt; ++j) {
      const T p = m_exp(buf[j] - m);
      if (p == T(0)) continue;
      l += p;
      od_axpy(y, p, X + (b0 + j) * n, n);
    }
  }
  const T inv = T(1) / l;  // l >= 1: the maximum term contributes exp(0)
  for (int64_t k = 0; k < n; ++k) y[k] *= inv;
  *lse = m + m_log(l);
}

// Backward for one query: dL/dx = (s / gamma^2) sum_i w_i (<g, X_i> - <g, y>) (X_i - y),
// i.e. (s / gamma^2) Cov_w(X) g, with w_i = exp(l_i - lse) recomputed from the saved lse.
// Centring at y (exact since sum_i w_i (<g,X_i> - <g,y>) = 0) avoids cancellation when w is peaked.
template <typename T>
MOLRG_HD void od_backward_query(const T* g, const T* x, const T* X, int64_t N, int64_t n, T s,
                                T inv2g2, const T* y, T lse, T* dx) {
  T gy = T(0);
  for (int64_t k = 0; k < n; ++k) {
    gy += g[k] * y[k];
    dx[k] = T(0);
  }
  for (int64_t i = 0; i < N; ++i) {
    const T* Xi = X + i * n;
    const T w = m_exp(od_logit(x, Xi, n, s, inv2g2) - lse);
    if (w == T(0)) continue;
    const T gx = od_dot(g, Xi, n);
    const T coef = w * (gx - gy);
    MOLRG_SIMD
    for (int64_t k = 0; k < n; ++k) dx[k] += coef * (Xi[k] - y[k]);
  }
  const T f = T(2) * s * inv2g2;  // s / gamma^2
  for (int64_t k = 0; k < n; ++k) dx[k] *= f;
}

}  // namespace molrg::kernels
