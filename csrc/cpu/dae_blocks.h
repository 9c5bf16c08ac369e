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
//   indicator panels Ind [Dp, Kp]   Ind[k*dm + j, k] = 1 for j < d_k (0 elsewhere)
//                    IndT [Kp, Dp]  its transpose
//   Gram panels      G_k [dW, dW]   U_k^T U_k (0 past d_k); filled only for the hard training step
// The indicators turn the per-component sums and broadcasts of the per-sample math (||P_k||^2,
// <r_k, P_k>, c w_k P_k) into register-tiled products over the whole block: Sums [S, Kp] =
// (A o B) Ind, Spread [S, Dp] = Coef IndT, with the elementwise products vectorised over rows.
// In float with AVX2 or AVX-512 and small panels, the sums come from vector transposes instead
// (comp_sums_transposed), and soft mode runs all of its per-sample math in vector lanes
// (soft_*_lanes_*).
// Soft mode uses the full panel (every component is active). Hard mode uses the full panel only
// for the assignment; a block's samples are then grouped by component and each group runs
// against its own component panel, so inactive components cost nothing.
// Gradient accumulators of one instance, transposed (tiles.h outer): the full layout [D, np]
// (row k*dm + j = d/dU_k[:, j]) followed by the component layout [K, dm, np]; unpack_grad adds
// both into dU [K, n, dm].
#pragma once

#include <type_traits>
#include <utility>
#include <vector>

#include "../kernels/series_math.h"
#include "../kernels/subspace_dae.h"
#include "../kernels/train_step.h"
#include "line_aligned.h"
#include "philox_lanes.h"
#include "tiles.h"

namespace molrg::cpu {

using kernels::kHard;
using kernels::kSoft;

constexpr int kBlock = 64;  // samples per block: x, y and the block buffers stay in L1

struct PanelGeom {
  int n, K, dm, np, D, Dp, dW, Kp;
  int64_t full_size() const { return (int64_t)n * Dp + (int64_t)D * np; }
  int64_t comp_stride() const { return (int64_t)n * dW + (int64_t)dm * np; }
  int64_t ind_offset() const { return full_size() + K * comp_stride(); }
  int64_t gram_offset() const { return ind_offset() + 2 * (int64_t)Dp * Kp; }
  int64_t size() const { return gram_offset() + (int64_t)K * dW * dW; }
  int64_t acc_size() const { return (int64_t)D * np + (int64_t)K * dm * np; }
  int64_t comp_acc_offset(int k) const { return (int64_t)D * np + (int64_t)k * dm * np; }
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
  g.Kp = round_up_vec<T>(K);
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
  const T* Ind() const { return base + g.ind_offset(); }
  const T* IndT() const { return Ind() + (int64_t)g.Dp * g.Kp; }
  const T* Gram(int k) const { return base + g.gram_offset() + (int64_t)k * g.dW * g.dW; }
};

// Pack U [K, n, dm] of one instance into out [g.size()]; the Gram panels stay 0 unless gram.
// Every panel is stored chunked (tiles.h): those the projection reads (Uf, Uc_k, Ind, G_k) by
// kProjectChunk, those the expansion reads (UfT, UcT_k, IndT) by kExpandChunk.
template <typename T>
void pack_instance(const T* U, const PanelGeom& g, const int32_t* dims, T* out, bool gram) {
  std::fill(out, out + g.size(), T(0));
  auto pj = [](int row, int col, int rows, int w) {  // projection panel [rows, w]
    return chunked_offset<T, kProjectChunk>(row, col, rows, w);
  };
  auto ex = [](int row, int col, int rows, int w) {  // expansion panel [rows, w]
    return chunked_offset<T, kExpandChunk>(row, col, rows, w);
  };
  T* Uf = out;
  T* UfT = out + (int64_t)g.n * g.Dp;
  T* Ind = out + g.ind_offset();
  T* IndT = Ind + (int64_t)g.Dp * g.Kp;
  for (int k = 0; k < g.K; ++k)
    for (int j = 0; j < dims[k]; ++j) {
      Ind[pj(k * g.dm + j, k, g.Dp, g.Kp)] = T(1);
      IndT[ex(k, k * g.dm + j, g.Kp, g.Dp)] = T(1);
    }
  // Column `col` of a projection panel [rows, w] is at pj(0, col, rows, w) + row * its chunk's
  // width, and row `row` of an expansion panel [rows, w] runs contiguously within each chunk:
  // the offsets are computed once per column or chunk, not per element (per element, they were
  // most of an instance's packing, itself a few percent of a training step).
  auto put_col = [&](T* panel, int col, int rows, int w, const T* src, int sstride) {
    constexpr int CW = chunk_cols<T, kProjectChunk>();
    const int cw = std::min(CW, w - col / CW * CW);
    T* dst = panel + pj(0, col, rows, w);
    for (int i = 0; i < g.n; ++i) dst[(int64_t)i * cw] = src[(int64_t)i * sstride];
  };
  auto put_row = [&](T* panel, int row, int rows, int w, const T* src, int sstride) {
    constexpr int CW = chunk_cols<T, kExpandChunk>();
    for (int c0 = 0; c0 < g.n; c0 += CW) {
      T* dst = panel + ex(row, c0, rows, w);
      const int end = std::min(g.n, c0 + CW);
      for (int i = c0; i < end; ++i) dst[i - c0] = src[(int64_t)i * sstride];
    }
  };
  for (int k = 0; k < g.K; ++k) {
    T* Uc = out + g.full_size() + k * g.comp_stride();
    T* UcT = Uc + (int64_t)g.n * g.dW;
    for (int j = 0; j < dims[k]; ++j) {
      const T* col = U + (int64_t)k * g.n * g.dm + j;  // U_k[:, j], stride dm
      put_col(Uf, k * g.dm + j, g.n, g.Dp, col, g.dm);
      put_row(UfT, k * g.dm + j, g.D, g.np, col, g.dm);
      put_col(Uc, j, g.n, g.dW, col, g.dm);
      put_row(UcT, j, g.dm, g.np, col, g.dm);
    }
  }
  if (!gram) return;
  // G_k = U_k^T U_k: one register-tiled product of the rows of U_k^T (copied out row-major)
  // against Uc_k, into a row-major [dm, dW], then into the chunked Gram panel [dW, dW].
  std::vector<T> ut((size_t)g.dm * g.n), gk((size_t)g.dm * g.dW);
  std::vector<const T*> rows(g.dm);
  for (int k = 0; k < g.K; ++k) {
    const T* Uc = out + g.full_size() + k * g.comp_stride();
    for (int j = 0; j < dims[k]; ++j) {
      for (int i = 0; i < g.n; ++i) ut[(size_t)j * g.n + i] = U[((int64_t)k * g.n + i) * g.dm + j];
      rows[j] = ut.data() + (size_t)j * g.n;
    }
    project(rows.data(), dims[k], g.n, Uc, g.n, g.dW, gk.data(), g.dW, dims[k]);
    T* G = out + g.gram_offset() + k * g.dW * g.dW;
    for (int a = 0; a < dims[k]; ++a)
      for (int b = 0; b < g.dW; ++b) G[pj(a, b, g.dW, g.dW)] = gk[(size_t)a * g.dW + b];
  }
}

// dU [K, n, dm] = (full + component accumulators), zero in the padded columns.
template <typename T>
void unpack_grad(const T* acc, const PanelGeom& g, const int32_t* dims, T* dU) {
  // Column by column: the accumulators' rows are read contiguously.
  for (int k = 0; k < g.K; ++k) {
    const T* ac = acc + g.comp_acc_offset(k);
    T* dUk = dU + (int64_t)k * g.n * g.dm;
    for (int j = 0; j < g.dm; ++j) {
      const T* full = acc + (int64_t)(k * g.dm + j) * g.np;
      const T* comp = ac + (int64_t)j * g.np;
      if (j < dims[k])
        for (int i = 0; i < g.n; ++i) dUk[(int64_t)i * g.dm + j] = full[i] + comp[i];
      else
        for (int i = 0; i < g.n; ++i) dUk[(int64_t)i * g.dm + j] = T(0);
    }
  }
}

// Per-thread buffers for one block.
template <typename T>
struct BlockScratch {
  line_vector<T> P, C, R, dP, xt, y, w;
  line_vector<T> Q, E, E2, sums, sums2, ca, cb, cs, phis, dlogit;  // per-sample math
  std::vector<const T*> rowA, rowB, rowC, rowQ;
  std::vector<T*> rowY, rowE, rowE2;
  std::vector<int> comp, sel, start;
  std::vector<uint32_t> idx, lev;
  // The next block's draws, whose rows are prefetched during this block (train_block), and the
  // cache lines of a set of rows (list_lines); next_p, next_m0 name that block (next_p = -1:
  // none).
  std::vector<uint32_t> nidx, nlev;
  std::vector<const char*> lines;
  int64_t nlines = 0;  // lines in use
  int ahead_calls = 0;  // next() calls of this thread's last with_ahead (0: none yet)
  int64_t next_p = -1;
  uint32_t next_m0 = 0;
  // One instance's packed panels and gradient accumulators, for callers that pack, run and
  // unpack an instance on the thread that owns it (the training step); sized by them.
  line_vector<T> pan, acc;
  explicit BlockScratch(const PanelGeom& g) {
    const int64_t wide = (int64_t)kBlock * std::max(g.Dp, g.dW);
    P.assign(wide + simd<T>::W, T(0));  // + a vector: the hard-mode copies read whole vectors
    C.assign(wide, T(0));
    R.assign(wide, T(0));
    dP.assign(wide, T(0));
    xt.assign((int64_t)kBlock * g.n, T(0));
    y.assign((int64_t)kBlock * g.n, T(0));
    w.assign((int64_t)kBlock * g.K, T(0));
    Q.assign((int64_t)kBlock * g.Dp, T(0));
    E.assign((int64_t)kBlock * g.Dp, T(0));
    E2.assign((int64_t)kBlock * g.Dp, T(0));
    sums.assign((int64_t)kBlock * g.Kp, T(0));
    sums2.assign((int64_t)kBlock * g.Kp, T(0));
    for (auto* v : {&ca, &cb, &dlogit}) v->assign((int64_t)kBlock * g.K, T(0));
    for (auto* v : {&cs, &phis}) v->assign(kBlock, T(0));
    rowQ.resize(kBlock);
    rowE.resize(kBlock);
    rowE2.resize(kBlock);
    for (int t = 0; t < kBlock; ++t) {
      rowQ[t] = Q.data() + (int64_t)t * g.Dp;
      rowE[t] = E.data() + (int64_t)t * g.Dp;
      rowE2[t] = E2.data() + (int64_t)t * g.Dp;
    }
    rowA.resize(kBlock);
    rowB.resize(kBlock);
    rowC.resize(kBlock);
    rowY.resize(kBlock);
    comp.resize(kBlock);
    sel.resize(kBlock);
    start.resize(g.K + 1);
    idx.resize(kBlock);
    lev.resize(kBlock);
    nidx.resize(kBlock);
    nlev.resize(kBlock);
  }
  // The cache lines of rows X[r[t]], t < S, from the line of a row's first byte to the line of
  // its last one, into lines.
  // Written through a pointer into lines sized for kBlock rows of the most lines a row can span:
  // push_back's capacity test and size update per line were a few percent of train_block.
  void list_lines(const T* X, int n, const uint32_t* r, int S) {
    const int64_t bytes = (int64_t)n * (int64_t)sizeof(T);
    lines.resize((int64_t)kBlock * (bytes / 64 + 2));
    const char** out = lines.data();
    for (int t = 0; t < S; ++t) {
      const char* row = (const char*)(X + (int64_t)r[t] * n);
      const uintptr_t last = (uintptr_t)(row + bytes - 1);
      for (uintptr_t a = (uintptr_t)row & ~(uintptr_t)63; a <= last; a += 64)
        *out++ = (const char*)a;
    }
    nlines = out - lines.data();
  }
  // Loads one word of every cache line of the S drawn rows X[idx[t]], back to back: the first
  // block of a run, whose rows no block before it prefetched. The rows are scattered over a
  // training set larger than the caches; on the project VM a line takes 300-480 ns and a core
  // keeps ~20 misses in flight, so these loads stall the core for about 17 ns per line. The
  // later blocks' rows are prefetched while the block before them draws its normals
  // (train_block).
  void touch_rows(const T* X, int n, int S) {
    list_lines(X, n, idx.data(), S);
    for (int64_t i = 0; i < nlines; ++i) (void)*(const volatile char*)lines[i];
  }
  // Runs f(&pf) (a block), pf's lines (the next block's rows, add_next_block) spread over as
  // many next() calls as this thread's last block made (a block's kernels make about as many tile
  // calls as the block before them); the lines its calls left are issued after it.
  template <typename F>
  void with_ahead(RangePrefetch& pf, F&& f) {
    pf.spread(ahead_calls > 0 ? ahead_calls : 16);
    f(&pf);
    finish_ahead(pf);
  }
  // Issues pf's lines left and keeps its count of next() calls for the next block.
  void finish_ahead(RangePrefetch& pf) {
    pf.finish();
    ahead_calls = pf.calls;
  }
  // Order the S samples by component: sel = samples of component 0, then 1, ... (each group
  // in sample order), start[k] = first position of group k.
  void sort_by_component(int S, int K) {
    int u = 0;
    for (int k = 0; k < K; ++k) {
      start[k] = u;
      for (int t = 0; t < S; ++t) {  // branch-free: the components of a block are random
        sel[u] = t;
        u += comp[t] == k;
      }
    }
    start[K] = u;
  }
};

// Adds to pf the rows of the block that follows the block of S samples at `rows` (rows of n
// values) in an instance of B samples starting at `start`; pf is spread over the block's tiles
// (BlockScratch::with_ahead). The blocked denoiser streams its inputs block by block, with long
// compute between them, and the hardware prefetcher does not keep ahead of it on every machine:
// on the Zen 4 VM (32 MiB L3), fwd+bwd of (48, 2, 6, 65536), paired in the op on two threads,
// prefetching the next block's rows in one burst at a block's start took hard 0.86-0.89, soft
// 0.94-0.98 of the time without. On the Xeon VM that burst cost more than it saved (without it:
// hard 0.937, soft 0.969), as its prefetches waited for free miss buffers.
template <typename T>
inline void add_next_block(RangePrefetch& pf, const T* rows, int64_t start, int S, int64_t B,
                           int64_t n) {
  const int64_t next = std::min<int64_t>(S, B - start - S);
  if (next > 0) pf.add(rows + (int64_t)S * n, next * n * (int64_t)sizeof(T));
}

// Outputs of at least this many bytes are written by non-temporal stores (stream_rows). On the
// Zen 4 VM (1 MiB L2, 32 MiB L3, two threads) they cost 10-20% of the forward at 0.8-1.5 MB of
// output (which the caches would have kept), nothing at 3 MB, and saved time from 6 MB on; fwd+bwd
// of (48, 2, 6, 65536), 12.6 MB of y, paired in the op: hard 0.87, soft 0.95. The cost not
// measured here: a caller that reads the output right away from a large L3 reads it from memory.
#ifndef MOLRG_STREAM_MIN_BYTES
#define MOLRG_STREAM_MIN_BYTES (8 << 20)
#endif
constexpr int64_t kStreamMinBytes = MOLRG_STREAM_MIN_BYTES;

// Whether an output of rows of n values starting at base, `bytes` long in all, is written by
// non-temporal stores (expand's stream): a vector target, rows that are whole 64-byte lines from
// a 64-byte aligned base, and an output too large to be read back from the caches.
template <typename T>
inline bool stream_rows(const T* base, int64_t n, int64_t bytes) {
#if defined(__AVX2__)
  return (reinterpret_cast<uintptr_t>(base) % 64) == 0 && (n * (int64_t)sizeof(T)) % 64 == 0 &&
         bytes >= kStreamMinBytes;
#else
  (void)base, (void)n, (void)bytes;
  return false;
#endif
}

// out[l * ld + j] = z[j * zs + l] for a W x W block (W = simd<T>::W): the 16 x 16 or 8 x 8 vector
// transposes of philox_lanes.h. Only where lanes_apply holds (float with AVX2 or AVX-512), which
// every caller checks first.
template <typename T>
inline void transpose_vw(const T* z, int zs, T* out, int64_t ld) {
  if constexpr (simd<T>::W == 16)
    store_transposed16(z, zs, out, ld);
  else
    store_transposed8(z, zs, out, ld);
}

// Whether a block's rows [S, Dp] can be turned into columns of W samples (lanes_in):
// float with AVX2 or AVX-512 (the vector transposes), and panels of at most 4 vectors (the lane
// buffers' size).
template <typename T>
inline bool lanes_apply(const PanelGeom& g) {
#if defined(__AVX2__)
  constexpr int W = simd<T>::W;
  return std::is_same_v<T, float> && (W == 8 || W == 16) && g.Dp <= 4 * W;
#else
  (void)g;
  return false;
#endif
}

// cols [Dp][W] = the W rows at rows (row stride Dp), transposed (lanes_apply).
template <typename T>
inline void lanes_in(const T* rows, int Dp, T* cols) {
  constexpr int W = simd<T>::W;
  for (int c = 0; c < Dp; c += W) transpose_vw(rows + c, Dp, cols + c * W, W);
}

// The sums of comp_sums from the products Q [rows of Dp] by W x W transposes (lanes_apply): one
// vector per column of W rows, then for each component the vectors of its dm columns added in
// column order from +0, W rows at a time. Those are the sums the indicator product makes (each
// of its FMAs by 1 is that add rounded once, and its products by 0 add zeros), in a bit over half
// its time at n = 48, K = 2, d = 6 (AVX-512, in cache: 150 against 260 ns for a block of 64).
// Q holds kBlock rows, of which S are used: the last group transposes rows past S too, and
// leaves their lanes unused. False where it does not apply (the caller takes the product).
template <typename T>
inline bool comp_sums_transposed(const T* Q, int S, const PanelGeom& g, T* out) {
  using V = simd<T>;
  constexpr int W = V::W;
  static_assert(kBlock % W == 0, "the transposes read whole groups of W rows of the buffer");
  if (!lanes_apply<T>(g)) return false;
  alignas(64) T qt[4 * W][W];  // qt[j][l] = Q[r0 + l, j]
  alignas(64) T sum[W];
  for (int r0 = 0; r0 < S; r0 += W) {
    lanes_in(Q + (int64_t)r0 * g.Dp, g.Dp, &qt[0][0]);
    const int rows = std::min(W, S - r0);
    for (int k = 0; k < g.K; ++k) {
      typename V::v acc{};
      for (int j = k * g.dm; j < (k + 1) * g.dm; ++j) acc += V::load(qt[j]);
      V::store(sum, acc);
      for (int l = 0; l < rows; ++l) out[(int64_t)(r0 + l) * g.Kp + k] = sum[l];
    }
  }
  return true;
}

// out [S, Kp] (row stride Kp): out[t, k] = sum over the columns j of component k of
// A[t, j] B[t, j], for full-panel rows A, B [S, Dp] (e.g. ||P_k||^2, <r_k, P_k>), whose columns
// past d_k in each component's dm are 0. Columns K .. Kp - 1 of out are left as they are by the
// transposed sums (the indicator product writes 0 there).
template <typename T>
inline void comp_sums(const T* A, const T* B, int S, const Panels<T>& pn, T* out,
                      BlockScratch<T>& s) {
  const PanelGeom& g = pn.g;
  const int64_t SD = (int64_t)S * g.Dp;
  T* q = s.Q.data();
  for (int64_t e = 0; e < SD; ++e) q[e] = A[e] * B[e];
  if (comp_sums_transposed(q, S, g, out)) return;
  project(s.rowQ.data(), S, g.Dp, pn.Ind(), g.Dp, g.Kp, out, g.Kp, g.K);
}

// Y [S rows of Dp] = coef [S, K] (row stride cstride) spread over the columns of each component:
// Y[t, k*dm + j] = coef[t, k] for j < d_k, 0 in the padding.
template <typename T>
inline void comp_spread(const T* coef, int cstride, int S, const Panels<T>& pn, T* const* Y) {
  expand(coef, cstride, S, pn.g.K, pn.IndT(), pn.g.Kp, pn.g.Dp, Y);
}

// The per-sample soft-max math of a block for a compile-time K, one SIMD lane per sample (the
// steps over k expanded by unrolled, tiles.h: GCC vectorises an omp simd loop over samples only
// when they are straight-line code; as loops over a constant K it left them to be unrolled after
// vectorisation, and gave up). The same operations in the same order as the generic code
// (block_softmax, the c w_k of soft_block_coefs, soft_block_grads), which runs them sample by
// sample in loops over K (a few iterations each: about a tenth of a soft training step). Lanes
// read the [S, Kp] sums with a stride.
//   soft_weights: w [S, K] = softmax_k(phi ||P_k||^2 + bias_k) and ca = c w, the bias row of
//     sample t being row t (BiasRows::kSample, the denoiser) or row lev[t] (kLevel, the training
//     step's per-level bias) of bias, or none;
//   soft_dlogit:  cb [S, K] = 2 phi dlogit_k with
//     dlogit_k = w_k (c <r_k, P_k> - c sum_j w_j <r_j, P_j>) (as kernels::dae_dlogit evaluates
//     it, c w_k sum_{j != k} w_j (<r_k, P_k> - <r_j, P_j>)), and with Full also dlogit [S, K],
//     dc [S] = sum_k w_k <r_k, P_k> and dphi [S] = sum_k dlogit_k ||P_k||^2 (the denoiser's
//     backward; the training step needs none).
//   Lanes (L > 0): the [S, Kp] sums and the [S, K] arrays are instead lane-major, [K][L] (entry
//     (t, k) at k L + t) for S <= L samples: the layout of the soft_*_lanes_* functions below.
enum class BiasRows { kNone, kSample, kLevel };

// Offsets of entry (t, k) of the sums (row stride Kp) and of the [S, K] arrays, row-major or, with
// L > 0, lane-major [K][L].
template <int L>
inline int64_t sum_at(int t, int k, int Kp) {
  return L > 0 ? (int64_t)k * L + t : (int64_t)t * Kp + k;
}
template <int L>
inline int64_t coef_at(int t, int k, int K) {
  return L > 0 ? (int64_t)k * L + t : (int64_t)t * K + k;
}

template <typename T, int K, BiasRows BR, int L = 0>
inline void soft_weights(const T* sq, int Kp, const T* phis, const T* cs, const T* bias,
                         const uint32_t* lev, int S, T* w, T* ca) {
#if defined(_OPENMP)
#pragma omp simd
#endif
  for (int t = 0; t < S; ++t) {
    T l[K];
    unrolled<K>([&](auto k) {
      T b = T(0);
      if constexpr (BR == BiasRows::kSample) b = bias[(int64_t)t * K + k];
      if constexpr (BR == BiasRows::kLevel) b = bias[(int64_t)lev[t] * K + k];
      l[k] = phis[t] * sq[sum_at<L>(t, k, Kp)] + b;
    });
    T mx = l[0];
    unrolled<K>([&](auto k) { mx = l[k] > mx ? l[k] : mx; });
    T total = T(0);
    unrolled<K>([&](auto k) {
      l[k] = kernels::sm_exp<T>(l[k] - mx);
      total += l[k];
    });
    const T inv = T(1) / total;
    unrolled<K>([&](auto k) {
      const T wk = l[k] * inv;
      w[coef_at<L>(t, k, K)] = wk;
      ca[coef_at<L>(t, k, K)] = cs[t] * wk;
    });
  }
}

template <typename T, int K, bool Full, int L = 0>
inline void soft_dlogit(const T* rp, const T* sq, int Kp, const T* w, const T* cs, const T* phis,
                        int S, T* cb, T* dlogit, T* dc, T* dphi) {
#if defined(_OPENMP)
#pragma omp simd
#endif
  for (int t = 0; t < S; ++t) {
    T dcs = T(0);
    unrolled<K>([&](auto k) { dcs += w[coef_at<L>(t, k, K)] * rp[sum_at<L>(t, k, Kp)]; });
    T dph = T(0);
    unrolled<K>([&](auto k) {
      // kernels::dae_dlogit: c w_k sum_j w_j (rp_k - rp_j), exactly 0 for one-hot weights
      const T rk = rp[sum_at<L>(t, k, Kp)];
      T acc = T(0);
      unrolled<K>([&](auto j) {
        if constexpr (j != k) acc += w[coef_at<L>(t, j, K)] * (rk - rp[sum_at<L>(t, j, Kp)]);
      });
      const T dl = cs[t] * w[coef_at<L>(t, k, K)] * acc;
      if constexpr (Full) {
        dlogit[coef_at<L>(t, k, K)] = dl;
        dph += dl * sq[sum_at<L>(t, k, Kp)];
      }
      cb[coef_at<L>(t, k, K)] = T(2) * phis[t] * dl;
    });
    if constexpr (Full) {
      dc[t] = dcs;
      dphi[t] = dph;
    }
  }
}

// Calls f(std::integral_constant<int, K>) for K = 1 .. 4, f(std::integral_constant<int, 0>) for
// any other K (the generic code).
template <typename F>
inline void with_small_K(int K, F&& f) {
  switch (K) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 0>{});
  }
}

// Calls f(std::integral_constant<int, K>) for K = 1 .. 4 and nothing otherwise: the lanes paths,
// which soft_lanes_apply limits to K <= 4.
template <typename F>
inline void with_lanes_K(int K, F&& f) {
  with_small_K(K, [&](auto kc) {
    if constexpr (decltype(kc)::value > 0) f(kc);
  });
}

// Soft-mode reconstruction coefficients of a block from c w_k in s.ca [S, K]: C [S, Dp] (s.C)
// with C_k = c w_k P_k, from full-panel rows P [S, Dp] (padding 0); the spread c w_k stays in s.E.
template <typename T>
void soft_block_coefs_from_ca(const T* P, int S, const Panels<T>& pn, BlockScratch<T>& s) {
  const int K = pn.g.K;
  comp_spread(s.ca.data(), K, S, pn, s.rowE.data());
  const int64_t SD = (int64_t)S * pn.g.Dp;
  const T* a = s.E.data();
  T* C = s.C.data();
  for (int64_t e = 0; e < SD; ++e) C[e] = a[e] * P[e];
}

// The same from weights w [S, K] and per-sample c.
template <typename T>
void soft_block_coefs(const T* P, const T* w, const T* c, int S, const Panels<T>& pn,
                      BlockScratch<T>& s) {
  const int K = pn.g.K;
  for (int t = 0; t < S; ++t)
    for (int k = 0; k < K; ++k) s.ca[(int64_t)t * K + k] = c[t] * w[(int64_t)t * K + k];
  soft_block_coefs_from_ca(P, S, pn, s);
}

// dP [S, Dp] (s.dP) = E o R + E2 o P, with E2 the spread of s.cb = 2 phi dlogit [S, K] and E the
// spread c w_k that soft_block_coefs left in s.E.
template <typename T>
void soft_block_dP(const T* R, const T* P, int S, const Panels<T>& pn, BlockScratch<T>& s) {
  comp_spread(s.cb.data(), pn.g.K, S, pn, s.rowE2.data());
  const int64_t SD = (int64_t)S * pn.g.Dp;
  const T* a = s.E.data();
  const T* b = s.E2.data();
  T* dP = s.dP.data();
  for (int64_t e = 0; e < SD; ++e) dP[e] = a[e] * R[e] + b[e] * P[e];
}

// Soft-mode backward of a block (the kernels::dae_dP_from_r formulas) from the full-panel rows
// R = U^T g and P = U^T x [S, Dp] (padding 0), sq [S, Kp] = ||P_k||^2 (comp_sums), weights
// w [S, K], per-sample c and phi, after soft_block_coefs(P, w, c) has left c w_k spread in s.E:
//   h_k = c <r_k, P_k>, dlogit_k = w_k (h_k - sum_j w_j h_j), dc = sum_k w_k <r_k, P_k>,
//   dphi = sum_k dlogit_k ||P_k||^2, dP_k = c w_k r_k + 2 phi dlogit_k P_k.
// Writes dP [S, Dp] into s.dP and, unless dlogit is null (the training step, which needs none of
// them), dlogit [S, K], dc [S], dphi [S]. Components with w_k = 0 get dlogit_k = 0 and dP_k = 0
// through their zero coefficients. K <= 4: soft_dlogit, one sample per SIMD lane.
template <typename T>
void soft_block_grads(const T* R, const T* P, const T* sq_rows, const T* w, const T* c,
                      const T* phi, int S, const Panels<T>& pn, T* dlogit, T* dc, T* dphi,
                      BlockScratch<T>& s) {
  const PanelGeom& g = pn.g;
  const int K = g.K, Kp = g.Kp;
  comp_sums(R, P, S, pn, s.sums.data(), s);  // <r_k, P_k>
  with_small_K(K, [&](auto kc) {
    constexpr int KC = decltype(kc)::value;
    if constexpr (KC > 0) {  // one sample per SIMD lane
      if (dlogit)
        soft_dlogit<T, KC, true>(s.sums.data(), sq_rows, Kp, w, c, phi, S, s.cb.data(), dlogit,
                                 dc, dphi);
      else
        soft_dlogit<T, KC, false>(s.sums.data(), nullptr, Kp, w, c, phi, S, s.cb.data(), nullptr,
                                  nullptr, nullptr);
    } else {
      for (int t = 0; t < S; ++t) {
        const T* rp = s.sums.data() + (int64_t)t * Kp;
        const T* sq = sq_rows + (int64_t)t * Kp;
        const T* wt = w + (int64_t)t * K;
        T* dl = (dlogit ? dlogit : s.dlogit.data()) + (int64_t)t * K;
        T dcs = T(0);
        for (int k = 0; k < K; ++k) dcs += wt[k] * rp[k];
        T dph = T(0);
        for (int k = 0; k < K; ++k) {
          dl[k] = kernels::dae_dlogit<T>(rp, 1, wt, 1, K, k, c[t]);
          dph += dl[k] * sq[k];
          s.cb[(int64_t)t * K + k] = T(2) * phi[t] * dl[k];
        }
        if (dc) dc[t] = dcs;
        if (dphi) dphi[t] = dph;
      }
    }
  });
  soft_block_dP(R, P, S, pn, s);
}

// The soft mode's per-sample math on a block, W = simd<T>::W samples at a time in vector lanes
// (soft_lanes_apply: float with AVX2 or AVX-512, Dp <= 4 W, K <= 4). A group's rows of P (and of
// R) are transposed, one vector per column with the samples in the lanes; ||P_k||^2 and
// <r_k, P_k> are summed over each component's columns; the soft-max weights and their gradient
// run lane by lane (soft_weights, soft_dlogit, lane-major [K][W]); C_k = c w_k P_k and
// dP_k = c w_k r_k + 2 phi dlogit_k P_k are formed as columns and stored lane-major, group by
// group (lane_group), where expand and outer read them (tiles.h, coef_offset). The row-major
// path makes [S, Kp] sums (comp_sums), spreads [S, K] coefficients by indicator products and runs
// an elementwise pass over [S, Dp] for each of C and dP. Training step, a block of 64 at n = 48,
// K = 2, d = 6, forward and backward, in cache: 738 against 921 ns (AVX-512), 662 against 1057
// (AVX2); in the op, paired, soft 0.943; the denoiser's fwd+bwd at (48, 2, 6, 65536) 0.942 and
// (48, 3, 8, 65536) 0.895. Same formulas; the sums of squares and products are multiply-adds
// here where the row path rounds each product first, so the last bits may differ. A group past S
// reads rows of the block's buffers up to the next multiple of W (all within kBlock), writes
// whole [Dp][W] blocks of s.C and s.dP, and leaves those lanes unused (expand and outer read the
// S rows only); per-sample inputs and outputs of the caller's arrays are copied through lane
// buffers for the S samples only.
// The functions that run the groups (soft_train_lanes_*, soft_dae_lane_groups) are
// MOLRG_FULL_WIDTH: without it GCC vectorised the omp simd loops inlined into them (soft_weights,
// soft_dlogit) in two 256-bit halves per group. With it, paired in the op on two threads (Xeon
// VM): the denoiser's fwd+bwd at (48, 2, 6, 65536) soft 0.947-0.955, the soft training step
// 0.978; bit-identical.
template <typename T>
inline bool soft_lanes_apply(const PanelGeom& g) {
  return lanes_apply<T>(g) && g.K <= 4;
}

// The [Dp][W] block of the group of samples r0 .. r0 + W - 1 (r0 a multiple of W) in a
// lane-major coefficient buffer of a block (s.C, s.dP; tiles.h coef_offset with stride Dp).
template <typename T>
inline T (*lane_group(T* buf, int r0, const PanelGeom& g))[simd<T>::W] {
  static_assert(kBlock % simd<T>::W == 0, "a block is whole groups");
  return reinterpret_cast<T(*)[simd<T>::W]>(buf + (int64_t)r0 * g.Dp);
}

// out[k] = sum over the columns j of component k of a[j] b[j], lane by lane.
template <typename T, int KC>
inline void lanes_comp_sums(const T* a, const T* b, int dm, T (*out)[simd<T>::W]) {
  using V = simd<T>;
  constexpr int W = V::W;
  for (int k = 0; k < KC; ++k) {
    typename V::v acc{};
    for (int j = k * dm; j < (k + 1) * dm; ++j) acc += V::load(a + j * W) * V::load(b + j * W);
    V::store(out[k], acc);
  }
}

// out columns of component k: ca_k a[j] (+ cb_k b[j] when cb is given); columns past K dm: 0.
template <typename T, int KC>
inline void lanes_coef_cols(const T (*ca)[simd<T>::W], const T* a, const T (*cb)[simd<T>::W],
                            const T* b, const PanelGeom& g, T (*out)[simd<T>::W]) {
  using V = simd<T>;
  constexpr int W = V::W;
  for (int k = 0; k < KC; ++k) {
    const typename V::v cak = V::load(ca[k]);
    for (int j = k * g.dm; j < (k + 1) * g.dm; ++j) {
      if (cb) V::store(out[j], cak * V::load(a + j * W) + V::load(cb[k]) * V::load(b + j * W));
      else V::store(out[j], cak * V::load(a + j * W));
    }
  }
  for (int j = g.D; j < g.Dp; ++j) V::store(out[j], typename V::v{});
}

// Lane buffers of one group of W samples.
template <typename T, int KC>
struct SoftLanes {
  static constexpr int W = simd<T>::W;
  alignas(64) T pt[4 * W][W], rt[4 * W][W];  // columns of P and R
  alignas(64) T sq[KC][W], rp[KC][W], w[KC][W], ca[KC][W], cb[KC][W], dl[KC][W];
  alignas(64) T c[W], phi[W], dc[W], dphi[W];
  alignas(64) T bias[W][KC];  // row-major: soft_weights reads bias rows (BiasRows::kSample)
  // The denoiser's groups: c, phi of samples r0 .. r0 + rows - 1 of the caller's arrays into the
  // lanes (0 in the rest), P's rows of the group transposed into pt and ||P_k||^2 into sq.
  void begin(const T* c_, const T* phi_, int r0, int rows, const T* P, const PanelGeom& g) {
    for (int l = 0; l < W; ++l) {
      c[l] = l < rows ? c_[r0 + l] : T(0);
      phi[l] = l < rows ? phi_[r0 + l] : T(0);
    }
    lanes_in(P + (int64_t)r0 * g.Dp, g.Dp, &pt[0][0]);
    lanes_comp_sums<T, KC>(&pt[0][0], &pt[0][0], g.dm, sq);
  }
};

// The training step's forward: P rows [S, Dp] -> C, lane-major (s.C); keeps P^T in s.Q and w,
// c w in s.w, s.ca (per group, lane-major [K][W]) for soft_train_lanes_bwd. cs, phis: s.cs,
// s.phis.
template <typename T, int KC>
MOLRG_FULL_WIDTH void soft_train_lanes_fwd(const T* P, int S, const PanelGeom& g,
                                           const T* level_bias, const uint32_t* lev,
                                           BlockScratch<T>& s) {
  constexpr int W = simd<T>::W;
  SoftLanes<T, KC> ln;
  for (int r0 = 0; r0 < S; r0 += W) {
    T* pt = s.Q.data() + (int64_t)r0 * g.Dp;
    lanes_in(P + (int64_t)r0 * g.Dp, g.Dp, pt);
    lanes_comp_sums<T, KC>(pt, pt, g.dm, ln.sq);
    T* w = s.w.data() + (int64_t)r0 * KC;
    T* ca = s.ca.data() + (int64_t)r0 * KC;
    const T* phis = s.phis.data() + r0;
    const T* cs = s.cs.data() + r0;
    if (level_bias)
      soft_weights<T, KC, BiasRows::kLevel, W>(&ln.sq[0][0], 0, phis, cs, level_bias, lev + r0,
                                               W, w, ca);
    else
      soft_weights<T, KC, BiasRows::kNone, W>(&ln.sq[0][0], 0, phis, cs, nullptr, nullptr, W, w,
                                              ca);
    lanes_coef_cols<T, KC>(reinterpret_cast<const T(*)[W]>(ca), pt, nullptr, nullptr, g,
                           lane_group(s.C.data(), r0, g));
  }
}

// The training step's backward: R rows [S, Dp] -> dP, lane-major (s.dP), from what the forward
// kept.
template <typename T, int KC>
MOLRG_FULL_WIDTH void soft_train_lanes_bwd(const T* R, int S, const PanelGeom& g,
                                           BlockScratch<T>& s) {
  constexpr int W = simd<T>::W;
  SoftLanes<T, KC> ln;
  for (int r0 = 0; r0 < S; r0 += W) {
    const T* pt = s.Q.data() + (int64_t)r0 * g.Dp;
    lanes_in(R + (int64_t)r0 * g.Dp, g.Dp, &ln.rt[0][0]);
    lanes_comp_sums<T, KC>(&ln.rt[0][0], pt, g.dm, ln.rp);
    const auto* ca = reinterpret_cast<const T(*)[W]>(s.ca.data() + (int64_t)r0 * KC);
    soft_dlogit<T, KC, false, W>(&ln.rp[0][0], nullptr, 0, s.w.data() + (int64_t)r0 * KC,
                                 s.cs.data() + r0, s.phis.data() + r0, W, &ln.cb[0][0], nullptr,
                                 nullptr, nullptr);
    lanes_coef_cols<T, KC>(ca, &ln.rt[0][0], ln.cb, pt, g,
                           lane_group(s.dP.data(), r0, g));
  }
}

// Runs f(ln, r0, rows) for each group of W samples r0 .. r0 + rows - 1 of a block of S, the
// denoiser's way: ln begun (SoftLanes::begin) on the caller's c, phi and the rows of P.
template <typename T, int KC, typename F>
MOLRG_FULL_WIDTH inline void soft_dae_lane_groups(int S, const T* c, const T* phi, const T* P,
                                                  const PanelGeom& g, F&& f) {
  constexpr int W = simd<T>::W;
  SoftLanes<T, KC> ln;
  for (int r0 = 0; r0 < S; r0 += W) {
    const int rows = std::min(W, S - r0);
    ln.begin(c, phi, r0, rows, P, g);
    f(ln, r0, rows);
  }
}

// lanes[k][l] = a[r0 + l, k] of an [S, K] array for l < rows (0 in the rest), and back.
template <typename T, int KC>
inline void lanes_from_rows(const T* a, int r0, int rows, T (*lanes)[simd<T>::W]) {
  for (int l = 0; l < simd<T>::W; ++l)
    for (int k = 0; k < KC; ++k) lanes[k][l] = l < rows ? a[(int64_t)(r0 + l) * KC + k] : T(0);
}
template <typename T, int KC>
inline void lanes_to_rows(const T (*lanes)[simd<T>::W], int r0, int rows, T* a) {
  for (int l = 0; l < rows; ++l)
    for (int k = 0; k < KC; ++k) a[(int64_t)(r0 + l) * KC + k] = lanes[k][l];
}

// The denoiser's forward (dae_forward_block): P rows [S, Dp] -> w [S, K] (the caller's) and C,
// lane-major (s.C), from c, phi [S] and bias [S, K] (or none).
template <typename T, int KC>
MOLRG_FULL_WIDTH void soft_dae_lanes_fwd(const T* P, int S, const PanelGeom& g, const T* c,
                                          const T* phi, const T* bias, T* w, BlockScratch<T>& s) {
  constexpr int W = simd<T>::W;
  soft_dae_lane_groups<T, KC>(S, c, phi, P, g, [&](SoftLanes<T, KC>& ln, int r0, int rows) {
    if (bias) {
      std::fill(&ln.bias[0][0], &ln.bias[0][0] + W * KC, T(0));
      std::copy(bias + (int64_t)r0 * KC, bias + (int64_t)(r0 + rows) * KC, &ln.bias[0][0]);
      soft_weights<T, KC, BiasRows::kSample, W>(&ln.sq[0][0], 0, ln.phi, ln.c, &ln.bias[0][0],
                                                nullptr, W, &ln.w[0][0], &ln.ca[0][0]);
    } else {
      soft_weights<T, KC, BiasRows::kNone, W>(&ln.sq[0][0], 0, ln.phi, ln.c, nullptr, nullptr, W,
                                              &ln.w[0][0], &ln.ca[0][0]);
    }
    lanes_to_rows<T, KC>(ln.w, r0, rows, w);
    lanes_coef_cols<T, KC>(ln.ca, &ln.pt[0][0], nullptr, nullptr, g,
                           lane_group(s.C.data(), r0, g));
  });
}

// The denoiser's backward (dae_backward_block): P rows (the saved projections, padded) and R rows
// [S, Dp], w [S, K], c, phi [S] -> C and dP, lane-major (s.C, s.dP), dlogit [S, K], dc, dphi [S].
template <typename T, int KC>
MOLRG_FULL_WIDTH void soft_dae_lanes_bwd(const T* P, const T* R, int S, const PanelGeom& g,
                                          const T* w, const T* c, const T* phi, T* dlogit, T* dc,
                                          T* dphi, BlockScratch<T>& s) {
  constexpr int W = simd<T>::W;
  soft_dae_lane_groups<T, KC>(S, c, phi, P, g, [&](SoftLanes<T, KC>& ln, int r0, int rows) {
    lanes_from_rows<T, KC>(w, r0, rows, ln.w);
    for (int k = 0; k < KC; ++k)
      for (int l = 0; l < W; ++l) ln.ca[k][l] = ln.c[l] * ln.w[k][l];  // soft_block_coefs' c w_k
    lanes_in(R + (int64_t)r0 * g.Dp, g.Dp, &ln.rt[0][0]);
    lanes_comp_sums<T, KC>(&ln.rt[0][0], &ln.pt[0][0], g.dm, ln.rp);
    soft_dlogit<T, KC, true, W>(&ln.rp[0][0], &ln.sq[0][0], 0, &ln.w[0][0], ln.c, ln.phi, W,
                                &ln.cb[0][0], &ln.dl[0][0], ln.dc, ln.dphi);
    lanes_to_rows<T, KC>(ln.dl, r0, rows, dlogit);
    std::copy(ln.dc, ln.dc + rows, dc + r0);
    std::copy(ln.dphi, ln.dphi + rows, dphi + r0);
    lanes_coef_cols<T, KC>(ln.ca, &ln.pt[0][0], nullptr, nullptr, g,
                           lane_group(s.C.data(), r0, g));
    lanes_coef_cols<T, KC>(ln.ca, &ln.rt[0][0], ln.cb, &ln.pt[0][0], g,
                           lane_group(s.dP.data(), r0, g));
  });
}

// Hard assignment argmax_k ||U_k^T x||^2 (ties to the lowest k) of S consecutive samples.
template <typename T>
void assign_block(const T* x, int S, const Panels<T>& pn, int64_t* out, BlockScratch<T>& s,
                  RangePrefetch* pf = nullptr) {
  const PanelGeom& g = pn.g;
  for (int t = 0; t < S; ++t) s.rowA[t] = x + (int64_t)t * g.n;
  project(s.rowA.data(), S, g.n, pn.Uf(), g.n, g.Dp, s.P.data(), g.Dp, g.D, pf);
  comp_sums(s.P.data(), s.P.data(), S, pn, s.sums.data(), s);
  for (int t = 0; t < S; ++t) out[t] = kernels::dae_argmax(s.sums.data() + (int64_t)t * g.Kp, g.K);
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

// Soft-mode weights and reconstruction coefficients of a block: w [S, K] = softmax_k(phi
// ||P_k||^2 + bias_k) from sq [S, Kp] = ||P_k||^2, the bias row of sample t chosen by br (row t
// or row lev[t] of bias, or none), then C and s.E as soft_block_coefs. K <= 4: soft_weights, one
// sample per SIMD lane; otherwise the logits sample by sample and block_softmax.
template <typename T>
void soft_block_weights(const T* P, const T* sq, const T* phi, const T* c, const T* bias,
                        BiasRows br, const uint32_t* lev, int S, const Panels<T>& pn, T* w,
                        BlockScratch<T>& s) {
  const int K = pn.g.K, Kp = pn.g.Kp;
  with_small_K(K, [&](auto kc) {
    constexpr int KC = decltype(kc)::value;
    if constexpr (KC > 0) {
      if (br == BiasRows::kSample)
        soft_weights<T, KC, BiasRows::kSample>(sq, Kp, phi, c, bias, lev, S, w, s.ca.data());
      else if (br == BiasRows::kLevel)
        soft_weights<T, KC, BiasRows::kLevel>(sq, Kp, phi, c, bias, lev, S, w, s.ca.data());
      else
        soft_weights<T, KC, BiasRows::kNone>(sq, Kp, phi, c, bias, lev, S, w, s.ca.data());
      soft_block_coefs_from_ca(P, S, pn, s);
    } else {
      for (int t = 0; t < S; ++t) {
        const T* b = br == BiasRows::kSample  ? bias + (int64_t)t * K
                     : br == BiasRows::kLevel ? bias + (int64_t)lev[t] * K
                                              : nullptr;
        const T* sqt = sq + (int64_t)t * Kp;
        T* wt = w + (int64_t)t * K;
        for (int k = 0; k < K; ++k) wt[k] = phi[t] * sqt[k] + (b ? b[k] : T(0));
      }
      block_softmax(w, S, K);
      soft_block_coefs(P, w, c, S, pn, s);
    }
  });
}

// The saved projections proj [S, D] of a block from its full-panel rows P [S, Dp], in row order:
// a row whose whole vectors (Dp values) end inside the block's proj is copied as whole vectors,
// spilling its padding zeros into the rows after it, which their own copies overwrite; the
// others (at least the last row: what follows the block may belong to another thread) value by
// value. std::copy of D values was a call to memmove per sample.
template <typename T>
inline void copy_proj_rows(const T* P, int S, int D, int Dp, T* proj) {
  using V = simd<T>;
  const int64_t end = (int64_t)S * D;
  for (int t = 0; t < S; ++t) {
    const T* src = P + (int64_t)t * Dp;
    T* dst = proj + (int64_t)t * D;
    if ((int64_t)t * D + Dp <= end) {
      for (int j = 0; j < Dp; j += V::W) V::store(dst + j, V::load(src + j));
    } else {
      for (int j = 0; j < D; ++j) dst[j] = src[j];
    }
  }
}

// The inverse of copy_proj_rows: full-panel rows P [S, Dp], zeros past D, from a block's saved
// projections proj [S, D]. A row whose whole vectors end inside proj is copied as whole vectors,
// the last one's lanes past D (the next row's values) set to zero by a select; the others value
// by value. std::copy and std::fill per sample were two libc calls per sample.
template <typename T>
inline void pad_proj_rows(const T* proj, int S, int D, int Dp, T* P) {
  using V = simd<T>;
  const int64_t end = (int64_t)S * D;
  const int last = Dp - V::W;  // the one vector that holds lanes past D (Dp rounds D up)
  typename V::v lane;
  for (int i = 0; i < V::W; ++i) lane[i] = T(i);
  const auto keep = lane < V::set1(T(D - last));
  for (int t = 0; t < S; ++t) {
    const T* src = proj + (int64_t)t * D;
    T* dst = P + (int64_t)t * Dp;
    if ((int64_t)t * D + Dp <= end) {
      for (int j = 0; j < last; j += V::W) V::store(dst + j, V::load(src + j));
      V::store(dst + last, keep ? V::load(src + last) : typename V::v{});
    } else {
      for (int j = 0; j < D; ++j) dst[j] = src[j];
      for (int j = D; j < Dp; ++j) dst[j] = T(0);
    }
  }
}

// Forward of S <= kBlock consecutive samples of one instance: y, proj [S, K*dm], w [S, K].
// stream_y: y is written by non-temporal stores (expand; the caller fences).
template <typename T>
void dae_forward_block(const T* x, int S, const Panels<T>& pn, const int32_t* dims, const T* c,
                       const T* phi, const T* bias, const int64_t* assign, int mode, T* proj,
                       T* w, T* y, BlockScratch<T>& s, bool stream_y = false,
                       RangePrefetch* pf = nullptr) {
  const PanelGeom& g = pn.g;
  const int n = g.n, K = g.K, dm = g.dm, D = g.D, Dp = g.Dp;
  for (int t = 0; t < S; ++t) {
    s.rowA[t] = x + (int64_t)t * n;
    s.rowY[t] = y + (int64_t)t * n;
  }
  project(s.rowA.data(), S, n, pn.Uf(), n, Dp, s.P.data(), Dp, D, pf);
  const bool lanes = mode == kSoft && soft_lanes_apply<T>(g);
  if (!lanes) comp_sums(s.P.data(), s.P.data(), S, pn, s.sums.data(), s);  // ||P_k||^2
  copy_proj_rows(s.P.data(), S, D, Dp, proj);
  if (mode == kHard) {  // soft: the weights for the whole block below
    // zeros, then the ones: GCC compiled k == k0 ? 1 : 0 to a branch per k, which the random
    // components of a block mispredicted every other sample
    std::fill(w, w + (int64_t)S * K, T(0));
    for (int t = 0; t < S; ++t) {
      const T* sq = s.sums.data() + (int64_t)t * g.Kp;
      const int k0 = assign ? (int)assign[t] : kernels::dae_argmax(sq, K);
      w[(int64_t)t * K + k0] = T(1);
      s.comp[t] = k0;
    }
  }
  if (mode == kSoft) {
    if (lanes) {
      with_lanes_K(K, [&](auto kc) {
        soft_dae_lanes_fwd<T, decltype(kc)::value>(s.P.data(), S, g, c, phi, bias, w, s);
      });
    } else {
      soft_block_weights(s.P.data(), s.sums.data(), phi, c, bias,
                         bias ? BiasRows::kSample : BiasRows::kNone, nullptr, S, pn, w, s);
    }
    expand(s.C.data(), Dp, S, D, pn.UfT(), D, n, s.rowY.data(), stream_y, pf, lanes);
    return;
  }
  // hard: one group per component (the x rows were read in order by the projection above)
  const int dW = g.dW;
  s.sort_by_component(S, K);
  for (int k = 0; k < K; ++k) {
    const int u0 = s.start[k], cnt = s.start[k + 1] - u0;
    if (cnt == 0) continue;
    using V = simd<T>;
    const int dk = dims[k];  // read once: the stores to C might alias dims
    for (int u = 0; u < cnt; ++u) {
      const int t = s.sel[u0 + u];
      const typename V::v a = V::set1(c[t] * w[(int64_t)t * K + k]);
      const T* Pt = s.P.data() + (int64_t)t * Dp + k * dm;
      T* Cu = s.C.data() + (int64_t)u * dW;
      // whole vectors: expand reads the d_k columns only, and s.P ends in a vector of padding
      for (int j = 0; j < dk; j += V::W) V::store(Cu + j, a * V::load(Pt + j));
      s.rowY[u] = y + (int64_t)t * n;
    }
    expand(s.C.data(), dW, cnt, dk, pn.UcT(k), dm, n, s.rowY.data(), stream_y, pf);
  }
}

// Backward of S consecutive samples of one instance: dx [S, n] (if non-null), dc, dphi, dbias,
// and the instance's gradient accumulator acc [g.acc_size()] (if non-null). stream_dx: dx is
// written by non-temporal stores (expand; the caller fences).
template <typename T>
void dae_backward_block(const T* gy, const T* x, int S, const Panels<T>& pn, const int32_t* dims,
                        const T* c, const T* phi, const T* proj, const T* w, int mode, T* dx,
                        T* dc, T* dphi, T* dbias, T* acc, BlockScratch<T>& s,
                        bool stream_dx = false, RangePrefetch* pf = nullptr) {
  const PanelGeom& g = pn.g;
  const int n = g.n, K = g.K, dm = g.dm, D = g.D, Dp = g.Dp, dW = g.dW;
  if (mode == kSoft) {
    for (int t = 0; t < S; ++t) {
      s.rowA[t] = gy + (int64_t)t * n;
      s.rowB[t] = x + (int64_t)t * n;
      if (dx) s.rowY[t] = dx + (int64_t)t * n;
    }
    project(s.rowA.data(), S, n, pn.Uf(), n, Dp, s.R.data(), Dp, D, pf);
    pad_proj_rows(proj, S, D, Dp, s.P.data());  // the saved projections as full-panel rows
    const bool lanes = soft_lanes_apply<T>(g);  // C and dP lane-major (else rows)
    if (lanes) {
      with_lanes_K(K, [&](auto kc) {
        soft_dae_lanes_bwd<T, decltype(kc)::value>(s.P.data(), s.R.data(), S, g, w, c, phi,
                                                   dbias, dc, dphi, s);
      });
    } else {
      comp_sums(s.P.data(), s.P.data(), S, pn, s.sums2.data(), s);  // ||P_k||^2
      soft_block_coefs(s.P.data(), w, c, S, pn, s);                  // C (for dU) and s.E
      soft_block_grads(s.R.data(), s.P.data(), s.sums2.data(), w, c, phi, S, pn, dbias, dc, dphi,
                       s);
    }
    if (dx) expand(s.dP.data(), Dp, S, D, pn.UfT(), D, n, s.rowY.data(), stream_dx, pf, lanes);
    if (acc) {
      outer(s.rowB.data(), s.dP.data(), s.rowA.data(), s.C.data(), Dp, S, D, n, acc, pf, lanes);
    }
    return;
  }
  // hard: one group per component, reading the gy and x rows (and writing dx) in group order;
  // the rows are in L2 when the caller prefetched them during the block before (pf). This
  // replaced copying the rows into component-ordered buffers: paired, 0.90-0.93 of the time. A
  // burst of L1 prefetches of the block's rows in memory order, which went with it, cost 2%
  // once the rows came spread over the block before (Xeon VM, paired, two threads).
  // dphi and dbias are zero in hard mode: filled once per block, as the forward's w (a zero loop
  // per sample was a memset call per sample)
  std::fill(dphi, dphi + S, T(0));
  std::fill(dbias, dbias + (int64_t)S * K, T(0));
  for (int t = 0; t < S; ++t)
    s.comp[t] = kernels::dae_argmax(w + (int64_t)t * K, K);  // w is one-hot
  s.sort_by_component(S, K);
  for (int k = 0; k < K; ++k) {
    const int u0 = s.start[k], cnt = s.start[k + 1] - u0;
    if (cnt == 0) continue;
    const int dk = dims[k];
    for (int u = 0; u < cnt; ++u) {
      const int t = s.sel[u0 + u];
      s.rowA[u] = gy + (int64_t)t * n;
      s.rowB[u] = x + (int64_t)t * n;
      if (dx) s.rowY[u] = dx + (int64_t)t * n;
    }
    project(s.rowA.data(), cnt, n, pn.Uc(k), n, dW, s.R.data(), dW, dk, pf);
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
      // expand and outer read the d_k columns only: dP in whole vectors, C up to d_k (Pt lies in
      // the caller's proj, whose last row has no padding)
      using V = simd<T>;
      for (int j = 0; j < dk; j += V::W) V::store(dPu + j, V::set1(a) * V::load(Ru + j));
      for (int j = 0; j < dk; ++j) Cu[j] = a * Pt[j];
    }
    if (dx) expand(s.dP.data(), dW, cnt, dk, pn.UcT(k), dm, n, s.rowY.data(), stream_dx, pf);
    if (acc) {
      outer(s.rowB.data(), s.dP.data(), s.rowA.data(), s.C.data(), dW, cnt, dk, n,
            acc + g.comp_acc_offset(k), pf);
    }
  }
}

// dP rows u [cnt, dW] (row stride ds) of a hard-mode group of component k (d_k = dk): dP_u =
// a_u (c_u Pk_u G_k - Q0_t), a_u = 2 lambda c_u / M, t = sel[u], for the level of slot t. Pk rows
// (d_k entries) are pointers; Q0 rows have stride qs.
template <typename T>
void hard_train_dP(const T* const* Pk, const T* Q0, int qs, const T* G, const int* sel, int cnt,
                   int dk, int dW, const T* levels, T inv_M, const uint32_t* lev, T* dP, int ds) {
  using namespace kernels;
  project(Pk, cnt, dk, G, dW, dW, dP, ds, dk);  // Pk G_k, 0 past d_k
  for (int u = 0; u < cnt; ++u) {
    const int t = sel[u];
    const T* lv = levels + (int64_t)lev[t] * kLvCols;
    const T cl = lv[kLvC], a = T(2) * lv[kLvLambda] * inv_M * cl;
    const T* Qt = Q0 + (int64_t)t * qs;
    T* dPu = dP + (int64_t)u * ds;
    // whole vectors: the lanes past d_k get values nobody reads (outer takes d_k columns), and
    // Q0's last row is followed by a vector of padding (BlockScratch::P)
    using V = simd<T>;
    const typename V::v av = V::set1(a), cv = V::set1(cl);
    for (int j = 0; j < dk; j += V::W)
      V::store(dPu + j, av * (cv * V::load(dPu + j) - V::load(Qt + j)));
  }
}

// Whether the hard training step takes dP = c g U_k in d-space (train_block), which needs the
// Gram panels: their K products of n x d_k x d_k cost less than the M products of n x d_k they
// replace once the batch is at least twice the summed subspace dimension.
inline bool hard_train_uses_gram(int64_t M, const int32_t* dims, int K) {
  int64_t sum = 0;
  for (int k = 0; k < K; ++k) sum += dims[k];
  return M >= 2 * sum;
}

// The block a thread runs after the current one: slots m0 .. m0 + S - 1 of instance p, whose
// training set starts at X (S = 0: none).
template <typename T>
struct NextBlock {
  const T* X = nullptr;
  uint32_t p = 0, m0 = 0;
  int S = 0;
};
#define MOLRG_TRAIN_NEXT_BLOCK 1  // train_block takes a NextBlock (the paired harness asks)

// Fused training step on slots m0 .. m0 + S - 1 of instance p (kernels/train_step.h math):
// writes the per-slot loss lambda ||x_theta - x_i||^2 and accumulates d/dU of the mean loss
// (scaled by inv_M) into acc. Hard mode with gram (the panels hold G_k) takes dP in d-space.
// next: the block this thread runs next (the rest of this instance, or the first block of the
// instance it claimed next); its draws are made now and its rows prefetched along this block.
// MOLRG_FULL_WIDTH (vec_width.h): its normals (philox_normals_slots, inlined here) and its
// other vectorised loops at the full vector width.
template <typename T>
MOLRG_FULL_WIDTH void train_block(const T* X, uint32_t N, int S, uint32_t m0, uint32_t p,
                                  const Panels<T>& pn, const int32_t* dims, const T* levels,
                                  const T* level_bias, uint32_t L, int mode, bool gram,
                                  uint64_t seed, uint32_t step, T inv_M, T* loss, T* acc,
                                  BlockScratch<T>& s, const NextBlock<T>& next) {
  using namespace kernels;
  const PanelGeom& g = pn.g;
  const int n = g.n, K = g.K, D = g.D, Dp = g.Dp, dW = g.dW;
  if (s.next_p == (int64_t)p && s.next_m0 == m0) {  // drawn and prefetched by the last block
    std::swap(s.idx, s.nidx);
    std::swap(s.lev, s.nlev);
  } else {
    philox_index_level_slots(seed, step, p, m0, S, N, L, s.idx.data(), s.lev.data());
    s.touch_rows(X, n, S);
  }
  // Draw the next block now and prefetch its rows a few lines at a time along this block: a
  // prefetch does not hold up the core unless the miss buffers are full, which a burst of them
  // (or of loads, as touch_rows) makes them. In a harness running both builds alternately in
  // one process, spread over the normals: one thread, hard -12%, soft -6%; two threads -8% and
  // -6%. With AVX-512, soft mode spreads them over its tiles too (as many next() calls as its
  // last block made; the first block: the normals and as many again): paired on two threads
  // (Xeon VM), soft 0.99 in the op and 0.95 in the harness. Not hard mode, whose tiles are fewer
  // (1.01 in the op), nor the AVX2 build (soft 1.04 in the harness against 0.99 without).
  s.next_p = -1;
  if (next.S > 0) {
    philox_index_level_slots(seed, step, next.p, next.m0, next.S, N, L, s.nidx.data(),
                             s.nlev.data());
    s.list_lines(next.X, n, s.nidx.data(), next.S);
    s.next_p = next.p;
    s.next_m0 = next.m0;
  }
  RangePrefetch pf;
  if (s.next_p >= 0) pf.add_list(s.lines.data(), s.nlines);
  const bool over_tiles = mode == kSoft && kVecBytes == 64;
  pf.spread(!over_tiles        ? philox_normal_steps(S, n)
            : s.ahead_calls > 0 ? s.ahead_calls
                                : 2 * philox_normal_steps(S, n));
  RangePrefetch* tpf = over_tiles ? &pf : nullptr;
  philox_normals_slots<T>(seed, step, p, m0, S, n, s.xt.data(), &pf);
  for (int t = 0; t < S; ++t) {
    const T* x0 = X + (int64_t)s.idx[t] * n;
    const T* lv = levels + (int64_t)s.lev[t] * kLvCols;
    const T sc = lv[kLvS], gm = lv[kLvGamma];
    T* xt = s.xt.data() + (int64_t)t * n;
    for (int e = 0; e < n; ++e) xt[e] = sc * x0[e] + gm * xt[e];
    s.rowA[t] = x0;
  }
  // Row t holds yh with y = c yh (soft: c = 1): the loss of slot t, and c g (g = dL/dy) in place.
  auto loss_and_grad = [&](int t, T* yt, bool scaled) {
    const T* x0 = s.rowA[t];
    const T* lv = levels + (int64_t)s.lev[t] * kLvCols;
    const T lam = lv[kLvLambda], c = scaled ? lv[kLvC] : T(1);
    const T gscale = T(2) * lam * inv_M * c;
    // vector partial sums added as a tree (simd::hsum), then the rest of the row
    using V = simd<T>;
    const typename V::v cv = V::set1(c), gv = V::set1(gscale);
    typename V::v ev{};
    int e = 0;
    for (; e + V::W <= n; e += V::W) {
      const typename V::v d = cv * V::load(yt + e) - V::load(x0 + e);
      ev += d * d;
      V::store(yt + e, gv * d);
    }
    T err = V::hsum(ev);
    for (; e < n; ++e) {
      const T d = c * yt[e] - x0[e];
      err += d * d;
      yt[e] = gscale * d;
    }
    loss[t] = lam * err;
  };
  if (mode == kSoft) {
    for (int t = 0; t < S; ++t) {
      s.rowB[t] = s.xt.data() + (int64_t)t * n;
      s.rowY[t] = s.y.data() + (int64_t)t * n;
      s.rowC[t] = s.rowY[t];
    }
    project(s.rowB.data(), S, n, pn.Uf(), n, Dp, s.P.data(), Dp, D, tpf);
    for (int t = 0; t < S; ++t) {
      const T* lv = levels + (int64_t)s.lev[t] * kLvCols;
      s.cs[t] = lv[kLvC];
      s.phis[t] = lv[kLvPhi];
    }
    const bool lanes = soft_lanes_apply<T>(g);
    if (lanes) {
      with_lanes_K(K, [&](auto kc) {
        soft_train_lanes_fwd<T, decltype(kc)::value>(s.P.data(), S, g, level_bias, s.lev.data(),
                                                     s);
      });
    } else {
      comp_sums(s.P.data(), s.P.data(), S, pn, s.sums2.data(), s);  // ||P_k||^2, kept for below
      soft_block_weights(s.P.data(), s.sums2.data(), s.phis.data(), s.cs.data(), level_bias,
                         level_bias ? BiasRows::kLevel : BiasRows::kNone, s.lev.data(), S, pn,
                         s.w.data(), s);
    }
    expand(s.C.data(), Dp, S, D, pn.UfT(), D, n, s.rowY.data(), false, tpf, lanes);
    for (int t = 0; t < S; ++t) loss_and_grad(t, s.rowY[t], false);
    project(s.rowC.data(), S, n, pn.Uf(), n, Dp, s.R.data(), Dp, D, tpf);
    if (lanes) {
      with_lanes_K(K, [&](auto kc) {
        soft_train_lanes_bwd<T, decltype(kc)::value>(s.R.data(), S, g, s);
      });
    } else {
      soft_block_grads<T>(s.R.data(), s.P.data(), s.sums2.data(), s.w.data(), s.cs.data(),
                          s.phis.data(), S, pn, nullptr, nullptr, nullptr, s);
    }
    outer(s.rowB.data(), s.dP.data(), s.rowC.data(), s.C.data(), Dp, S, D, n, acc, tpf, lanes);
    s.finish_ahead(pf);
    return;
  }
  // hard: the component of the clean sample (eq. (17)), then one group per component. The
  // clean projections Q0 = x_i U (s.P) stay for the gradient below.
  project(s.rowA.data(), S, n, pn.Uf(), n, Dp, s.P.data(), Dp, D);
  comp_sums(s.P.data(), s.P.data(), S, pn, s.sums.data(), s);
  for (int t = 0; t < S; ++t) s.comp[t] = dae_argmax(s.sums.data() + (int64_t)t * g.Kp, K);
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
    // Pk = x_t U_k (rows rowE[u], stride Dp, 0 past d_k); y = c U_k Pk is expanded without the
    // c, which the loss pass applies, leaving c g in the rows: the gradient's terms c g (x) Pk and
    // dP = c g U_k need no per-sample scaling of Pk or of g U_k.
    project(xrows.data(), cnt, n, pn.Uc(k), n, dW, s.E.data(), Dp, dk);
    expand(s.E.data(), Dp, cnt, dk, pn.UcT(k), g.dm, n, s.rowY.data());
    for (int u = 0; u < cnt; ++u) loss_and_grad(sel[u], s.rowY[u], true);
    if (gram) {
      // dP = c g U_k with g = (2 lambda / M)(c U_k Pk - x_i), taken in d-space as
      // (2 lambda c / M)(c Pk G_k - Q0_k), Q0_k = x_i U_k: no second pass over the n-vectors.
      hard_train_dP<T>(s.rowE.data(), s.P.data() + k * g.dm, Dp, pn.Gram(k), sel, cnt, dk, dW,
                       levels, inv_M, s.lev.data(), s.dP.data(), Dp);
    } else {
      project(s.rowC.data(), cnt, n, pn.Uc(k), n, dW, s.dP.data(), Dp, dk);  // (c g) U_k
    }
    outer(xrows.data(), s.dP.data(), s.rowC.data(), s.E.data(), Dp, cnt, dk, n,
          acc + g.comp_acc_offset(k));
  }
  pf.finish();
}

}  // namespace molrg::cpu
