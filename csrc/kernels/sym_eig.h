// Batched small dense symmetric eigensolver (torch-free, MOLRG_HD, so CPU and CUDA share it).
//
// One matrix per call:
//   1. Householder reduction to tridiagonal form, A = Q T Q^T (Q = H_0 H_1 ... H_{n-3}).
//   2. Implicit symmetric tridiagonal QR iteration with Wilkinson shifts (Givens bulge chasing),
//      T = Z diag(lambda) Z^T; deflation when |e_i| <= eps ||T||_max.
// Eigenvalues only cost ~(4/3) n^3 (the reduction) + O(n^2); eigenvectors add ~3 n^3.
// Storage is row-major. Eigenvectors are returned as the ROWS of Vt (row i <-> lambda_i), so the
// Givens rotations of step 2 touch two contiguous rows.
#pragma once

#include "common.h"

namespace molrg::kernels {

template <typename T> MOLRG_HD T m_abs(T v) { return v < T(0) ? -v : v; }
template <typename T> MOLRG_HD T m_eps();
template <> MOLRG_HD float m_eps<float>() { return 1.1920929e-07f; }
template <> MOLRG_HD double m_eps<double>() { return 2.220446049250313e-16; }
template <typename T> MOLRG_HD T m_tiny();
template <> MOLRG_HD float m_tiny<float>() { return 1.17549435e-38f; }
template <> MOLRG_HD double m_tiny<double>() { return 2.2250738585072014e-308; }

// sqrt(a^2 + b^2) without overflow or harmful underflow.
template <typename T>
MOLRG_HD T m_hypot(T a, T b) {
  a = m_abs(a);
  b = m_abs(b);
  const T big = m_max(a, b);
  if (big == T(0)) return T(0);
  const T sa = a / big, sb = b / big;
  return big * m_sqrt(sa * sa + sb * sb);
}

// Householder tridiagonalisation of the symmetric n x n matrix A (overwritten; the Householder
// vectors are left in the strictly lower part of column k). d [n] gets the diagonal, e [n] the
// sub-diagonal (e[i] couples i and i+1; e[n-1] = 0). p is scratch [n].
template <typename T>
MOLRG_HD void sym_tridiagonalize(T* A, int n, T* d, T* e, T* p) {
  for (int k = 0; k + 2 < n; ++k) {
    const int m = n - k - 1;  // length of the column below the diagonal
    T* col0 = A + (int64_t)(k + 1) * n + k;  // x_i = col0[i * n]
    T scale = T(0);
    for (int i = 0; i < m; ++i) scale = m_max(scale, m_abs(col0[(int64_t)i * n]));
    T tail = T(0);
    for (int i = 1; i < m; ++i) {
      const T xi = col0[(int64_t)i * n] / (scale > T(0) ? scale : T(1));
      tail += xi * xi;
    }
    if (tail == T(0)) {  // already tridiagonal in this column: H = I
      e[k] = col0[0];
      col0[0] = T(0);
      continue;
    }
    const T x0 = col0[0] / scale;
    const T norm = m_sqrt(x0 * x0 + tail);
    const T alpha = x0 > T(0) ? -norm : norm;  // H x = alpha e_1 (scaled)
    e[k] = alpha * scale;
    // v = (x - alpha e_1) / ||x - alpha e_1||, stored in place of x.
    const T v0 = x0 - alpha;
    const T inv = T(1) / m_sqrt(v0 * v0 + tail);
    col0[0] = v0 * inv;
    for (int i = 1; i < m; ++i) col0[(int64_t)i * n] = col0[(int64_t)i * n] / scale * inv;
    // A22 <- H A22 H = A22 - 2 (v q^T + q v^T), p = A22 v, q = p - (v.p) v.
    T* A22 = A + (int64_t)(k + 1) * n + (k + 1);
    T vp = T(0);
    for (int i = 0; i < m; ++i) {
      const T* row = A22 + (int64_t)i * n;
      T s = T(0);
      for (int j = 0; j < m; ++j) s += row[j] * col0[(int64_t)j * n];
      p[i] = s;
      vp += col0[(int64_t)i * n] * s;
    }
    for (int i = 0; i < m; ++i) p[i] -= vp * col0[(int64_t)i * n];
    for (int i = 0; i < m; ++i) {
      T* row = A22 + (int64_t)i * n;
      const T vi = T(2) * col0[(int64_t)i * n], qi = T(2) * p[i];
      for (int j = 0; j < m; ++j) row[j] -= vi * p[j] + qi * col0[(int64_t)j * n];
    }
  }
  for (int i = 0; i < n; ++i) d[i] = A[(int64_t)i * n + i];
  if (n >= 2) e[n - 2] = A[(int64_t)(n - 1) * n + (n - 2)];
  if (n >= 1) e[n - 1] = T(0);
}

// Qt = Q^T = H_{n-3} ... H_0 from the Householder vectors left in A by sym_tridiagonalize.
template <typename T>
MOLRG_HD void sym_tridiag_form_qt(const T* A, int n, T* Qt) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) Qt[(int64_t)i * n + j] = i == j ? T(1) : T(0);
  for (int k = 0; k + 2 < n; ++k) {
    const int m = n - k - 1;
    const T* v = A + (int64_t)(k + 1) * n + k;  // v_i = v[i * n]
    bool zero = true;
    for (int i = 0; i < m && zero; ++i) zero = v[(int64_t)i * n] == T(0);
    if (zero) continue;
    T* rows = Qt + (int64_t)(k + 1) * n;  // rows k+1 .. n-1
    for (int j = 0; j < n; ++j) {
      T s = T(0);
      for (int i = 0; i < m; ++i) s += v[(int64_t)i * n] * rows[(int64_t)i * n + j];
      s *= T(2);
      if (s == T(0)) continue;
      for (int i = 0; i < m; ++i) rows[(int64_t)i * n + j] -= s * v[(int64_t)i * n];
    }
  }
}

// Implicit-shift QR on the symmetric tridiagonal (d, e); on return d holds the eigenvalues
// (unsorted). When Vt is non-null its rows are rotated along (Vt <- G Vt), so starting from Q^T
// they end as the eigenvectors of the original matrix. Returns false if it did not converge.
template <typename T>
MOLRG_HD bool sym_tridiag_qr(T* d, T* e, int n, T* Vt) {
  // Deflate |e_i| <= eps * ||T||_max: the Householder step already perturbs A by that much, and
  // a purely relative test can stall on blocks many orders of magnitude below ||T||.
  T anorm = T(0);
  for (int i = 0; i < n; ++i) anorm = m_max(anorm, m_max(m_abs(d[i]), m_abs(e[i])));
  const T eps = m_eps<T>(), tiny = m_tiny<T>();
  const T tol = m_max(eps * anorm, tiny);
  const int max_steps = 40 * (n > 0 ? n : 1);
  int steps = 0;
  int hi = n - 1;
  while (hi > 0) {
    // Deflate negligible couplings at the bottom.
    if (m_abs(e[hi - 1]) <= tol) {
      e[hi - 1] = T(0);
      --hi;
      continue;
    }
    // Unreduced block [lo, hi].
    int lo = hi - 1;
    while (lo > 0) {
      const T b = e[lo - 1];
      if (m_abs(b) <= tol) {
        e[lo - 1] = T(0);
        break;
      }
      --lo;
    }
    if (++steps > max_steps) return false;
    // Wilkinson shift from the trailing 2 x 2 block.
    const T half = (d[hi - 1] - d[hi]) / T(2);
    const T bb = e[hi - 1];
    const T den = half + (half >= T(0) ? m_hypot(half, bb) : -m_hypot(half, bb));
    const T mu = den != T(0) ? d[hi] - bb * bb / den : d[hi] - m_abs(bb);
    T x = d[lo] - mu, z = e[lo];
    for (int k = lo; k < hi; ++k) {
      // Rotation G = [[c, -s], [s, c]] on rows/cols (k, k+1) zeroing z against x.
      const T r = m_hypot(x, z);
      T c = T(1), s = T(0);
      if (r != T(0)) {
        c = x / r;
        s = -z / r;
      }
      if (k > lo) e[k - 1] = r;
      const T p = d[k], q = e[k], t = d[k + 1];
      const T cc = c * c, ss = s * s, cs = c * s;
      d[k] = cc * p - T(2) * cs * q + ss * t;
      d[k + 1] = ss * p + T(2) * cs * q + cc * t;
      e[k] = cs * (p - t) + (cc - ss) * q;
      if (k + 1 < hi) {
        z = -s * e[k + 1];
        e[k + 1] = c * e[k + 1];
        x = e[k];
      }
      if (Vt) {
        T* vk = Vt + (int64_t)k * n;
        T* vk1 = vk + n;
        for (int j = 0; j < n; ++j) {
          const T a = vk[j], b = vk1[j];
          vk[j] = c * a - s * b;
          vk1[j] = s * a + c * b;
        }
      }
    }
  }
  return true;
}

// A power of two s with s max|A_ij| in [1/2, 2] when max|A_ij| is outside [2^-20, 2^20], else
// 1. The reduction and the shifts square entries: in float32 entries of 1e19 overflowed and the
// QR iteration failed (and in float64 from about 1e154); tiny entries lose digits to underflow
// the same way. Powers of two scale exactly, and matrices of moderate size are left untouched.
template <typename T>
MOLRG_HD T sym_eig_scale(const T* A, int64_t count) {
  T amax = T(0);
  for (int64_t i = 0; i < count; ++i) amax = m_abs(A[i]) > amax ? m_abs(A[i]) : amax;
  const T big = T(1048576.0), small = T(1.0 / 1048576.0);
  T s = T(1);
  if (!(amax > small && amax < big) && amax > T(0) && amax - amax == T(0)) {  // finite, nonzero
    while (amax * s > big) s *= small;
    while (amax * s < small) s *= big;
    while (amax * s > T(2)) s *= T(0.5);
    while (amax * s < T(0.5)) s *= T(2);
  }
  return s;
}

// Eigen-decomposition of the symmetric n x n matrix A (destroyed). lambda [n] gets the
// eigenvalues (unsorted); if Vt is non-null its row i is the unit eigenvector of lambda_i.
// work: scratch of n elements. Returns false if the QR iteration did not converge. Matrices
// with entries beyond 2^+-20 are scaled by a power of two first (sym_eig_scale).
template <typename T>
MOLRG_HD bool sym_eig_unsorted(T* A, int n, T* lambda, T* Vt, T* e, T* work) {
  if (n <= 0) return true;
  const int64_t nn = (int64_t)n * n;
  const T s = sym_eig_scale(A, nn);
  if (s != T(1))
    for (int64_t i = 0; i < nn; ++i) A[i] *= s;
  sym_tridiagonalize(A, n, lambda, e, work);
  if (Vt) sym_tridiag_form_qt(A, n, Vt);
  const bool ok = sym_tridiag_qr(lambda, e, n, Vt);
  if (s != T(1))
    for (int i = 0; i < n; ++i) lambda[i] /= s;
  return ok;
}

// order[0..n) = permutation sorting key descending (stable insertion sort; n is small).
template <typename T>
MOLRG_HD void argsort_desc(const T* key, int n, int32_t* order) {
  for (int i = 0; i < n; ++i) {
    const int32_t id = i;
    int j = i;
    while (j > 0 && key[order[j - 1]] < key[id]) {
      order[j] = order[j - 1];
      --j;
    }
    order[j] = id;
  }
}

}  // namespace molrg::kernels
