// Input validation shared by the CPU and CUDA bindings. Every message names the argument.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace molrg {

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
}

inline void check_contig(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* op,
                        const char* name) {
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

// Whether p[0 .. count) are all finite. v - v is 0 for a finite v and NaN for NaN or Inf, so the
// sum is 0 exactly when every value is finite, in any order of summation: a vector loop
// (std::isfinite per value was a scalar loop of ~7 instructions a value, 2% of the n = 48
// denoiser's forward, which checks c and phi).
template <typename T>
inline bool all_finite(const T* p, int64_t count) {
  T sum = 0;
#if defined(_OPENMP)
#pragma omp simd reduction(+ : sum)
#endif
  for (int64_t k = 0; k < count; ++k) sum += p[k] - p[k];
  return sum == T(0);
}

// NaN/Inf check. A contiguous CPU tensor is scanned in place (one parallel pass over the raw
// values, serial below 2^16 of them): at::isfinite(t).all() would allocate a bool tensor of t's
// size and cost three ATen ops, which on the small tensors of a training step (U, the level
// table) took more time than the checks themselves are worth.
inline void check_finite(const at::Tensor& t, const char* op, const char* name) {
  if (t.numel() == 0) return;
  bool ok = true;
  if (t.is_cpu() && t.is_contiguous() &&
      (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)) {
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "check_finite", [&] {
      const scalar_t* p = t.const_data_ptr<scalar_t>();
      ok = at::parallel_reduce(
          0, t.numel(), int64_t(1) << 16, true,
          [&](int64_t b, int64_t e, bool acc) { return acc && all_finite(p + b, e - b); },
          [](bool a, bool b) { return a && b; });
    });
  } else {
    ok = at::isfinite(t).all().item<bool>();
  }
  TORCH_CHECK(ok, op, ": ", name, " contains NaN or Inf values");
}

// max |p[k]| over p[0 .. count), and whether all are finite (the sum of v - v of all_finite in
// the same vector loop).
template <typename T>
inline bool finite_absmax(const T* p, int64_t count, T& mx) {
  T sum = 0, m = 0;
#if defined(_OPENMP)
#pragma omp simd reduction(+ : sum) reduction(max : m)
#endif
  for (int64_t k = 0; k < count; ++k) {
    sum += p[k] - p[k];
    const T a = p[k] < T(0) ? -p[k] : p[k];
    m = a > m ? a : m;
  }
  mx = m;
  return sum == T(0);
}

// check_finite that also returns max |t| (0 for an empty t), in the same single pass (CPU); other
// tensors: aminmax, which propagates NaN and needs no temporary of t's size.
inline double check_finite_absmax(const at::Tensor& t, const char* op, const char* name) {
  if (t.numel() == 0) return 0.0;
  bool ok = true;
  double mx = 0.0;
  if (t.is_cpu() && t.is_contiguous() &&
      (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble)) {
    AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "check_finite_absmax", [&] {
      const scalar_t* p = t.const_data_ptr<scalar_t>();
      using Part = std::pair<bool, scalar_t>;
      const Part r = at::parallel_reduce(
          0, t.numel(), int64_t(1) << 16, Part{true, scalar_t(0)},
          [&](int64_t b, int64_t e, Part acc) {
            scalar_t m;
            const bool fin = finite_absmax(p + b, e - b, m);
            return Part{acc.first && fin, std::max(acc.second, m)};
          },
          [](Part a, Part b) { return Part{a.first && b.first, std::max(a.second, b.second)}; });
      ok = r.first;
      mx = double(r.second);
    });
  } else {
    auto [lo, hi] = at::aminmax(t);
    const double a = lo.item<double>(), b = hi.item<double>();
    ok = std::isfinite(a) && std::isfinite(b);
    mx = std::max(-a, b);
  }
  TORCH_CHECK(ok, op, ": ", name, " contains NaN or Inf values");
  return mx;
}

// Exact power-of-two rescaling for ops whose math is scale-equivariant (hard_assign,
// optimal_denoiser), so that data far from unit scale neither overflows (float32 squared norms
// of values >= ~1e19) nor loses products to flushed subnormals (values <= ~1e-19). Scaling by a
// power of two is exact, so a shifted call computes the numbers of an unshifted call on data at
// the shifted scale. The bands depend on the dtype: emax = 128 (float32) or 1024 (float64).
inline int dtype_emax(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? 1024 : 128; }

// Binary exponent of v > 0 (v = f 2^e, f in [0.5, 1)); 0 for v = 0.
inline int binary_exponent(double v) {
  int e = 0;
  if (v > 0.0) std::frexp(v, &e);
  return e;
}

// 0 when amax (> 0) lies in [2^-lim, 2^lim] or is 0; otherwise the e with amax 2^-e in
// [2^(target-1), 2^target).
inline int range_shift(double amax, int lim, int target) {
  const int e = binary_exponent(amax);
  if (!(amax > 0.0) || (e > -lim && e <= lim)) return 0;
  return e - target;
}

// hard_assign's shifts (of x0 and U): U to unit scale when it is far from it; then x0 so that the
// largest |x| |U| sits near 2^(emax/2 - 16) when it lies outside 2^+-(emax/2 - 8). The energies
// ||U_k^T x||^2 then stay below the dtype's largest value for n up to 2^15, and, with the
// largest near the top of the band, a sample up to 2^(emax - 17) times smaller than the largest
// still has normal energies (scaling into [0.5, 1) instead left 2^-63 of room).
inline std::pair<int, int> assign_shifts(double xmax, double umax, int emax) {
  const int us = range_shift(umax, emax / 4, 0);
  if (!(xmax > 0.0) || !(umax > 0.0)) return {0, us};
  const int p = binary_exponent(xmax) + binary_exponent(umax) - us;
  const int band = emax / 2 - 8;
  const int xs = (p > -band && p <= band) ? 0 : p - (emax / 2 - 16);
  return {xs, us};
}

// Whether optimal_denoiser's shift e (of x_t, X_train and gamma together; X_train to unit scale,
// range_shift(max |X_train|, emax / 4, 0)) keeps the largest |x_t| and the gamma range inside
// 2^+-(emax - 30): queries at a scale far from the data's (x_t = X + 1e9 noise on X ~ 1e-30) ran
// right unshifted (the cross terms go to double there) and would overflow shifted.
inline bool od_shift_keeps_range(int e, double xmax, double gmin, double gmax, int emax) {
  const auto stays = [&](double v) {
    if (!(v > 0.0)) return true;
    const int ev = binary_exponent(v) - e;
    return ev > -(emax - 30) && ev < emax - 30;
  };
  return stays(xmax) && stays(gmin) && stays(gmax);
}

// t * 2^k, exactly (for values that stay normal): one multiplication where 2^k is a normal number
// of t's dtype, otherwise two half steps.
inline at::Tensor times_pow2(const at::Tensor& t, int k) {
  if (k == 0) return t;
  if (std::abs(k) < dtype_emax(t) - 2) return t.mul(std::ldexp(1.0, k));
  const int h = k / 2;
  return t.mul(std::ldexp(1.0, h)).mul_(std::ldexp(1.0, k - h));
}

// Sizes of a denoiser call; dims converted to int32 for the kernels.
struct DaeSizes {
  int64_t P, B, n, K, dm;
  std::vector<int32_t> dims;
};

// The denoiser mode argument of every op: 0 soft, 1 hard.
inline void check_dae_mode(int64_t mode, const char* op) {
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (soft) or 1 (hard), got ", mode);
}

// x [P, B, n] (the samples) and U [P, K, n, dmax] with dims. x_name, x_shape: how errors name the
// first argument (train_step's is the training set X [P, N, n]).
inline DaeSizes check_dae_xU(const at::Tensor& x, const at::Tensor& U, at::IntArrayRef dims,
                             const char* op, const char* x_name = "x",
                             const char* x_shape = "[P, B, n]") {
  check_float(x, op, x_name);
  check_like(U, x, op, "U", x_name);
  TORCH_CHECK(x.dim() == 3, op, ": ", x_name, " must be ", x_shape, ", got shape ", x.sizes());
  TORCH_CHECK(U.dim() == 4, op, ": U must be [P, K, n, dmax], got shape ", U.sizes());
  check_contig(x, op, x_name);
  check_contig(U, op, "U");
  DaeSizes s{x.size(0), x.size(1), x.size(2), U.size(1), U.size(3), {}};
  TORCH_CHECK(U.size(0) == s.P, op, ": U has ", U.size(0), " instances but ", x_name, " has ",
              s.P);
  TORCH_CHECK(U.size(2) == s.n, op, ": U has n = ", U.size(2), " rows but ", x_name, " has n = ",
              s.n);
  TORCH_CHECK(s.K > 0, op, ": U must hold at least one subspace (K = 0)");
  TORCH_CHECK(s.dm > 0, op, ": U must have at least one column (dmax = 0)");
  TORCH_CHECK((int64_t)dims.size() == s.K, op, ": dims must have K = ", s.K, " entries, got ",
              dims.size());
  s.dims.resize(s.K);
  for (int64_t k = 0; k < s.K; ++k) {
    TORCH_CHECK(dims[k] >= 1 && dims[k] <= s.dm, op, ": dims[", k, "] = ", dims[k],
                " must be in [1, dmax = ", s.dm, "]");
    TORCH_CHECK(dims[k] <= s.n, op, ": dims[", k, "] = ", dims[k], " exceeds n = ", s.n);
    s.dims[k] = static_cast<int32_t>(dims[k]);
  }
  TORCH_CHECK(s.n <= INT32_MAX && s.dm <= INT32_MAX && s.K <= INT32_MAX, op,
              ": sizes too large");
  return s;
}

inline void check_dae_scales(const at::Tensor& c, const at::Tensor& phi, const DaeSizes& s,
                             const at::Tensor& x, const char* op) {
  check_like(c, x, op, "c", "x");
  check_like(phi, x, op, "phi", "x");
  check_shape(c, {s.P, s.B}, op, "c");
  check_shape(phi, {s.P, s.B}, op, "phi");
  check_contig(c, op, "c");
  check_contig(phi, op, "phi");
}

// Optional logit bias [P,B,K]: -inf is valid (pi_k = 0); NaN, +inf and all -inf rows are not.
// Logit biases [..., K]: -inf is valid (pi_k = 0); NaN, +inf and rows with every entry -inf
// (no component left) are not. `row` names what a row is ("sample", "level").
inline void check_logit_bias_values(const at::Tensor& bias, const char* op, const char* name,
                                    const char* row) {
  if (bias.numel() == 0) return;
  TORCH_CHECK(!(at::isnan(bias) | at::isposinf(bias)).any().item<bool>(), op, ": ", name,
              " contains NaN or +Inf values");
  TORCH_CHECK(!at::isneginf(bias).all(-1).any().item<bool>(), op, ": ", name,
              " is -Inf for every subspace of some ", row);
}

inline void check_dae_bias(const at::Tensor& bias, const DaeSizes& s, const at::Tensor& x,
                           const char* op) {
  check_like(bias, x, op, "bias", "x");
  check_shape(bias, {s.P, s.B, s.K}, op, "bias");
  check_contig(bias, op, "bias");
  check_logit_bias_values(bias, op, "bias", "sample");
}

// Optional hard-mode assignment [P,B] int64 with values in [0, K).
inline void check_dae_assign(const at::Tensor& assign, int64_t mode, const DaeSizes& s,
                             const at::Tensor& x, const char* op) {
  TORCH_CHECK(mode == 1, op, ": assign is only used in hard mode");
  TORCH_CHECK(assign.scalar_type() == at::kLong, op, ": assign must be int64, got ",
              assign.scalar_type());
  TORCH_CHECK(assign.device() == x.device(), op, ": assign is on ", assign.device(),
              " but x is on ", x.device());
  check_shape(assign, {s.P, s.B}, op, "assign");
  check_contig(assign, op, "assign");
  if (assign.numel() > 0) {
    TORCH_CHECK(assign.min().item<int64_t>() >= 0 && assign.max().item<int64_t>() < s.K, op,
                ": assign values must be in [0, K = ", s.K, ")");
  }
}

// Column offsets of the stacked bases Ubar = [U_1 .. U_K] (n x D, D = sum d_k) and the R factor
// of Ubar = Q R ([P, r, D], r = min(n, D)) that dae_jacobian_spectrum takes.
struct StackedSizes {
  int64_t D, r;
  std::vector<int32_t> offs;
};

inline StackedSizes check_stacked_R(const at::Tensor& R, const DaeSizes& s, const at::Tensor& x,
                                    const char* op) {
  StackedSizes st{0, 0, std::vector<int32_t>(s.K)};
  for (int64_t k = 0; k < s.K; ++k) {
    st.offs[k] = static_cast<int32_t>(st.D);
    st.D += s.dims[k];
  }
  st.r = std::min<int64_t>(s.n, st.D);
  check_like(R, x, op, "R", "x");
  check_shape(R, {s.P, st.r, st.D}, op, "R");
  check_contig(R, op, "R");
  check_finite(R, op, "R");
  return st;
}

}  // namespace molrg
