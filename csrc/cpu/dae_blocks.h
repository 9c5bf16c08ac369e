// Sample-blocked CPU kernels of the multi-subspace denoiser and of the fused training step
// (host only, torch-free). Same math as kernels/subspace_dae.h and kernels/train_step.h; the
// samples of a block (kBlock of them, one instance) go through the register-tiled products of
// tiles.h against packed basis panels, and only the O(K dm) per-sample soft-max math is done
// sample by sample (with the shared kernels/ functions).
//
// Packed panels of one instance (pack_instance), w = padded width, np = n padded to the width:
//   full panel       Uf [n, Dp]  column k*dm + j = U_k[:, j] (0 for j >= d_k and past K*dm)
//                    UfT [K*dm, np] its transpose
//   component panels Uc_k [n, dW] the d_k columns of U_k, UcT_k [dm, np] its transpose
// Soft mode uses the full panel (every component is active). Hard mode uses the full panel only
// for the assignment; a block's samples are then grouped by component and each group runs
// against its own component panel, so inactive components cost nothing.
// Gradient accumulators of one instance: the full layout [n, Dp] followed by the component
// layout [K, n, dW]; unpack_grad adds both into dU [K, n, dm].
#pragma once

#include <vector>

#include "../kernels/series_math.h"
#include "../kernels/subspace_dae.h"
#include "../kernels/train_step.h"
#include "philox_lanes.h"
#include "tiles.h"

namespace molrg::cpu {

using kernels::kHard;
using kernels::kSoft;

constexpr int kBlock = 64;  // samples per block: x, y and the block buffers stay in L1

struct PanelGeom {
  int n, K, dm, np, D, Dp, dW;
  int64_t full_size() const { return (int64_t)n * Dp + (int64_t)D * np; }
  int64_t comp_stride() const { return (int64_t)n * dW + (int64_t)dm * np; }
  int64_t size() const { return full_size() + K * comp_stride(); }
  int64_t acc_size() const { return (int64_t)n * Dp + (int64_t)K * n * dW; }
};

template <typename T>
PanelGeom panel_geom(int n, int K, int dm) {
  PanelGeom g;
  g.n = n;
  g.K = K;
  g.dm = dm;
  g.np = round_up_vec<T>(n);
  g.D = K * dm;
  g.Dp = round_up_vec<T>(g.D);
  g.dW = round_up_vec<T>(dm);
  return g;
}

template <typename T>
struct Panels {  // views into one instance's packed panels
  const T* base;
  PanelGeom g;
  const T* Uf() const { return base; }
  const T* UfT() const { return base + (int64_t)g.n * g.Dp; }
  const T* Uc(int k) const { return base + g.full_size() + k * g.comp_stride(); }
  const T* UcT(int k) const { return Uc(k) + (int64_t)g.n * g.dW; }
};

// Pack U [K, n, dm] of one instance into out [g.size()].
template <typename T>
void pack_instance(const T* U, const PanelGeom& g, const int32_t* dims, T* out) {
  std::fill(out, out + g.size(), T(0));
  T* Uf = out;
  T* UfT = out + (int64_t)g.n * g.Dp;
  for (int k = 0; k < g.K; ++k) {
    T* Uc = out + g.full_size() + k * g.comp_stride();
    T* UcT = Uc + (int64_t)g.n * g.dW;
    for (int i = 0; i < g.n; ++i)
      for (int j = 0; j < dims[k]; ++j) {
        const T v = U[((int64_t)k * g.n + i) * g.dm + j];
        Uf[(int64_t)i * g.Dp + k * g.dm + j] = v;
        UfT[(int64_t)(k * g.dm + j) * g.np + i] = v;
        Uc[(int64_t)i * g.dW + j] = v;
        UcT[(int64_t)j * g.np + i] = v;
      }
  }
}

// dU [K, n, dm] = (full + component accumulators), zero in the padded columns.
template <typename T>
void unpack_grad(const T* acc, const PanelGeom& g, const int32_t* dims, T* dU) {
  const T* af = acc;
  for (int k = 0; k < g.K; ++k) {
    const T* ac = acc + (int64_t)g.n * g.Dp + (int64_t)k * g.n * g.dW;
    for (int i = 0; i < g.n; ++i)
      for (int j = 0; j < g.dm; ++j)
        dU[((int64_t)k * g.n + i) * g.dm + j] =
            j < dims[k] ? af[(int64_t)i * g.Dp + k * g.dm + j] + ac[(int64_t)i * g.dW + j] : T(0);
  }
}

// Per-thread buffers for one block.
template <typename T>
struct BlockScratch {
  std::vector<T> P, C, R, dP, xt, y, z, sq, dlogit, w;
  std::vector<const T*> rowA, rowB, rowC;
  std::vector<T*> rowY;
  std::vector<int> comp, sel, pos, start;
  std::vector<uint32_t> idx, lev;
  explicit BlockScratch(const PanelGeom& g) {
    const int64_t wide = (int64_t)kBlock * std::max(g.Dp, g.dW);
    P.assign(wide, T(0));
    C.assign(wide, T(0));
    R.assign(wide, T(0));
    dP.assign(wide, T(0));
    xt.assign((int64_t)kBlock * g.n, T(0));
    y.assign((int64_t)kBlock * g.n, T(0));
    z.assign((int64_t)kBlock * g.n, T(0));
    sq.assign(g.K, T(0));
    dlogit.assign(g.K, T(0));
    w.assign((int64_t)kBlock * g.K, T(0));
    rowA.resize(kBlock);
    rowB.resize(kBlock);
    rowC.resize(kBlock);
    rowY.resize(kBlock);
    comp.resize(kBlock);
    sel.resize(kBlock);
    pos.resize(kBlock);
    start.resize(g.K + 1);
    idx.resize(kBlock);
    lev.resize(kBlock);
  }
  // Order the S samples by component: sel = samples of component 0, then 1, ... (each group
  // in sample order), start[k] = first position of group k, pos[t] = position of sample t.
  void sort_by_component(int S, int K) {
    int u = 0;
    for (int k = 0; k < K; ++k) {
      start[k] = u;
      for (int t = 0; t < S; ++t)
        if (comp[t] == k) sel[u++] = t;
    }
    start[K] = u;
    for (int v = 0; v < S; ++v) pos[sel[v]] = v;
  }
  // Copy rows t < S of src (row length n) to dst in component order (dst row pos[t]): a
  // sequential pass over src.
  void gather_sorted(const T* src, int S, int n, T* dst) const {
    for (int t = 0; t < S; ++t)
      std::copy(src + (int64_t)t * n, src + (int64_t)(t + 1) * n, dst + (int64_t)pos[t] * n);
  }
  // The inverse: row t of dst = row pos[t] of the component-ordered src.
  void scatter_sorted(const T* src, int S, int n, T* dst) const {
    for (int t = 0; t < S; ++t)
      std::copy(src + (int64_t)pos[t] * n, src + (int64_t)(pos[t] + 1) * n, dst + (int64_t)t * n);
  }
};

// ||P_k||^2 of one packed projection row (padded entries are zero).
template <typename T>
inline void block_sq(const T* Prow, const PanelGeom& g, T* sq) {
  for (int k = 0; k < g.K; ++k) {
    T s = T(0);
    for (int j = 0; j < g.dm; ++j) s += Prow[k * g.dm + j] * Prow[k * g.dm + j];
    sq[k] = s;
  }
}

// Hard assignment argmax_k ||U_k^T x||^2 (ties to the lowest k) of S consecutive samples.
template <typename T>
void assign_block(const T* x, int S, const Panels<T>& pn, int64_t* out, BlockScratch<T>& s) {
  const PanelGeom& g = pn.g;
  for (int t = 0; t < S; ++t) s.rowA[t] = x + (int64_t)t * g.n;
  project(s.rowA.data(), S, g.n, pn.Uf(), g.Dp, s.P.data(), g.Dp);
  for (int t = 0; t < S; ++t) {
    block_sq(s.P.data() + (int64_t)t * g.Dp, g, s.sq.data());
    out[t] = kernels::dae_argmax(s.sq.data(), g.K);
  }
}

// Soft-max over k of S rows of logits lw [S, K], in place (max-subtracted, as
// kernels::dae_weights): the exponentials of the whole block in one vectorised loop.
template <typename T>
inline void block_softmax(T* lw, int S, int K) {
  for (int t = 0; t < S; ++t) {
    T* l = lw + (int64_t)t * K;
    T mx = l[0];
    for (int k = 1; k < K; ++k) mx = l[k] > mx ? l[k] : mx;
    for (int k = 0; k < K; ++k) l[k] -= mx;
  }
  const int64_t SK = (int64_t)S * K;
#if defined(_OPENMP)
#pragma omp simd
#endif
  for (int64_t e = 0; e < SK; ++e) lw[e] = kernels::sm_exp<T>(lw[e]);
  for (int t = 0; t < S; ++t) {
    T* l = lw + (int64_t)t * K;
    T total = T(0);
    for (int k = 0; k < K; ++k) total += l[k];
    const T inv = T(1) / total;
    for (int k = 0; k < K; ++k) l[k] *= inv;
  }
}

// Soft-mode backward math of one sample on full-panel rows (same formulas as
// kernels::dae_dP_from_r): R = U^T g and P = U^T x, both exactly zero in the padded columns
// because the panel is, so no masks are needed; components with w_k = 0 get dP_k = 0 through
// their zero coefficients. Writes dP [K*dm], dlogit [K] and returns dc, dphi.
template <typename T>
inline void soft_dP_dense(const T* R, const T* P, const T* w, T c, T phi, int K, int dm, T* dP,
                          T* dlogit, T* dc, T* dphi) {
  T dcs = T(0);
  for (int k = 0; k < K; ++k) {
    T rp = T(0);
    for (int j = 0; j < dm; ++j) rp += R[k * dm + j] * P[k * dm + j];
    dlogit[k] = rp;
    dcs += w[k] * rp;
  }
  const T hbar = c * dcs;
  T dph = T(0);
  for (int k = 0; k < K; ++k) {
    const T dl = w[k] * (c * dlogit[k] - hbar);
    dlogit[k] = dl;
    T sq = T(0);
    for (int j = 0; j < dm; ++j) sq += P[k * dm + j] * P[k * dm + j];
    dph += dl * sq;
    const T a = c * w[k], b = T(2) * phi * dl;
    for (int j = 0; j < dm; ++j) dP[k * dm + j] = a * R[k * dm + j] + b * P[k * dm + j];
  }
  *dc = dcs;
  *dphi = dph;
}

// Forward of S <= kBlock consecutive samples of one instance: y, proj [S, K*dm], w [S, K].
template <typename T>
void dae_forward_block(const T* x, int S, const Panels<T>& pn, const int32_t* dims, const T* c,
                       const T* phi, const T* bias, const int64_t* assign, int mode, T* proj,
                       T* w, T* y, BlockScratch<T>& s) {
  const PanelGeom& g = pn.g;
  const int n = g.n, K = g.K, dm = g.dm, D = g.D, Dp = g.Dp;
  for (int t = 0; t < S; ++t) {
    s.rowA[t] = x + (int64_t)t * n;
    s.rowY[t] = y + (int64_t)t * n;
  }
  project(s.rowA.data(), S, n, pn.Uf(), Dp, s.P.data(), Dp);
  for (int t = 0; t < S; ++t) {
    const T* Pt = s.P.data() + (int64_t)t * Dp;
    T* wt = w + (int64_t)t * K;
    block_sq(Pt, g, s.sq.data());
    std::copy(Pt, Pt + D, proj + (int64_t)t * D);
    if (mode == kSoft) {  // logits now, weights for the whole block below
      for (int k = 0; k < K; ++k)
        wt[k] = phi[t] * s.sq[k] + (bias ? bias[(int64_t)t * K + k] : T(0));
    } else {
      const int k0 = assign ? (int)assign[t] : kernels::dae_argmax(s.sq.data(), K);
      for (int k = 0; k < K; ++k) wt[k] = k == k0 ? T(1) : T(0);
      s.comp[t] = k0;
    }
  }
  if (mode == kSoft) {
    block_softmax(w, S, K);
    for (int t = 0; t < S; ++t) {
      const T* Pt = s.P.data() + (int64_t)t * Dp;
      const T* wt = w + (int64_t)t * K;
      T* Ct = s.C.data() + (int64_t)t * Dp;
      for (int k = 0; k < K; ++k)
        for (int j = 0; j < dm; ++j) Ct[k * dm + j] = c[t] * wt[k] * Pt[k * dm + j];
    }
    expand(s.C.data(), Dp, S, D, pn.UfT(), n, s.rowY.data());
    return;
  }
  // hard: one group per component (the x rows were read in order by the projection above)
  const int dW = g.dW;
  s.sort_by_component(S, K);
  for (int k = 0; k < K; ++k) {
    const int u0 = s.start[k], cnt = s.start[k + 1] - u0;
    if (cnt == 0) continue;
    for (int u = 0; u < cnt; ++u) {
      const int t = s.sel[u0 + u];
      const T a = c[t] * w[(int64_t)t * K + k];
      const T* Pt = s.P.data() + (int64_t)t * Dp + k * dm;
      T* Cu = s.C.data() + (int64_t)u * dW;
      for (int j = 0; j < dW; ++j) Cu[j] = j < dims[k] ? a * Pt[j] : T(0);
      s.rowY[u] = y + (int64_t)t * n;
    }
    expand(s.C.data(), dW, cnt, dims[k], pn.UcT(k), n, s.rowY.data());
  }
}

// Backward of S consecutive samples of one instance: dx [S, n] (if non-null), dc, dphi, dbias,
// and the instance's gradient accumulator acc [g.acc_size()] (if non-null).
template <typename T>
void dae_backward_block(const T* gy, const T* x, int S, const Panels<T>& pn, const int32_t* dims,
                        const T* c, const T* phi, const T* proj, const T* w, int mode, T* dx,
                        T* dc, T* dphi, T* dbias, T* acc, BlockScratch<T>& s) {
  const PanelGeom& g = pn.g;
  const int n = g.n, K = g.K, dm = g.dm, D = g.D, Dp = g.Dp, dW = g.dW;
  if (mode == kSoft) {
    for (int t = 0; t < S; ++t) {
      s.rowA[t] = gy + (int64_t)t * n;
      s.rowB[t] = x + (int64_t)t * n;
      if (dx) s.rowY[t] = dx + (int64_t)t * n;
    }
    project(s.rowA.data(), S, n, pn.Uf(), Dp, s.R.data(), Dp);
    for (int t = 0; t < S; ++t) {
      T* dPt = s.dP.data() + (int64_t)t * Dp;
      const T* Pt = proj + (int64_t)t * D;
      const T* wt = w + (int64_t)t * K;
      soft_dP_dense<T>(s.R.data() + (int64_t)t * Dp, Pt, wt, c[t], phi[t], K, dm, dPt,
                       dbias + (int64_t)t * K, dc + t, dphi + t);
      if (acc) {
        T* Ct = s.C.data() + (int64_t)t * Dp;
        for (int k = 0; k < K; ++k)
          for (int j = 0; j < dm; ++j) Ct[k * dm + j] = c[t] * wt[k] * Pt[k * dm + j];
      }
    }
    if (dx) expand(s.dP.data(), Dp, S, D, pn.UfT(), n, s.rowY.data());
    if (acc) outer(s.rowB.data(), s.dP.data(), s.rowA.data(), s.C.data(), Dp, S, n, acc, Dp);
    return;
  }
  // hard: one group per component. Visiting gy, x (and dx) rows in that scattered order defeats
  // the hardware prefetcher on data streamed from memory, so the block's rows are copied once,
  // sequentially, into component-ordered buffers (s.y: gy, s.xt: x; s.z: dx, copied back).
  for (int t = 0; t < S; ++t) {
    s.comp[t] = kernels::dae_argmax(w + (int64_t)t * K, K);  // w is one-hot
    dphi[t] = T(0);
    for (int k = 0; k < K; ++k) dbias[(int64_t)t * K + k] = T(0);
  }
  s.sort_by_component(S, K);
  s.gather_sorted(gy, S, n, s.y.data());
  if (acc) s.gather_sorted(x, S, n, s.xt.data());
  for (int k = 0; k < K; ++k) {
    const int u0 = s.start[k], cnt = s.start[k + 1] - u0;
    if (cnt == 0) continue;
    const int dk = dims[k];
    for (int u = 0; u < cnt; ++u) {
      s.rowA[u] = s.y.data() + (int64_t)(u0 + u) * n;
      s.rowB[u] = s.xt.data() + (int64_t)(u0 + u) * n;
      s.rowY[u] = s.z.data() + (int64_t)(u0 + u) * n;
    }
    project(s.rowA.data(), cnt, n, pn.Uc(k), dW, s.R.data(), dW);
    for (int u = 0; u < cnt; ++u) {
      const int t = s.sel[u0 + u];
      const T wk = w[(int64_t)t * K + k], a = c[t] * wk;
      const T* Pt = proj + (int64_t)t * D + k * dm;
      const T* Ru = s.R.data() + (int64_t)u * dW;
      T* dPu = s.dP.data() + (int64_t)u * dW;
      T* Cu = s.C.data() + (int64_t)u * dW;
      T rp = T(0);
      for (int j = 0; j < dk; ++j) rp += Ru[j] * Pt[j];
      dc[t] = wk * rp;
      for (int j = 0; j < dW; ++j) {
        dPu[j] = j < dk ? a * Ru[j] : T(0);
        Cu[j] = j < dk ? a * Pt[j] : T(0);
      }
    }
    if (dx) expand(s.dP.data(), dW, cnt, dk, pn.UcT(k), n, s.rowY.data());
    if (acc) {
      T* acc_k = acc + (int64_t)n * Dp + (int64_t)k * n * dW;
      outer(s.rowB.data(), s.dP.data(), s.rowA.data(), s.C.data(), dW, cnt, n, acc_k, dW);
    }
  }
  if (dx) s.scatter_sorted(s.z.data(), S, n, dx);
}

// Fused training step on slots m0 .. m0 + S - 1 of instance p (kernels/train_step.h math):
// writes the per-slot loss lambda ||x_theta - x_i||^2 and accumulates d/dU of the mean loss
// (scaled by inv_M) into acc.
template <typename T>
void train_block(const T* X, uint32_t N, int S, uint32_t m0, uint32_t p, const Panels<T>& pn,
                 const int32_t* dims, const T* levels, const T* level_bias, uint32_t L, int mode,
                 uint64_t seed, uint32_t step, T inv_M, T* loss, T* acc, BlockScratch<T>& s) {
  using namespace kernels;
  const PanelGeom& g = pn.g;
  const int n = g.n, K = g.K, dm = g.dm, D = g.D, Dp = g.Dp, dW = g.dW;
  philox_index_level_slots(seed, step, p, m0, S, N, L, s.idx.data(), s.lev.data());
  // The drawn rows of X are scattered over the training set: start fetching them now, the normals
  // take long enough to hide the latency.
  for (int t = 0; t < S; ++t) {
    const char* row = (const char*)(X + (int64_t)s.idx[t] * n);
    for (int64_t off = 0; off < (int64_t)n * (int64_t)sizeof(T); off += 64)
      __builtin_prefetch(row + off);
  }
  philox_normals_slots<T>(seed, step, p, m0, S, n, s.xt.data());
  for (int t = 0; t < S; ++t) {
    const T* x0 = X + (int64_t)s.idx[t] * n;
    const T* lv = levels + (int64_t)s.lev[t] * kLvCols;
    const T sc = lv[kLvS], gm = lv[kLvGamma];
    T* xt = s.xt.data() + (int64_t)t * n;
    for (int e = 0; e < n; ++e) xt[e] = sc * x0[e] + gm * xt[e];
    s.rowA[t] = x0;
  }
  // Loss of row t and g = dL/dy in place of y.
  auto loss_and_grad = [&](int t, T* yt) {
    const T* x0 = s.rowA[t];
    const T lam = levels[(int64_t)s.lev[t] * kLvCols + kLvLambda];
    T err = T(0);
    for (int e = 0; e < n; ++e) {
      const T d = yt[e] - x0[e];
      err += d * d;
    }
    const T gscale = T(2) * lam * inv_M;
    for (int e = 0; e < n; ++e) yt[e] = gscale * (yt[e] - x0[e]);
    loss[t] = lam * err;
  };
  if (mode == kSoft) {
    for (int t = 0; t < S; ++t) {
      s.rowB[t] = s.xt.data() + (int64_t)t * n;
      s.rowY[t] = s.y.data() + (int64_t)t * n;
      s.rowC[t] = s.rowY[t];
    }
    project(s.rowB.data(), S, n, pn.Uf(), Dp, s.P.data(), Dp);
    for (int t = 0; t < S; ++t) {
      const T* lv = levels + (int64_t)s.lev[t] * kLvCols;
      const T* lb = level_bias ? level_bias + (int64_t)s.lev[t] * K : nullptr;
      T* wt = s.w.data() + (int64_t)t * K;
      block_sq(s.P.data() + (int64_t)t * Dp, g, s.sq.data());
      for (int k = 0; k < K; ++k) wt[k] = lv[kLvPhi] * s.sq[k] + (lb ? lb[k] : T(0));
    }
    block_softmax(s.w.data(), S, K);
    for (int t = 0; t < S; ++t) {
      const T* lv = levels + (int64_t)s.lev[t] * kLvCols;
      const T* Pt = s.P.data() + (int64_t)t * Dp;
      const T* wt = s.w.data() + (int64_t)t * K;
      T* Ct = s.C.data() + (int64_t)t * Dp;
      for (int k = 0; k < K; ++k)
        for (int j = 0; j < dm; ++j) Ct[k * dm + j] = lv[kLvC] * wt[k] * Pt[k * dm + j];
    }
    expand(s.C.data(), Dp, S, D, pn.UfT(), n, s.rowY.data());
    for (int t = 0; t < S; ++t) loss_and_grad(t, s.rowY[t]);
    project(s.rowC.data(), S, n, pn.Uf(), Dp, s.R.data(), Dp);
    for (int t = 0; t < S; ++t) {
      const T* lv = levels + (int64_t)s.lev[t] * kLvCols;
      T dc, dphi;
      soft_dP_dense<T>(s.R.data() + (int64_t)t * Dp, s.P.data() + (int64_t)t * Dp,
                       s.w.data() + (int64_t)t * K, lv[kLvC], lv[kLvPhi], K, dm,
                       s.dP.data() + (int64_t)t * Dp, s.dlogit.data(), &dc, &dphi);
    }
    outer(s.rowB.data(), s.dP.data(), s.rowC.data(), s.C.data(), Dp, S, n, acc, Dp);
    return;
  }
  // hard: the component of the clean sample (eq. (17)), then one group per component
  project(s.rowA.data(), S, n, pn.Uf(), Dp, s.P.data(), Dp);
  for (int t = 0; t < S; ++t) {
    block_sq(s.P.data() + (int64_t)t * Dp, g, s.sq.data());
    s.comp[t] = dae_argmax(s.sq.data(), K);
  }
  s.sort_by_component(S, K);
  for (int k = 0; k < K; ++k) {
    const int u0 = s.start[k], cnt = s.start[k + 1] - u0;
    if (cnt == 0) continue;
    const int* sel = s.sel.data() + u0;
    const int dk = dims[k];
    std::vector<const T*>& xrows = s.rowB;
    for (int u = 0; u < cnt; ++u) {
      const int t = sel[u];
      xrows[u] = s.xt.data() + (int64_t)t * n;
      s.rowY[u] = s.y.data() + (int64_t)t * n;
      s.rowC[u] = s.rowY[u];
    }
    project(xrows.data(), cnt, n, pn.Uc(k), dW, s.P.data(), dW);
    for (int u = 0; u < cnt; ++u) {
      const T cl = levels[(int64_t)s.lev[sel[u]] * kLvCols + kLvC];
      const T* Pu = s.P.data() + (int64_t)u * dW;
      T* Cu = s.C.data() + (int64_t)u * dW;
      for (int j = 0; j < dW; ++j) Cu[j] = j < dk ? cl * Pu[j] : T(0);
    }
    expand(s.C.data(), dW, cnt, dk, pn.UcT(k), n, s.rowY.data());
    for (int u = 0; u < cnt; ++u) loss_and_grad(sel[u], s.rowY[u]);
    project(s.rowC.data(), cnt, n, pn.Uc(k), dW, s.R.data(), dW);
    for (int u = 0; u < cnt; ++u) {
      const T cl = levels[(int64_t)s.lev[sel[u]] * kLvCols + kLvC];
      const T* Ru = s.R.data() + (int64_t)u * dW;
      T* dPu = s.dP.data() + (int64_t)u * dW;
      for (int j = 0; j < dW; ++j) dPu[j] = j < dk ? cl * Ru[j] : T(0);
    }
    T* acc_k = acc + (int64_t)n * Dp + (int64_t)k * n * dW;
    outer(xrows.data(), s.dP.data(), s.rowC.data(), s.C.data(), dW, cnt, n, acc_k, dW);
  }
}

}  // namespace molrg::cpu
