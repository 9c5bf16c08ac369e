// Branch-free exp, log and sin/cos on restricted arguments, torch-free, MOLRG_HD: the
// Box-Muller transform of philox.h and the soft-max weights of the CPU block kernels.
//
// libm's expf/logf/sinf/cosf are scalar calls with branches: they cost most of the fused
// training step's time on the CPU, and they cannot be vectorised. The arguments needed here are
// restricted, so short series (and one fitted polynomial) are enough:
//   sm_exp(x), x <= 0 (a max-subtracted logit): x = i ln 2 + r (Cody-Waite, |r| <= ln2 / 2),
//       e^r by its Taylor series (to r^7 in float, r^13 in double), times 2^i built from bits;
//       0 below the smallest normal result;
//   bm_log(u), u in (0, 1] a normal number:  u = 2^e m with m in [sqrt(1/2), sqrt(2)),
//       log u = e ln 2 + log m; in float log m = x - x^2/2 + x^3 P(x), x = m - 1, P a fitted
//       polynomial of degree 7 (below 6.5e-9 relative, no division); in double
//       log m = 2 atanh(t), t = (m - 1) / (m + 1), |t| <= 0.1716, by the odd Taylor series of
//       atanh (12 terms, below 2e-17 relative);
//   bm_sincos_2pi(u), u in [0, 1]: q = round(4u), v = u - q/4 in [-1/8, 1/8] (exact), a = 2 pi v
//     in [-pi/4, pi/4], Taylor series of sin and cos at a (to a^9 / a^8 in float, a^17 / a^16 in
//     double; Horner in a^2 on the folded coefficients, one FMA per term), then a rotation by q
//     quarter turns.
// Straight-line code with selects only, so a SIMD loop over lanes vectorises it; the CPU and CUDA
// kernels call the same functions.
#pragma once

#include <cstring>

#include "common.h"

namespace molrg::kernels {

template <typename T> struct BmTraits;
template <> struct BmTraits<float> {
  using Bits = uint32_t;
  using Int = int32_t;
  static constexpr int kMant = 23, kBias = 127, kTrigTerms = 4, kExpTerms = 7;
  static constexpr float kExpMin = -87.0f;  // e^x is a normal float above this
};
template <> struct BmTraits<double> {
  using Bits = uint64_t;
  using Int = int64_t;
  static constexpr int kMant = 52, kBias = 1023, kLogTerms = 12, kTrigTerms = 8, kExpTerms = 13;
  static constexpr double kExpMin = -708.0;
};

template <typename T> MOLRG_HD T m_floor(T v);
template <> MOLRG_HD float m_floor<float>(float v) { return floorf(v); }
template <> MOLRG_HD double m_floor<double>(double v) { return floor(v); }

// e^x for x <= 0 (0 for x below kExpMin, including -inf).
template <typename T>
MOLRG_HD T sm_exp(T x) {
  using Tr = BmTraits<T>;
  using Bits = typename Tr::Bits;
  const bool tiny = !(x >= Tr::kExpMin);
  const T xc = tiny ? T(0) : x;
  const T i = m_floor<T>(xc * T(1.4426950408889634074) + T(0.5));
  // r = x - i ln 2 in two steps (ln 2 = hi + lo, hi with trailing zero bits: i * hi is exact)
  const T r = (xc - i * T(0.693145751953125)) - i * T(1.42860682030941723212e-6);
  T p = T(1);
  MOLRG_UNROLL
  for (int k = Tr::kExpTerms; k >= 1; --k) p = T(1) + r * p * (T(1) / T(k));
  const Bits b = (Bits)((typename Tr::Int)i + Tr::kBias) << Tr::kMant;
  T two_i;
  memcpy(&two_i, &b, sizeof two_i);
  return tiny ? T(0) : p * two_i;
}

// Natural log of a positive normal number u <= 1 (the uniforms of philox_open01). The reduction
// to m in [sqrt(1/2), sqrt(2)) works on the bits (a mantissa above sqrt(2)'s takes one off the
// exponent field, i.e. halves m): integer arithmetic on a 0/1 flag, not a select between two
// values of m, which GCC would otherwise turn into two copies of the series.
template <typename T>
MOLRG_HD T bm_log(T u) {
  using Tr = BmTraits<T>;
  using Bits = typename Tr::Bits;
  Bits b;
  memcpy(&b, &u, sizeof b);
  constexpr Bits kMantMask = (Bits(1) << Tr::kMant) - 1;
  constexpr Bits kOne = Bits(Tr::kBias) << Tr::kMant;  // bits of 1.0
  const T sqrt2 = T(1.4142135623730951);
  Bits s2;
  memcpy(&s2, &sqrt2, sizeof s2);
  const Bits mant = b & kMantMask;
  const Bits big = (Bits)(mant > (s2 & kMantMask));  // 1 when m >= sqrt(2) before reduction
  // sign bit is 0: the exponent field minus the bias, plus one when m is halved
  const T e = (T)((typename Tr::Int)(b >> Tr::kMant) - Tr::kBias + (typename Tr::Int)big);
  const Bits mb = (mant | kOne) - (big << Tr::kMant);
  T m;
  memcpy(&m, &mb, sizeof m);  // m in [sqrt(1/2), sqrt(2)]
  if constexpr (sizeof(T) == 4) {
    // float: log m = x + x^2 (-1/2 + x P(x)), x = m - 1, no division (on the CPU a vector divide
    // shares one unit with Box-Muller's square root; without either, timing only, the training
    // step took 0.96 of its time).
    // P (Horner): log(1 + x) = x - x^2 / 2 + x^3 P(x) on [sqrt(1/2) - 1, sqrt(2) - 1], degree
    // 7, fitted to the relative error of log(1 + x) by iteratively reweighted least squares
    // (Lawson's minimax iteration); with these float coefficients the error is at most 6.5e-9
    // relative in exact arithmetic, below float rounding (6e-8).
    const T x = m - T(1);
    T p = -7.634498924e-02f;
    p = p * x + 1.276157796e-01f;
    p = p * x - 1.316018254e-01f;
    p = p * x + 1.420175731e-01f;
    p = p * x - 1.662335694e-01f;
    p = p * x + 2.000122666e-01f;
    p = p * x - 2.500081956e-01f;
    p = p * x + 3.333333135e-01f;
    return x + x * x * (p * x - T(0.5)) + e * T(0.69314718055994530942);
  } else {
    const T t = (m - T(1)) / (m + T(1));
    const T t2 = t * t;
    T p = T(1) / T(2 * Tr::kLogTerms - 1);
    MOLRG_UNROLL
    for (int k = Tr::kLogTerms - 2; k >= 0; --k) p = p * t2 + T(1) / T(2 * k + 1);
    return T(2) * t * p + e * T(0.69314718055994530942);
  }
}

// Taylor coefficients (-1)^k / (2k + o)! of sin (o = 1) and cos (o = 0), for Horner in a^2.
template <typename T>
MOLRG_HD constexpr T bm_trig_coef(int k, int o) {
  T f = T(1);
  for (int i = 2; i <= 2 * k + o; ++i) f *= T(i);
  return (k % 2 ? T(-1) : T(1)) / f;
}

// x, negated when bit 1 of q is set: the sign bit flipped, which is what the multiply by -1 it
// replaces gave (exactly, zeros included), in one integer op where the multiply needed the factor
// built from q first.
template <typename T>
MOLRG_HD T bm_negate_if_bit1(T x, int q) {
  using Bits = typename BmTraits<T>::Bits;
  Bits b;
  memcpy(&b, &x, sizeof b);
  b ^= (Bits)(q & 2) << (8 * sizeof(Bits) - 2);
  memcpy(&x, &b, sizeof x);
  return x;
}

// sin(2 pi u) and cos(2 pi u) for u in [0, 1].
template <typename T>
MOLRG_HD void bm_sincos_2pi(T u, T* sn, T* cs) {
  const T qf = m_floor<T>(T(4) * u + T(0.5));
  const T v = u - qf * T(0.25);
  const T a = T(6.283185307179586477) * v;
  const T a2 = a * a;
  constexpr int N = BmTraits<T>::kTrigTerms;
  // sin a = a sum_k (-1)^k a^2k / (2k+1)!, cos a = sum_k (-1)^k a^2k / (2k)!, k = 0 .. N (Horner)
  T ps = bm_trig_coef<T>(N, 1), pc = bm_trig_coef<T>(N, 0);
  MOLRG_UNROLL
  for (int k = N - 1; k >= 0; --k) {
    ps = ps * a2 + bm_trig_coef<T>(k, 1);
    pc = pc * a2 + bm_trig_coef<T>(k, 0);
  }
  const T s = a * ps, c = pc;
  // angle = a + q pi/2: swap sin and cos for odd q, then sin changes sign for q = 2, 3 and cos
  // for q = 1, 2 (selects and sign flips instead of a 4-way branch).
  const int q = (int)qf;
  const bool odd = (q & 1) != 0;
  const T s1 = odd ? c : s, c1 = odd ? s : c;
  *sn = bm_negate_if_bit1(s1, q);
  *cs = bm_negate_if_bit1(c1, q + 1);
}

}  // namespace molrg::kernels
