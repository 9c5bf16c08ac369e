// CPU kernels of the empirical optimal (multi-delta) denoiser (seed 003, eq. (5)).
// Schemas are declared here (TORCH_LIBRARY_FRAGMENT); row math in kernels/optimal_denoiser.h.
//
// Tiled streaming, flash-attention style. The queries are cut into chunks (one per thread) and,
// when there are too few queries to feed every thread, the training set is also cut into splits
// whose partial soft-max states are merged by log-sum-exp at the end. Within a work item the
// training points stream in blocks of `block` rows; for every block and every sub-block of at most
// kQueryTile queries:
//   C = x_q X_b^T                                (GEMM, in double: see the header on precision)
//   l = -(||x||^2 - 2 s C + s^2 ||X_j||^2) / (2 gamma^2), online max-subtracted soft-max
//   y_q += P X_b                                 (GEMM, in the input type)
// so the memory beyond inputs and outputs is O(kQueryTile x block + B n): no B x N matrix.
// The forward saves y and the per-query log-sum-exp lse = log sum_j exp(l_j) (the true logits,
// ||x||^2 included); the backward recomputes the weights exp(l_j - lse) tile by tile the same way.
// Training data far from unit scale (float32: max |X| outside 2^+-32) is first scaled by a power
// of two (x, X and gamma alike, exact; y is scaled back, lse and dx do not change): float32
// cross terms and squared norms then stay inside float32's range (od_range_shift).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../optimal_denoiser_checks.h"
#include "../kernels/optimal_denoiser.h"

TORCH_LIBRARY_FRAGMENT(molrg, m) {
  // x_t [B, n] queries; X_train [N, n] training points; s, gamma [B] (x = s x_0 + gamma eps);
  // block: training points per streamed tile. Returns (y [B, n], lse [B] float64) with
  // lse_b = log sum_j exp(-||x_b - s_b X_j||^2 / (2 gamma_b^2)).
  m.def(
      "optimal_denoiser(Tensor x_t, Tensor X_train, Tensor s, Tensor gamma, int block) -> "
      "(Tensor, Tensor)");
  // dL/dx from grad_y and the saved y and lse. Returns dx [B, n].
  m.def(
      "optimal_denoiser_backward(Tensor grad_y, Tensor x_t, Tensor X_train, Tensor s, "
      "Tensor gamma, "
      "Tensor y, Tensor lse) -> Tensor");
}

namespace molrg {
namespace {

using namespace molrg::kernels;
using Acc = double;  // cross terms, logits and soft-max statistics (see kernels/optimal_denoiser.h)

constexpr int64_t kQueryTile = 128;  // queries per GEMM tile
// Training points per tile in the backward (its schema has no block argument).
constexpr int64_t kDefaultBackwardBlock = 512;

// The shared checks (optimal_denoiser_checks.h), then the NaN/Inf scan of x and X, which also
// gives the range shift (od_range_shift).
OdSizes check_od(const at::Tensor& x, const at::Tensor& X, const at::Tensor& s,
                 const at::Tensor& gamma, const char* op, int* shift) {
  OdSizes z = check_od_args(x, X, s, gamma, op);
  *shift = od_range_shift(x, X, gamma, op);
  return z;
}

// How the work is cut: `chunks` contiguous query ranges x `splits` contiguous ranges of training
// blocks; one work item per (chunk, split). Splitting the training set only pays when there are
// fewer than kQueryTile queries per thread (small batches), and never below one block per split.
struct OdPlan {
  int64_t blk, nblocks, chunks, splits;
  int64_t items() const { return chunks * splits; }
  int64_t q_begin(int64_t c, int64_t B) const { return c * B / chunks; }
  int64_t j_begin(int64_t sp, int64_t N) const {
    return std::min(N, (sp * nblocks / splits) * blk);
  }
};

OdPlan plan_for(const OdSizes& z, int64_t block) {
  OdPlan p;
  p.blk = std::min(block, z.N);
  p.nblocks = (z.N + p.blk - 1) / p.blk;
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || z.B * z.N * z.n < (int64_t(1) << 18)) {
    p.chunks = p.splits = 1;  // too small to amortise the threads
    return p;
  }
  p.chunks = std::clamp<int64_t>(z.B / kQueryTile, 1, threads);
  p.splits = std::clamp<int64_t>(threads / p.chunks, 1, p.nblocks);
  return p;
}

// Row-major [rows, cols] view of raw memory (no copy, no ownership).
template <typename T>
at::Tensor view2d(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// Precision choice (float32 input). A tile's cross terms come from a float32 GEMM when the bound
//   (s / gamma^2) sqrt(n) 2^-24 ||x|| max_j ||X_j||
// on their rounding, in logit units, stays below kCrossTol for all its queries (on Gaussian data
// MKL's sgemm error stayed below 0.6 of this bound); otherwise from a double GEMM on double copies.
// Measured alternatives: float32 cross terms everywhere fail at small noise (a posterior shared by
// two points at sigma <= 0.2 came out up to 5e-4 off, relative, against < 1e-6 here: see the
// tests); double everywhere costs ~1.35x in the forward at mid noise, where the float32 logit error (< 2^-11)
// is of the order of the rounding of a direct float32 distance sqrt(n) 2^-24 ||x - s X_j||^2 /
// (2 gamma^2) anyway. With unit-variance data and n = 64 the switch sits near gamma ~ 0.3.
constexpr double kCrossTol = 1.0 / 2048;

// out = a @ b into existing memory (out is a view2d).
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// Per-work-item scratch: the training block's squared norms, per-query constants, one tile of
// cross terms / logits (C, in Acc), of float cross terms (Cf) and of weights (P), and the Acc
// copies of query rows and of the training block that double-precision tiles need (float32 input).
template <typename T>
struct OdScratch {
  static constexpr bool kSame = std::is_same_v<T, Acc>;
  const T* x;  // all queries of the op
  const T* X;  // all training points
  int64_t q0, n;
  std::vector<Acc> xx, s, inv2g2, rowfac, XX, C;
  std::vector<T> P, Cf;
  std::vector<Acc> xq, Xb;
  int64_t j0 = 0, cnt = 0;
  bool Xb_ready = false;  // Xb holds the current block
  bool tile_fp64 = false;  // the last cross() ran in double (C) rather than float (Cf)
  Acc Xmax = 0;            // max_j ||X_j|| over the current block

  OdScratch(const OdPlan& pl, const T* x_, const T* X_, const T* sp, const T* gp, int64_t q0_,
            int64_t nq, int64_t n_)
      : x(x_), X(X_), q0(q0_), n(n_), xx(nq), s(nq), inv2g2(nq), rowfac(nq), XX(pl.blk),
        C(kQueryTile * pl.blk), P(kQueryTile * pl.blk) {
    if constexpr (!kSame) {
      Cf.resize(kQueryTile * pl.blk);
      xq.resize(kQueryTile * n);
      Xb.resize(pl.blk * n);
    }
    const Acc u = std::sqrt(Acc(n)) * std::ldexp(Acc(1), -24);
    for (int64_t i = 0; i < nq; ++i) {
      xx[i] = od_sqnorm<T, Acc>(x + (q0 + i) * n, n);
      s[i] = Acc(sp[q0 + i]);
      const Acc g = Acc(gp[q0 + i]);
      inv2g2[i] = Acc(0.5) / (g * g);
      rowfac[i] = s[i] / (g * g) * u * std::sqrt(xx[i]);
    }
  }

  // Makes training rows j0 .. j0+cnt the current block (squared norms now, Acc copy on demand).
  void load_block(int64_t j0_, int64_t cnt_) {
    j0 = j0_;
    cnt = cnt_;
    Acc mx = 0;
    for (int64_t j = 0; j < cnt; ++j) {
      XX[j] = od_sqnorm<T, Acc>(X + (j0 + j) * n, n);
      mx = std::max(mx, XX[j]);
    }
    Xmax = std::sqrt(mx);
    Xb_ready = false;
  }

  // Cross terms <x_i, X_j> of query rows ib .. ib+rows (chunk-relative) against the current
  // block: into Cf (float) or C (double), row-major with leading dimension cnt.
  void cross(int64_t ib, int64_t rows) {
    const T* xr = x + (q0 + ib) * n;
    tile_fp64 = kSame;
    for (int64_t r = 0; r < rows && !tile_fp64; ++r)
      tile_fp64 = rowfac[ib + r] * Xmax > kCrossTol;
    if (!tile_fp64) {
      mm_into(view2d(Cf.data(), rows, cnt, cnt), view2d(xr, rows, n, n),
              view2d(X + j0 * n, cnt, n, n).t());
      return;
    }
    const Acc* xa;
    const Acc* Xa;
    if constexpr (kSame) {
      xa = xr;
      Xa = X + j0 * n;
    } else {
      std::copy(xr, xr + rows * n, xq.begin());
      if (!Xb_ready) std::copy(X + j0 * n, X + (j0 + cnt) * n, Xb.begin());
      Xb_ready = true;
      xa = xq.data();
      Xa = Xb.data();
    }
    mm_into(view2d(C.data(), rows, cnt, cnt), view2d(xa, rows, n, n), view2d(Xa, cnt, n, n).t());
  }

  // The tile walk both passes share: for every block of training rows in [jb0, jb1) (made
  // current) and every tile of at most kQueryTile of the nq queries (cross terms computed), calls
  // tile(jb, ib, rows).
  template <typename F>
  void for_each_tile(const OdPlan& pl, int64_t jb0, int64_t jb1, int64_t nq, F&& tile) {
    for (int64_t jb = jb0; jb < jb1; jb += pl.blk) {
      load_block(jb, std::min(pl.blk, jb1 - jb));
      for (int64_t ib = 0; ib < nq; ib += kQueryTile) {
        const int64_t rows = std::min(kQueryTile, nq - ib);
        cross(ib, rows);
        tile(jb, ib, rows);
      }
    }
  }

  // Logits of tile row r (query ib + r) after cross(); returns their maximum.
  Acc row_logits(int64_t ib, int64_t r) {
    const int64_t i = ib + r;
    Acc* l = C.data() + r * cnt;
    if (tile_fp64)
      return od_row_logits<Acc, Acc>(l, l, cnt, XX.data(), xx[i], s[i], inv2g2[i]);
    return od_row_logits<T, Acc>(Cf.data() + r * cnt, l, cnt, XX.data(), xx[i], s[i], inv2g2[i]);
  }
};

// Forward of one work item: queries [q0, q1) against training rows [j0, j1). Leaves the
// unnormalised state: yacc[i] = sum_j exp(l_ij - m_i) X_j, l_i = sum_j exp(l_ij - m_i).
template <typename T>
void forward_item(const T* x, const T* X, const T* sp, const T* gp, const OdSizes& z,
                  const OdPlan& pl, int64_t q0, int64_t q1, int64_t j0, int64_t j1, T* yacc,
                  Acc* m, Acc* l) {
  const int64_t nq = q1 - q0, n = z.n;
  OdScratch<T> sc(pl, x, X, sp, gp, q0, nq, n);
  std::fill(yacc, yacc + nq * n, T(0));
  std::fill(m, m + nq, -std::numeric_limits<Acc>::infinity());
  std::fill(l, l + nq, Acc(0));
  sc.for_each_tile(pl, j0, j1, nq, [&](int64_t jb, int64_t ib, int64_t rows) {
    const int64_t cnt = sc.cnt;
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = ib + r;
      const Acc bm = sc.row_logits(ib, r);
      m[i] = od_online_rescale(m[i], bm, &l[i], yacc + i * n, n);
      const Acc ps = od_row_exp(sc.C.data() + r * cnt, cnt, m[i], sc.P.data() + r * cnt);
      l[i] += ps;
      any |= ps > 0;
    }
    // At small noise most tiles lie far below the running maxima: every weight underflows.
    if (!any) return;
    view2d(yacc + ib * n, rows, n, n)
        .addmm_(view2d(sc.P.data(), rows, cnt, cnt), view2d(X + jb * n, cnt, n, n));
  });
}

std::tuple<at::Tensor, at::Tensor> optimal_denoiser_cpu(const at::Tensor& x, const at::Tensor& X,
                                                        const at::Tensor& s,
                                                        const at::Tensor& gamma, int64_t block) {
  constexpr const char* op = "optimal_denoiser";
  TORCH_CHECK(block >= 1, op, ": block must be >= 1, got ", block);
  int shift = 0;
  OdSizes z = check_od(x, X, s, gamma, op, &shift);
  if (shift != 0) {  // data far from unit scale: the same math on x, X, gamma scaled by 2^-shift
    auto [ys, lse] = optimal_denoiser_cpu(times_pow2(x, -shift), times_pow2(X, -shift), s,
                                          times_pow2(gamma, -shift), block);
    return {times_pow2(ys, shift), lse};
  }
  auto y = at::empty_like(x);
  auto lse = at::empty({z.B}, x.options().dtype(at::kDouble));  // double for every input type
  if (z.B == 0) return {y, lse};
  const OdPlan pl = plan_for(z, block);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "optimal_denoiser_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* Xp = X.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* gp = gamma.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    double* lp = lse.data_ptr<double>();
    // Partial states, [splits, B, n] and [splits, B]; with one split the state is y itself.
    std::vector<scalar_t> ypart(pl.splits > 1 ? pl.splits * z.B * z.n : 0);
    std::vector<Acc> mpart(pl.splits * z.B), lpart(pl.splits * z.B);
    at::parallel_for(0, pl.items(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t c = it / pl.splits, sp_ = it % pl.splits;
        const int64_t q0 = pl.q_begin(c, z.B), q1 = pl.q_begin(c + 1, z.B);
        const int64_t off = sp_ * z.B + q0;
        scalar_t* yacc = pl.splits > 1 ? ypart.data() + off * z.n : yp + q0 * z.n;
        forward_item<scalar_t>(xp, Xp, sp, gp, z, pl, q0, q1, pl.j_begin(sp_, z.N),
                               pl.j_begin(sp_ + 1, z.N), yacc, mpart.data() + off,
                               lpart.data() + off);
      }
    });
    // Merge the splits (log-sum-exp) and normalise: y = yacc / l, lse = m + log l.
    at::parallel_for(0, z.B, 256, [&](int64_t begin, int64_t end) {
      std::vector<Acc> acc(z.n);
      for (int64_t b = begin; b < end; ++b) {
        Acc M = -std::numeric_limits<Acc>::infinity();
        for (int64_t k = 0; k < pl.splits; ++k) M = std::max(M, mpart[k * z.B + b]);
        Acc L = 0;
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (int64_t k = 0; k < pl.splits; ++k) {
          const Acc w = std::exp(mpart[k * z.B + b] - M);
          L += w * lpart[k * z.B + b];
          const scalar_t* src =
              pl.splits > 1 ? ypart.data() + (k * z.B + b) * z.n : yp + b * z.n;
          for (int64_t t = 0; t < z.n; ++t) acc[t] += w * Acc(src[t]);
        }
        // L >= 1: the maximum logit contributes exp(0) to its split.
        for (int64_t t = 0; t < z.n; ++t) yp[b * z.n + t] = static_cast<scalar_t>(acc[t] / L);
        lp[b] = M + std::log(L);
      }
    });
    TORCH_CHECK(std::all_of(lp, lp + z.B, [](double v) { return std::isfinite(v); }), op,
                kOdLseNotFinite);
  });
  return {y, lse};
}

// Backward of one work item: accumulates acc[i] = sum_j q_ij X_j, qsum[i], wsum[i] (see
// od_backward_finish) for queries [q0, q1) over training rows [j0, j1); sets bad[i] when a logit
// exceeds the saved lse by more than its rounding.
template <typename T>
void backward_item(const T* gyp, const T* x, const T* X, const T* sp, const T* gp, const T* y,
                   const double* lsep, const OdSizes& z, const OdPlan& pl, int64_t q0, int64_t q1,
                   int64_t j0, int64_t j1, T* acc, Acc* qsum, Acc* wsum, char* bad) {
  const int64_t nq = q1 - q0, n = z.n;
  OdScratch<T> sc(pl, x, X, sp, gp, q0, nq, n);
  std::vector<T> gy(nq), W(kQueryTile * pl.blk);  // W: weights exp(l - lse) of a tile
  for (int64_t i = 0; i < nq; ++i)
    gy[i] = static_cast<T>(od_dot<T, Acc>(gyp + (q0 + i) * n, y + (q0 + i) * n, n));
  std::fill(acc, acc + nq * n, T(0));
  std::fill(qsum, qsum + nq, Acc(0));
  std::fill(wsum, wsum + nq, Acc(0));
  sc.for_each_tile(pl, j0, j1, nq, [&](int64_t jb, int64_t ib, int64_t rows) {
    const int64_t cnt = sc.cnt;
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = ib + r;
      const Acc lse_i = Acc(lsep[q0 + i]);
      // lse >= every logit up to its own rounding; more means lse belongs to other inputs.
      if (od_lse_exceeded<double, Acc>(sc.row_logits(ib, r), lse_i)) bad[i] = 1;
      const Acc ws = od_row_exp(sc.C.data() + r * cnt, cnt, lse_i, W.data() + r * cnt);
      wsum[i] += ws;
      any |= ws > 0;
    }
    if (!any) return;  // every weight of the tile underflows (small noise)
    const auto Xt = view2d(X + jb * n, cnt, n, n);
    auto A = view2d(sc.P.data(), rows, cnt, cnt);  // a_ij = <g_i, X_j>, then q_ij
    mm_into(A, view2d(gyp + (q0 + ib) * n, rows, n, n), Xt.t());
    for (int64_t r = 0; r < rows; ++r)
      qsum[ib + r] +=
          od_row_coef<T, Acc>(W.data() + r * cnt, sc.P.data() + r * cnt, cnt, gy[ib + r]);
    view2d(acc + ib * n, rows, n, n).addmm_(A, Xt);
  });
}

at::Tensor optimal_denoiser_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                         const at::Tensor& X, const at::Tensor& s,
                                         const at::Tensor& gamma, const at::Tensor& y,
                                         const at::Tensor& lse) {
  constexpr const char* op = "optimal_denoiser_backward";
  int shift = 0;
  OdSizes z = check_od(x, X, s, gamma, op, &shift);
  check_od_backward_args(grad_y, y, lse, x, z, op);
  check_finite(lse, op, "lse");
  if (shift != 0)  // as the forward did; lse and dx do not change with the scale
    return optimal_denoiser_backward_cpu(grad_y, times_pow2(x, -shift), times_pow2(X, -shift), s,
                                         times_pow2(gamma, -shift), times_pow2(y, -shift), lse);
  auto dx = at::empty_like(x);
  if (z.B == 0) return dx;
  const OdPlan pl = plan_for(z, kDefaultBackwardBlock);
  bool inconsistent = false;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "optimal_denoiser_backward_cpu", [&] {
    const scalar_t* gyp = grad_y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* Xp = X.data_ptr<scalar_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* gp = gamma.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const double* lp = lse.data_ptr<double>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    // Partial sums, [splits, B, n] and [splits, B]; with one split acc lives in dx.
    std::vector<scalar_t> apart(pl.splits > 1 ? pl.splits * z.B * z.n : 0);
    std::vector<Acc> qpart(pl.splits * z.B), wpart(pl.splits * z.B);
    std::vector<char> badpart(pl.splits * z.B, 0), bad(z.B, 0);
    at::parallel_for(0, pl.items(), 1, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) {
        const int64_t c = it / pl.splits, sp_ = it % pl.splits;
        const int64_t q0 = pl.q_begin(c, z.B), q1 = pl.q_begin(c + 1, z.B);
        const int64_t off = sp_ * z.B + q0;
        scalar_t* acc = pl.splits > 1 ? apart.data() + off * z.n : dxp + q0 * z.n;
        backward_item<scalar_t>(gyp, xp, Xp, sp, gp, yp, lp, z, pl, q0, q1, pl.j_begin(sp_, z.N),
                                pl.j_begin(sp_ + 1, z.N), acc, qpart.data() + off,
                                wpart.data() + off, badpart.data() + off);
      }
    });
    at::parallel_for(0, z.B, 256, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> acc(z.n);
      for (int64_t b = begin; b < end; ++b) {
        Acc qs = 0, ws = 0;
        bool above = false;
        std::fill(acc.begin(), acc.end(), scalar_t(0));
        for (int64_t k = 0; k < pl.splits; ++k) {
          qs += qpart[k * z.B + b];
          ws += wpart[k * z.B + b];
          above |= badpart[k * z.B + b] != 0;
          const scalar_t* src =
              pl.splits > 1 ? apart.data() + (k * z.B + b) * z.n : dxp + b * z.n;
          for (int64_t t = 0; t < z.n; ++t) acc[t] += src[t];
        }
        bad[b] = above || !(ws > 0);
        const Acc g = Acc(gp[b]);
        od_backward_finish<scalar_t, Acc>(acc.data(), qs, ws, yp + b * z.n, Acc(sp[b]) / (g * g),
                                          dxp + b * z.n, z.n);
      }
    });
    inconsistent = std::any_of(bad.begin(), bad.end(), [](char v) { return v != 0; });
  });
  TORCH_CHECK(!inconsistent, op, kOdLseInconsistent);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(molrg, CPU, m) {
  m.impl("optimal_denoiser", &optimal_denoiser_cpu);
  m.impl("optimal_denoiser_backward", &optimal_denoiser_backward_cpu);
}

}  // namespace molrg
