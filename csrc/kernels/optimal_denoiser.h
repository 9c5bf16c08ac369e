// Torch-free row math of the empirical optimal (multi-delta) denoiser of seed 003, eq. (5):
//   D(x) = sum_i softmax_i(l_i) X_i,   l_i = -||x - s X_i||^2 / (2 gamma^2),
// the posterior mean E[x_0 | x_t = x] when x_0 is uniform over the N training points X_i and
// x_t = s x_0 + gamma eps.
//
// The kernels work on tiles (a block of queries x a block of training points), flash-attention
// style: a GEMM gives the cross terms C_ij = <x_i, X_j>, the functions below turn one row of a
// tile into logits, soft-max weights and backward coefficients, and a second GEMM accumulates
// P @ X_block. Only a tile of logits exists at any time, never a B x N matrix.
//
// Precision: the logit is assembled as -(||x||^2 - 2 s <x, X_j> + s^2 ||X_j||^2) / (2 gamma^2), in
// which the terms cancel when x is close to s X_j; at gamma = 0.002 a float32 cross term would put
// O(1) errors into the logits. The logits and soft-max statistics are therefore carried in
// Acc = double, and the CPU kernel computes the cross term of a tile in double unless a rounding
// bound shows float32 is as good as needed (see kCrossTol there). The probabilities
// p = exp(l - m) <= 1 and the P @ X GEMM are in the input type: no cancellation happens there.
#pragma once

#include "common.h"
#include "series_math.h"

namespace molrg::kernels {

// Host builds vectorise the row loops with OpenMP SIMD (strict IEEE order would forbid the
// compiler to reassociate a running sum); CUDA builds see plain loops.
#if defined(_OPENMP) && !defined(__CUDACC__)
#define MOLRG_PRAGMA(x) _Pragma(#x)
#define MOLRG_SIMD_SUM(v) MOLRG_PRAGMA(omp simd reduction(+ : v))
#define MOLRG_SIMD_MAX(v) MOLRG_PRAGMA(omp simd reduction(max : v))
#define MOLRG_SIMD _Pragma("omp simd")
#else
#define MOLRG_SIMD_SUM(v)
#define MOLRG_SIMD_MAX(v)
#define MOLRG_SIMD
#endif

// Squared norm of a row, in Acc.
template <typename T, typename Acc>
MOLRG_HD Acc od_sqnorm(const T* v, int64_t n) {
  Acc out = Acc(0);
  MOLRG_SIMD_SUM(out)
  for (int64_t k = 0; k < n; ++k) out += Acc(v[k]) * Acc(v[k]);
  return out;
}

// <a, b> over n entries, in Acc.
template <typename T, typename Acc>
MOLRG_HD Acc od_dot(const T* a, const T* b, int64_t n) {
  Acc out = Acc(0);
  MOLRG_SIMD_SUM(out)
  for (int64_t k = 0; k < n; ++k) out += Acc(a[k]) * Acc(b[k]);
  return out;
}

// One tile row: cross terms c_j = <x, X_j> (in Tc: float or double, see the CPU kernel on when
// float is accurate enough) become logits in Acc (l may alias c when Tc == Acc)
//   l_j = -max(xx - 2 s c_j + s^2 XX_j, 0) * inv2g2,   xx = ||x||^2, XX_j = ||X_j||^2,
// (the clamp removes rounding below zero of a squared distance). Returns max_j l_j.
template <typename Tc, typename Acc>
MOLRG_HD Acc od_row_logits(const Tc* c, Acc* l, int64_t cnt, const Acc* XX, Acc xx, Acc s,
                           Acc inv2g2) {
  const Acc two_s = Acc(2) * s, s2 = s * s;
  Acc mx = -INFINITY;
  MOLRG_SIMD_MAX(mx)
  for (int64_t j = 0; j < cnt; ++j) {
    Acc d2 = xx - two_s * Acc(c[j]) + s2 * XX[j];
    d2 = d2 > Acc(0) ? d2 : Acc(0);
    const Acc lj = -d2 * inv2g2;
    l[j] = lj;
    mx = mx > lj ? mx : lj;
  }
  return mx;
}

// Weights of one tile row: p_j = exp(l_j - m) in the input type T (forward: m = running maximum,
// so l_j - m <= 0; backward: m = the saved lse, kept in double for every input type, so
// l_j - m <= its rounding, ~1e-16 |lse|). sm_exp is the
// vectorisable series exp of series_math.h (exact to a few ulp for arguments <= 0, 0 below the
// normal range); arguments are capped at 1, which no consistent lse reaches (the backward reports
// a row maximum above lse as an error). Returns sum_j p_j.
// One weight p = exp(l - m) in T, the argument capped at 1 (see od_row_exp).
template <typename T, typename Acc>
MOLRG_HD T od_weight(Acc l, Acc m) {
  const Acc d = l - m;
  return sm_exp<T>(static_cast<T>(d < Acc(1) ? d : Acc(1)));
}

template <typename T, typename Acc>
MOLRG_HD Acc od_row_exp(const Acc* l, int64_t cnt, Acc m, T* p) {
  T sum = T(0);
  MOLRG_SIMD_SUM(sum)
  for (int64_t j = 0; j < cnt; ++j) {
    const T v = od_weight<T, Acc>(l[j], m);
    p[j] = v;
    sum += v;
  }
  return Acc(sum);
}

// Backward coefficients of one tile row: with the weights w_j = exp(l_j - lse) (od_row_exp with
// m = lse) and a_j = <g, X_j>, writes q_j = w_j (a_j - <g, y>) over a and returns sum_j q_j.
template <typename T, typename Acc>
MOLRG_HD Acc od_row_coef(const T* w, T* a, int64_t cnt, T gy) {
  T qs = T(0);
  MOLRG_SIMD_SUM(qs)
  for (int64_t j = 0; j < cnt; ++j) {
    const T q = w[j] * (a[j] - gy);
    a[j] = q;
    qs += q;
  }
  return Acc(qs);
}

// Online soft-max step for one query: the running state (m, l, y[0:n]) absorbs a tile row whose
// maximum logit is bm. Rescales l and y when the maximum grows; returns the new maximum, which
// the caller then uses for od_row_exp (and adds the returned sum to l).
template <typename T, typename Acc>
MOLRG_HD Acc od_online_rescale(Acc m, Acc bm, Acc* l, T* y, int64_t n) {
  if (!(bm > m)) return m;
  if (*l > Acc(0)) {
    const Acc scale = exp(m - bm);
    *l *= scale;
    const T ts = static_cast<T>(scale);
    MOLRG_SIMD
    for (int64_t k = 0; k < n; ++k) y[k] *= ts;
  }
  return bm;
}

// Backward result for one query from the accumulated sums over all training points:
//   dL/dx = (s / gamma^2) sum_j w_j (<g, X_j> - <g, y>) (X_j - y) / sum_j w_j
//         = (s / gamma^2) (acc - qsum y) / wsum,   acc = sum_j q_j X_j, qsum = sum_j q_j,
// i.e. (s / gamma^2) Cov_w(X) g (Tweedie). Centring at y (subtracting qsum y) cancels the
// first-order rounding of the q_j when w is peaked; dividing by the recomputed wsum (= 1 in exact
// arithmetic) removes the common factor exp(lse_true - lse_saved) of a rounded saved lse. That
// holds while no weight is capped or underflows, which is why lse is saved in double: stored in
// float32, an lse of magnitude 1e9 (a query far from the data at small sigma) was off by ~100,
// which capped the top weights (dx up to 3.4x off) or underflowed all of them (a false
// "inconsistent" error).
// Machine epsilon of the input type (device code cannot call std::numeric_limits without
// --expt-relaxed-constexpr).
template <typename T> struct OdEps;
template <> struct OdEps<float> { static constexpr double value = 1.1920928955078125e-7; };
template <> struct OdEps<double> { static constexpr double value = 2.220446049250313e-16; };

// The backward's consistency test: a logit (here a row maximum) above the saved lse by more than
// the rounding of an lse stored in T (double: the ops store it so) means lse belongs to other
// inputs.
template <typename T, typename Acc>
MOLRG_HD bool od_lse_exceeded(Acc rowmax, Acc lse) {
  const Acc a = lse < Acc(0) ? -lse : lse;
  return rowmax - lse > Acc(0.5) + Acc(8 * OdEps<T>::value) * a;
}

// One entry of od_backward_finish: c (acc_k - qsum y_k) with c = (s / gamma^2) / wsum.
template <typename Acc>
MOLRG_HD Acc od_dx_entry(Acc acc, Acc qsum, Acc y, Acc c) {
  return c * (acc - qsum * y);
}

template <typename T, typename Acc>
MOLRG_HD void od_backward_finish(const T* acc, Acc qsum, Acc wsum, const T* y, Acc f, T* dx,
                                 int64_t n) {
  const Acc c = f / wsum;
  for (int64_t k = 0; k < n; ++k)
    dx[k] = static_cast<T>(od_dx_entry<Acc>(Acc(acc[k]), qsum, Acc(y[k]), c));
}

}  // namespace molrg::kernels
