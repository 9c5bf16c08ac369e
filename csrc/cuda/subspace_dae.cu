// CUDA kernels of the multi-subspace denoiser (SPEC section 3): forward, backward, hard_assign.
// Torch-free: raw pointers, sizes and a stream (see launchers.h).
//
// Work split: one warp per sample for everything per-sample. A warp computes P_k = U_k^T x with
// lanes striding over the n rows and a shuffle reduction per column, writes proj/w (the forward's
// saved tensors) to global memory, and lane 0 runs the small K-sized scalar stage (soft-max,
// argmax, dlogit) with the shared MOLRG_HD helpers of kernels/subspace_dae.h. __syncwarp orders
// the global writes between the lanes of the warp. Nothing of size B x n x K is materialised.
//
// dU = sum_b [x_b dP_b^T + g_b (c_b w_b P_b)^T] is a reduction over the batch: the per-sample
// backward stores dP [P,B,K,dm] in the workspace, then one thread per dU entry sums a chunk of
// the batch in a fixed order; chunks (when the batch is long) are summed by a second small
// kernel. No atomics, so the result is bitwise reproducible run to run.
#include <cuda_runtime.h>

#include <algorithm>

#include "../kernels/subspace_dae.h"
#include "launchers.h"
#include "warp.cuh"

namespace molrg::cuda {
namespace {

using namespace molrg::kernels;

constexpr int kWarp = 32;
constexpr int kThreads = 256;  // 8 warps, 8 samples per block
constexpr int64_t kMaxBlocks = 65535LL * 32;
// 3 resident blocks (24 warps) per SM: a register cap of 85 per thread, enough for the fp64
// forward without spills (the default heuristic picked 64 and spilled).
constexpr int kMinBlocks = 3;

// Column j of U_k (n x dm, row-major) dotted with v, reduced over the warp (every lane gets it).
template <typename T>
__device__ __forceinline__ T warp_col_dot(const T* __restrict__ Uk, const T* __restrict__ v, int n,
                                          int dm, int j, int lane) {
  T acc = T(0);
  for (int i = lane; i < n; i += kWarp) acc += Uk[(int64_t)i * dm + j] * v[i];
  return warp_sum(acc);
}

int blocks_for(int64_t warps_needed) {
  const int64_t per_block = kThreads / kWarp;
  return (int)std::min<int64_t>((warps_needed + per_block - 1) / per_block, kMaxBlocks);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
dae_forward_kernel(const T* __restrict__ x, const T* __restrict__ U, const T* __restrict__ c,
                   const T* __restrict__ phi, const T* __restrict__ bias,
                   const int64_t* __restrict__ assign, const int32_t* __restrict__ dims,
                   int64_t P, int64_t B, int n, int K, int dm, int mode, T* __restrict__ y,
                   T* proj, T* w) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) / kWarp;
  const int64_t total = P * B;
  for (int64_t s = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; s < total;
       s += nwarps) {
    const int64_t p = s / B;
    const T* xs = x + s * n;
    const T* Ui = U + p * K * (int64_t)n * dm;
    T* ps = proj + s * K * dm;
    T* ws = w + s * K;
    for (int k = 0; k < K; ++k) {
      const int dk = dims[k];
      const T* Uk = Ui + (int64_t)k * n * dm;
      for (int j = 0; j < dk; ++j) {
        const T v = warp_col_dot(Uk, xs, n, dm, j, lane);
        if (lane == 0) ps[k * dm + j] = v;
      }
      for (int j = dk + lane; j < dm; j += kWarp) ps[k * dm + j] = T(0);
    }
    __syncwarp();
    if (lane == 0) {
      // Squared norms go into ws first; dae_weights may run in place (w[k] only reads sq[k]).
      for (int k = 0; k < K; ++k) {
        const int dk = dims[k];
        T sq = T(0);
        for (int j = 0; j < dk; ++j) sq += ps[k * dm + j] * ps[k * dm + j];
        ws[k] = sq;
      }
      int k0 = -1;
      if (mode == kHard) k0 = assign ? (int)assign[s] : dae_argmax<T>(ws, K);
      dae_weights<T>(ws, bias ? bias + s * K : nullptr, phi[s], K, mode, k0, ws);
    }
    __syncwarp();
    const T cs = c[s];
    for (int i = lane; i < n; i += kWarp) {
      T acc = T(0);
      for (int k = 0; k < K; ++k) {
        const T wk = ws[k];
        if (wk == T(0)) continue;
        const int dk = dims[k];
        const T* row = Ui + ((int64_t)k * n + i) * dm;
        const T* pk = ps + k * dm;
        T dot = T(0);
        for (int j = 0; j < dk; ++j) dot += row[j] * pk[j];
        acc += (cs * wk) * dot;
      }
      y[s * n + i] = acc;
    }
    __syncwarp();
  }
}

// Per-sample backward: dP (into dPw), dc, dphi, dbias and optionally dx; rpw [P*B*K] holds the
// <r_k, P_k> of each sample.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
dae_backward_kernel(const T* __restrict__ g, const T* __restrict__ U, const T* __restrict__ c,
                    const T* __restrict__ phi, const T* __restrict__ proj,
                    const T* __restrict__ w, const int32_t* __restrict__ dims, int64_t P,
                    int64_t B, int n, int K, int dm, int mode, T* __restrict__ dx, T* dc,
                    T* dphi, T* dbias, T* dPw, T* rpw) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) / kWarp;
  const int64_t total = P * B;
  for (int64_t s = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; s < total;
       s += nwarps) {
    const int64_t p = s / B;
    const T* gs = g + s * n;
    const T* Ui = U + p * K * (int64_t)n * dm;
    const T* ps = proj + s * K * dm;
    const T* ws = w + s * K;
    T* dPs = dPw + s * K * dm;
    T* dbs = dbias + s * K;
    T* rps = rpw + s * K;
    // r_k = U_k^T g (zero where w_k == 0 or past d_k), stored in dPs.
    for (int k = 0; k < K; ++k) {
      const int dk = ws[k] == T(0) ? 0 : dims[k];
      const T* Uk = Ui + (int64_t)k * n * dm;
      for (int j = 0; j < dk; ++j) {
        const T v = warp_col_dot(Uk, gs, n, dm, j, lane);
        if (lane == 0) dPs[k * dm + j] = v;
      }
      for (int j = dk + lane; j < dm; j += kWarp) dPs[k * dm + j] = T(0);
    }
    __syncwarp();
    // dP_k from r_k in place, dlogit into dbias, dc and dphi: the CPU's per-sample formulas
    if (lane == 0)
      dae_dP_from_r<T>(dPs, ps, ws, c[s], phi[s], K, dm, dims, mode, dPs, dbs, rps, dc + s,
                       dphi + s);
    __syncwarp();
    if (dx) {
      for (int i = lane; i < n; i += kWarp) {
        T acc = T(0);
        for (int k = 0; k < K; ++k) {
          if (ws[k] == T(0)) continue;
          const int dk = dims[k];
          const T* row = Ui + ((int64_t)k * n + i) * dm;
          const T* dpk = dPs + k * dm;
          T dot = T(0);
          for (int j = 0; j < dk; ++j) dot += row[j] * dpk[j];
          acc += dot;
        }
        dx[s * n + i] = acc;
      }
    }
    __syncwarp();
  }
}

// How many batch chunks the dU reduction uses: enough threads to fill a GPU (~64k), chunks of at
// least 32 samples, at most 256 chunks.
int64_t dU_splits(int64_t P, int64_t B, int n, int K, int dm) {
  const int64_t outs = std::max<int64_t>(1, P * K * (int64_t)n * dm);
  const int64_t want = (65536 + outs - 1) / outs;
  const int64_t most = std::max<int64_t>(1, B / 32);
  return std::max<int64_t>(1, std::min<int64_t>({want, most, 256}));
}

// dU[p,k,i,j] (or its partial sum over batch chunk blockIdx.y) for j < d_k; zero past d_k.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
dae_dU_kernel(const T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ c,
              const T* __restrict__ proj, const T* __restrict__ w, const T* __restrict__ dPw,
              const int32_t* __restrict__ dims, int64_t P, int64_t B, int n, int K, int dm,
              int64_t chunk, T* __restrict__ out) {
  const int64_t outs = P * K * (int64_t)n * dm;
  const int64_t b0 = (int64_t)blockIdx.y * chunk;
  const int64_t b1 = b0 + chunk < B ? b0 + chunk : B;
  T* o_base = out + (int64_t)blockIdx.y * outs;
  for (int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; o < outs;
       o += (int64_t)gridDim.x * blockDim.x) {
    const int j = (int)(o % dm);
    const int i = (int)((o / dm) % n);
    const int k = (int)((o / ((int64_t)dm * n)) % K);
    const int64_t p = o / ((int64_t)dm * n * K);
    T acc = T(0);
    if (j < dims[k]) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = p * B + b;
        const T wk = w[s * K + k];
        if (wk == T(0)) continue;
        const int64_t pj = (s * K + k) * dm + j;
        acc += x[s * n + i] * dPw[pj] + ((c[s] * wk) * g[s * n + i]) * proj[pj];
      }
    }
    o_base[o] = acc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
sum_chunks_kernel(const T* __restrict__ parts, int64_t chunks, int64_t outs, T* __restrict__ out) {
  for (int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; o < outs;
       o += (int64_t)gridDim.x * blockDim.x) {
    T acc = T(0);
    for (int64_t s = 0; s < chunks; ++s) acc += parts[s * outs + o];
    out[o] = acc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
hard_assign_kernel(const T* __restrict__ x, const T* __restrict__ U,
                   const int32_t* __restrict__ dims, int64_t P, int64_t B, int n, int K, int dm,
                   int64_t* __restrict__ out) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) / kWarp;
  const int64_t total = P * B;
  for (int64_t s = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; s < total;
       s += nwarps) {
    const int64_t p = s / B;
    const T* xs = x + s * n;
    const T* Ui = U + p * K * (int64_t)n * dm;
    int best = 0;
    T best_sq = T(0);
    for (int k = 0; k < K; ++k) {
      const int dk = dims[k];
      const T* Uk = Ui + (int64_t)k * n * dm;
      T sq = T(0);
      for (int j = 0; j < dk; ++j) {
        const T v = warp_col_dot(Uk, xs, n, dm, j, lane);
        sq += v * v;
      }
      if (k == 0 || sq > best_sq) {  // strict: ties go to the lowest k
        best = k;
        best_sq = sq;
      }
    }
    if (lane == 0) out[s] = best;
  }
}

int64_t grid_1d(int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>((items + kThreads - 1) / kThreads, kMaxBlocks));
}

}  // namespace

template <typename T>
cudaError_t launch_subspace_dae_forward(const T* x, const T* U, const T* c, const T* phi,
                                        const T* bias, const int64_t* assign,
                                        const int32_t* dims, int64_t P, int64_t B, int n, int K,
                                        int dm, int mode, T* y, T* proj, T* w,
                                        cudaStream_t stream) {
  if (P * B == 0) return cudaSuccess;
  dae_forward_kernel<T><<<blocks_for(P * B), kThreads, 0, stream>>>(
      x, U, c, phi, bias, assign, dims, P, B, n, K, dm, mode, y, proj, w);
  return cudaGetLastError();
}

int64_t subspace_dae_backward_workspace(int64_t P, int64_t B, int n, int K, int dm,
                                        bool need_dU) {
  const int64_t dP_rp = P * B * K * ((int64_t)dm + 1);  // dP, then <r_k, P_k> per sample
  if (!need_dU) return dP_rp;
  const int64_t splits = dU_splits(P, B, n, K, dm);
  return dP_rp + (splits > 1 ? splits * P * K * (int64_t)n * dm : 0);
}

template <typename T>
cudaError_t launch_subspace_dae_backward(const T* g, const T* x, const T* U, const T* c,
                                         const T* phi, const T* proj, const T* w,
                                         const int32_t* dims, int64_t P, int64_t B, int n, int K,
                                         int dm, int mode, T* dx, T* dU, T* dc, T* dphi,
                                         T* dbias, T* workspace, cudaStream_t stream) {
  const int64_t outs = P * K * (int64_t)n * dm;
  if (P * B == 0) {
    if (dU && outs > 0) return cudaMemsetAsync(dU, 0, outs * sizeof(T), stream);
    return cudaSuccess;
  }
  T* dPw = workspace;
  T* rpw = dPw + P * B * K * (int64_t)dm;
  dae_backward_kernel<T><<<blocks_for(P * B), kThreads, 0, stream>>>(
      g, U, c, phi, proj, w, dims, P, B, n, K, dm, mode, dx, dc, dphi, dbias, dPw, rpw);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !dU) return err;
  const int64_t splits = dU_splits(P, B, n, K, dm);
  const int64_t chunk = (B + splits - 1) / splits;
  T* target = splits > 1 ? rpw + P * B * K : dU;
  const dim3 grid((unsigned)grid_1d(outs), (unsigned)splits);
  dae_dU_kernel<T><<<grid, kThreads, 0, stream>>>(x, g, c, proj, w, dPw, dims, P, B, n, K, dm,
                                                  chunk, target);
  err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  sum_chunks_kernel<T><<<(unsigned)grid_1d(outs), kThreads, 0, stream>>>(target, splits, outs, dU);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_hard_assign(const T* x, const T* U, const int32_t* dims, int64_t P, int64_t B,
                               int n, int K, int dm, int64_t* out, cudaStream_t stream) {
  if (P * B == 0) return cudaSuccess;
  hard_assign_kernel<T><<<blocks_for(P * B), kThreads, 0, stream>>>(x, U, dims, P, B, n, K, dm,
                                                                     out);
  return cudaGetLastError();
}

#define MOLRG_INSTANTIATE(T)                                                                   \
  template cudaError_t launch_subspace_dae_forward<T>(                                         \
      const T*, const T*, const T*, const T*, const T*, const int64_t*, const int32_t*,       \
      int64_t, int64_t, int, int, int, int, T*, T*, T*, cudaStream_t);                         \
  template cudaError_t launch_subspace_dae_backward<T>(                                        \
      const T*, const T*, const T*, const T*, const T*, const T*, const T*, const int32_t*,   \
      int64_t, int64_t, int, int, int, int, T*, T*, T*, T*, T*, T*, cudaStream_t);             \
  template cudaError_t launch_hard_assign<T>(const T*, const T*, const int32_t*, int64_t,      \
                                             int64_t, int, int, int, int64_t*, cudaStream_t);
MOLRG_INSTANTIATE(float)
MOLRG_INSTANTIATE(double)
#undef MOLRG_INSTANTIATE

}  // namespace molrg::cuda
