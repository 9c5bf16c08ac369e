// CUDA kernels of the empirical optimal (multi-delta) denoiser (seed 003, eq. (5); CPU:
// csrc/cpu/optimal_denoiser_cpu.cpp, which states the contract: y, lse of the true logits
// l_bj = -||x_b - s_b X_j||^2 / (2 gamma_b^2), and the backward from the saved y and lse).
//
// Flash-attention style, no B x N matrix. A thread block (256 threads = 8 warps) owns kQ = 16
// queries and one contiguous range of training tiles ("split"); a tile is kJ = 32 training points
// (lane j of a warp owns point j). Per tile:
//   1. distances: the feature axis is staged in chunks of kK = 32 columns in shared memory,
//      converted to double; warp w accumulates ||x_q - s_q X_j||^2 for queries q = w, w + 8 and
//      its lane's point directly from the difference (no ||x||^2 - 2 s <x, X> + ... cancellation,
//      so float input needs no precision switch: the difference, its square and the sums are in
//      double). The backward accumulates a_qj = <g_q, X_j> in the same pass.
//   2. soft-max (one warp per query, shuffle reductions): forward, the online max-subtracted
//      update of the running (m, l) in double and the weights p_j = exp(l_j - m) (od_weight, in the
//      input type as on the CPU); backward, w_j = exp(l_j - lse), q_j = w_j (a_j - <g, y>), the
//      running sums of q_j and w_j, and the lse consistency test (od_lse_exceeded).
//   3. accumulation: thread k (strided over n) holds column k of the tile's 32 points in
//      registers and updates row k of every query: y <- scale y + sum_j p_j X_j (forward) or
//      acc <- acc + sum_j q_j X_j (backward), the tile sum in double, the running value in the
//      input type in global memory (rows owned by this block). A tile whose weights all underflow
//      (small noise, far from the running maxima) skips this phase.
// Few queries cannot fill the GPU with one block per 16 queries: the training set is then cut
// into `splits` ranges (grid.y; about kTargetBlocks blocks in all, at least 4 tiles per split,
// splits <= N / B so that the workspace is no larger than X), each writing its partial state to a
// workspace, and a second kernel merges them (log-sum-exp; the backward just sums) and
// normalises, one thread per output entry. With one split the partial state lives in the output
// itself. The two merge kernels carry no __launch_bounds__(256): with it ptxas capped them at 32
// registers and the fp64 finish kernel spilled.
#include <cuda_runtime.h>

#include <algorithm>

#include "../kernels/optimal_denoiser.h"
#include "launchers.h"
#include "warp.cuh"

namespace molrg::cuda {
namespace {

using namespace molrg::kernels;
using Acc = double;

constexpr int kQ = 16;                      // queries per block
constexpr int kJ = 32;                      // training points per tile (one per lane)
constexpr int kK = 32;                      // feature columns per staged chunk
constexpr int kThreads = 256;               // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRows = kQ / kWarps;          // queries per warp in phases 1 and 2
constexpr int64_t kTargetBlocks = 1024;     // enough resident blocks for a large GPU
constexpr int64_t kMinTilesPerSplit = 4;    // a split streams at least 128 training points
constexpr int kMergeThreads = 256;
static_assert(kQ % kWarps == 0, "queries must split evenly over the warps");

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Shared memory of a block: the staged chunks (padded rows: lanes read different rows of Xs),
// per-query constants and running state, and the tile's weights.
struct Smem {
  Acc xs[kQ][kK + 1];
  Acc gs[kQ][kK + 1];  // backward only: grad_y chunk
  Acc Xs[kJ][kK + 1];
  Acc P[kQ][kJ];       // forward p_j, backward q_j
  Acc s[kQ], inv2g2[kQ];
  Acc st0[kQ], st1[kQ];  // forward (m, l); backward (qsum, wsum)
  Acc scale[kQ];         // forward: rescale factor of the running y for this tile
  Acc ref[kQ];           // backward: lse and <g, y>
  Acc gy[kQ];
};

// Training range of split `sp` of `splits` over `tiles` tiles: [j0, j1).
__device__ __forceinline__ void split_range(int sp, int splits, int64_t tiles, int64_t N,
                                            int64_t* j0, int64_t* j1) {
  *j0 = (int64_t)sp * tiles / splits * kJ;
  *j1 = min64(N, ((int64_t)sp + 1) * tiles / splits * kJ);
}

// Phase 1 for one tile (points jt .. jt + jn): d[r] = ||x_q - s_q X_j||^2 and, with g, a[r] =
// <g_q, X_j> for q = warp + r * kWarps, j = lane. Rows past the batch and points past the tile
// are staged as zeros (their results are ignored).
template <typename T, bool kBackward>
__device__ __forceinline__ void tile_distances(Smem& sm, const T* __restrict__ x,
                                               const T* __restrict__ g,
                                               const T* __restrict__ X, int64_t qb, int qn,
                                               int64_t jt, int jn, int64_t n, Acc (&d)[kRows],
                                               Acc (&a)[kRows]) {
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
#pragma unroll
  for (int r = 0; r < kRows; ++r) d[r] = a[r] = Acc(0);
  for (int64_t k0 = 0; k0 < n; k0 += kK) {
    const int kc = (int)min64(kK, n - k0);
    for (int e = t; e < kQ * kK; e += kThreads) {
      const int q = e / kK, kk = e % kK;
      const bool ok = q < qn && kk < kc;
      const int64_t off = (qb + q) * n + k0 + kk;
      sm.xs[q][kk] = ok ? Acc(x[off]) : Acc(0);
      if (kBackward) sm.gs[q][kk] = ok ? Acc(g[off]) : Acc(0);
    }
    for (int e = t; e < kJ * kK; e += kThreads) {
      const int j = e / kK, kk = e % kK;
      sm.Xs[j][kk] = (j < jn && kk < kc) ? Acc(X[(jt + j) * n + k0 + kk]) : Acc(0);
    }
    __syncthreads();
    for (int kk = 0; kk < kc; ++kk) {
      const Acc Xv = sm.Xs[lane][kk];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int q = warp + r * kWarps;
        const Acc diff = sm.xs[q][kk] - sm.s[q] * Xv;
        d[r] = fma(diff, diff, d[r]);
        if (kBackward) a[r] = fma(sm.gs[q][kk], Xv, a[r]);
      }
    }
    __syncthreads();
  }
}

// Phase 3: rows[q, k] <- scale_q rows[q, k] + sum_j P[q][j] X[jt + j, k] for the block's queries
// (scale = 1 in the backward), thread k strided over the columns.
template <typename T, bool kScale>
__device__ __forceinline__ void tile_accumulate(const Smem& sm, const T* __restrict__ X,
                                                int64_t jt, int jn, int qn, int64_t n,
                                                T* __restrict__ rows) {
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    T xc[kJ];
#pragma unroll
    for (int j = 0; j < kJ; ++j) xc[j] = j < jn ? X[(jt + j) * n + k] : T(0);
    for (int q = 0; q < qn; ++q) {
      Acc acc = Acc(0);
#pragma unroll
      for (int j = 0; j < kJ; ++j) acc = fma(sm.P[q][j], Acc(xc[j]), acc);
      T* out = rows + q * n + k;
      *out = kScale ? static_cast<T>(fma(sm.scale[q], Acc(*out), acc))
                    : static_cast<T>(Acc(*out) + acc);
    }
  }
}

// Per-query constants; rows past the batch get harmless values.
template <typename T>
__device__ __forceinline__ void load_query_constants(Smem& sm, const T* __restrict__ sp,
                                                     const T* __restrict__ gp, int64_t qb,
                                                     int qn) {
  const int q = threadIdx.x;
  if (q < kQ) {
    const Acc s = q < qn ? Acc(sp[qb + q]) : Acc(1);
    const Acc g = q < qn ? Acc(gp[qb + q]) : Acc(1);
    sm.s[q] = s;
    sm.inv2g2[q] = Acc(0.5) / (g * g);
  }
}

// Last step of the forward and backward kernels: this split's per-query state (st0, st1) into
// stats [2, splits, B] (split = blockIdx.y of gridDim.y).
__device__ __forceinline__ void store_split_stats(const Smem& sm, int64_t B, int64_t qb, int qn,
                                                  Acc* __restrict__ stats) {
  __syncthreads();
  const int t = threadIdx.x, split = blockIdx.y, splits = gridDim.y;
  if (t < qn) {
    stats[(int64_t)split * B + qb + t] = sm.st0[t];
    stats[((int64_t)splits + split) * B + qb + t] = sm.st1[t];
  }
}

// Forward: grid (query blocks, splits). Leaves, per split, the unnormalised state
// ypart[sp, b] = sum_j exp(l_bj - m) X_j, m = stats[0][sp, b], l = stats[1][sp, b].
template <typename T>
__global__ void __launch_bounds__(kThreads)
od_forward_kernel(const T* __restrict__ x, const T* __restrict__ X, const T* __restrict__ sp,
                  const T* __restrict__ gp, int64_t B, int64_t N, int64_t n,
                  T* __restrict__ ypart, Acc* __restrict__ stats) {
  __shared__ Smem sm;
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  const int split = blockIdx.y, splits = gridDim.y;
  const int64_t qb = (int64_t)blockIdx.x * kQ;
  const int qn = (int)min64(kQ, B - qb);
  int64_t j0, j1;
  split_range(split, splits, (N + kJ - 1) / kJ, N, &j0, &j1);
  T* rows = ypart + ((int64_t)split * B + qb) * n;
  load_query_constants<T>(sm, sp, gp, qb, qn);
  if (t < kQ) {
    sm.st0[t] = -INFINITY;
    sm.st1[t] = Acc(0);
  }
  for (int64_t k = t; k < n; k += kThreads)  // same thread <-> column mapping as phase 3
    for (int q = 0; q < qn; ++q) rows[q * n + k] = T(0);

  for (int64_t jt = j0; jt < j1; jt += kJ) {
    const int jn = (int)min64(kJ, j1 - jt);
    Acc d[kRows], a[kRows];
    tile_distances<T, false>(sm, x, nullptr, X, qb, qn, jt, jn, n, d, a);
    bool any = false;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int q = warp + r * kWarps;
      const Acc l = lane < jn ? -d[r] * sm.inv2g2[q] : Acc(-INFINITY);
      const Acc m_old = sm.st0[q], l_old = sm.st1[q];
      const Acc m_new = fmax(m_old, warp_max(l));
      const Acc scale = m_new > m_old ? exp(m_old - m_new) : Acc(1);  // 0 from m_old = -inf
      const T p = (lane < jn && m_new > Acc(-INFINITY)) ? od_weight<T, Acc>(l, m_new) : T(0);
      const Acc psum = warp_sum(Acc(p));
      sm.P[q][lane] = Acc(p);
      __syncwarp();
      if (lane == 0) {
        sm.st0[q] = m_new;
        sm.st1[q] = l_old * scale + psum;
        sm.scale[q] = scale;
      }
      any |= q < qn && psum > Acc(0);
    }
    // At small noise most tiles lie far below the running maxima: every weight underflows.
    if (!__syncthreads_or(any)) continue;
    tile_accumulate<T, true>(sm, X, jt, jn, qn, n, rows);
  }
  store_split_stats(sm, B, qb, qn, stats);
}

// Merge of the forward splits, one thread per entry of y: y = sum_s e^{m_s - M} ypart_s / L,
// L = sum_s e^{m_s - M} l_s, lse = M + log L. ypart may be y itself (one split).
template <typename T>
__global__ void od_merge_kernel(const T* ypart, const Acc* __restrict__ stats, int64_t B,
                                int64_t n, int splits, T* y, double* __restrict__ lse) {
  const int64_t e = (int64_t)blockIdx.x * kMergeThreads + threadIdx.x;
  if (e >= B * n) return;
  const int64_t b = e / n, k = e % n;
  const Acc* m = stats;
  const Acc* l = stats + (int64_t)splits * B;
  Acc M = -INFINITY;
  for (int s = 0; s < splits; ++s) M = fmax(M, m[(int64_t)s * B + b]);
  Acc L = 0, acc = 0;
  for (int s = 0; s < splits; ++s) {
    const Acc ms = m[(int64_t)s * B + b];
    const Acc w = ms == M ? Acc(1) : exp(ms - M);
    L += w * l[(int64_t)s * B + b];
    acc += w * Acc(ypart[((int64_t)s * B + b) * n + k]);
  }
  // L >= 1: the maximum logit contributes exp(0) to its split.
  y[e] = static_cast<T>(acc / L);
  if (k == 0) lse[b] = M + log(L);
}

// Backward: grid (query blocks, splits). Per split: apart[sp, b] = sum_j q_bj X_j,
// stats[0][sp, b] = sum_j q_bj, stats[1][sp, b] = sum_j w_bj; *failed = 1 when a logit exceeds
// the saved lse.
template <typename T>
__global__ void __launch_bounds__(kThreads)
od_backward_kernel(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ X,
                   const T* __restrict__ sp, const T* __restrict__ gp, const T* __restrict__ y,
                   const double* __restrict__ lse, int64_t B, int64_t N, int64_t n,
                   T* __restrict__ apart, Acc* __restrict__ stats, int* __restrict__ failed) {
  __shared__ Smem sm;
  const int t = threadIdx.x, warp = t / 32, lane = t % 32;
  const int split = blockIdx.y, splits = gridDim.y;
  const int64_t qb = (int64_t)blockIdx.x * kQ;
  const int qn = (int)min64(kQ, B - qb);
  int64_t j0, j1;
  split_range(split, splits, (N + kJ - 1) / kJ, N, &j0, &j1);
  T* rows = apart + ((int64_t)split * B + qb) * n;
  load_query_constants<T>(sm, sp, gp, qb, qn);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {  // <g, y> and lse per query
    const int q = warp + r * kWarps;
    Acc v = 0;
    if (q < qn)
      for (int64_t k = lane; k < n; k += 32) v += Acc(g[(qb + q) * n + k]) * Acc(y[(qb + q) * n + k]);
    v = warp_sum(v);
    if (lane == 0) {
      sm.gy[q] = v;
      sm.ref[q] = q < qn ? Acc(lse[qb + q]) : Acc(0);
      sm.st0[q] = Acc(0);
      sm.st1[q] = Acc(0);
    }
  }
  for (int64_t k = t; k < n; k += kThreads)
    for (int q = 0; q < qn; ++q) rows[q * n + k] = T(0);

  for (int64_t jt = j0; jt < j1; jt += kJ) {
    const int jn = (int)min64(kJ, j1 - jt);
    Acc d[kRows], a[kRows];
    tile_distances<T, true>(sm, x, g, X, qb, qn, jt, jn, n, d, a);
    bool any = false;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int q = warp + r * kWarps;
      const bool valid = lane < jn && q < qn;
      const Acc l = valid ? -d[r] * sm.inv2g2[q] : Acc(-INFINITY);
      const Acc lse_q = sm.ref[q];
      const Acc rowmax = warp_max(l);
      if (lane == 0 && q < qn && od_lse_exceeded<double, Acc>(rowmax, lse_q)) atomicExch(failed, 1);
      const T w = valid ? od_weight<T, Acc>(l, lse_q) : T(0);
      const Acc qv = Acc(w) * (a[r] - sm.gy[q]);
      const Acc qsum = warp_sum(qv), wsum = warp_sum(Acc(w));
      sm.P[q][lane] = qv;
      __syncwarp();
      if (lane == 0) {
        sm.st0[q] += qsum;
        sm.st1[q] += wsum;
      }
      any |= wsum > Acc(0);
    }
    if (!__syncthreads_or(any)) continue;  // every weight of the tile underflows
    tile_accumulate<T, false>(sm, X, jt, jn, qn, n, rows);
  }
  store_split_stats(sm, B, qb, qn, stats);
}

// Backward finish, one thread per entry of dx: sums the splits and applies od_dx_entry
// (kernels/optimal_denoiser.h); apart may be dx itself (one split). *failed = 1 when every weight
// of a query underflowed (wsum = 0: lse too large for these inputs).
template <typename T>
__global__ void od_backward_finish_kernel(const T* apart, const Acc* __restrict__ stats,
                                          const T* __restrict__ y, const T* __restrict__ sp,
                                          const T* __restrict__ gp, int64_t B, int64_t n,
                                          int splits, T* dx, int* __restrict__ failed) {
  const int64_t e = (int64_t)blockIdx.x * kMergeThreads + threadIdx.x;
  if (e >= B * n) return;
  const int64_t b = e / n, k = e % n;
  Acc qs = 0, ws = 0, acc = 0;
  for (int s = 0; s < splits; ++s) {
    qs += stats[(int64_t)s * B + b];
    ws += stats[((int64_t)splits + s) * B + b];
    acc += Acc(apart[((int64_t)s * B + b) * n + k]);
  }
  const Acc gam = Acc(gp[b]);
  const Acc c = Acc(sp[b]) / (gam * gam * ws);
  dx[e] = static_cast<T>(od_dx_entry<Acc>(acc, qs, Acc(y[e]), c));
  if (k == 0 && !(ws > Acc(0))) *failed = 1;  // benign race: every writer stores 1
}

dim3 main_grid(int64_t B, int64_t splits) {
  return dim3((unsigned)((B + kQ - 1) / kQ), (unsigned)splits);
}

unsigned merge_blocks(int64_t total) {
  return (unsigned)((total + kMergeThreads - 1) / kMergeThreads);
}

}  // namespace

int64_t optimal_denoiser_splits(int64_t B, int64_t N) {
  const int64_t qblocks = std::max<int64_t>((B + kQ - 1) / kQ, 1);
  const int64_t tiles = (N + kJ - 1) / kJ;
  const int64_t want = (kTargetBlocks + qblocks - 1) / qblocks;
  // at least kMinTilesPerSplit tiles per split, and a workspace (splits x B x n) no larger than X
  const int64_t most = std::max<int64_t>(std::min(tiles / kMinTilesPerSplit, N / std::max<int64_t>(B, 1)), 1);
  return std::clamp<int64_t>(want, 1, std::min<int64_t>(most, kOdMaxSplits));
}

int64_t optimal_denoiser_max_batch() { return int64_t(kQ) * 2147483647; }

template <typename T>
cudaError_t launch_optimal_denoiser(const T* x, const T* X, const T* s, const T* gamma,
                                    int64_t B, int64_t N, int64_t n, int64_t splits, T* ypart,
                                    double* stats, T* y, double* lse, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  T* part = splits > 1 ? ypart : y;
  od_forward_kernel<T><<<main_grid(B, splits), kThreads, 0, stream>>>(x, X, s, gamma, B, N, n,
                                                                        part, stats);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  od_merge_kernel<T><<<merge_blocks(B * n), kMergeThreads, 0, stream>>>(part, stats, B, n,
                                                                         (int)splits, y, lse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_optimal_denoiser_backward(const T* grad_y, const T* x, const T* X,
                                             const T* s, const T* gamma, const T* y,
                                             const double* lse, int64_t B, int64_t N, int64_t n,
                                             int64_t splits, T* apart, double* stats, T* dx,
                                             int* failed, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  T* part = splits > 1 ? apart : dx;
  od_backward_kernel<T><<<main_grid(B, splits), kThreads, 0, stream>>>(
      grad_y, x, X, s, gamma, y, lse, B, N, n, part, stats, failed);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  od_backward_finish_kernel<T><<<merge_blocks(B * n), kMergeThreads, 0, stream>>>(
      part, stats, y, s, gamma, B, n, (int)splits, dx, failed);
  return cudaGetLastError();
}

#define MOLRG_INSTANTIATE(T)                                                                  \
  template cudaError_t launch_optimal_denoiser<T>(const T*, const T*, const T*, const T*,     \
                                                  int64_t, int64_t, int64_t, int64_t, T*,     \
                                                  double*, T*, double*, cudaStream_t);        \
  template cudaError_t launch_optimal_denoiser_backward<T>(                                   \
      const T*, const T*, const T*, const T*, const T*, const T*, const double*, int64_t,     \
      int64_t, \
      int64_t, int64_t, T*, double*, T*, int*, cudaStream_t);
MOLRG_INSTANTIATE(float)
MOLRG_INSTANTIATE(double)
#undef MOLRG_INSTANTIATE

}  // namespace molrg::cuda
