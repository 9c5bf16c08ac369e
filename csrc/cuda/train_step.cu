// CUDA fused training step of the subspace denoiser (SPEC section 3, last paragraph; the CPU
// version is csrc/cpu/train_step_cpu.cpp with the per-slot math of kernels/train_step.h).
//
// One warp per batch slot (instance p, slot m). The warp draws (i, l) and the noise eps from the
// same Philox4x32-10 stream as the CPU (kernels/philox.h: lane q computes counter block 1 + q,
// i.e. eps[4q .. 4q+3], exactly as philox_normals does serially), so the same seed gives the same
// indices and levels and the same normals up to FMA contraction (both sides evaluate log, sin
// and cos by the series of kernels/series_math.h).
// x_t, y/g, proj, dP, w and <r_k, P_k> live in shared memory (per warp: 2n + 2 K dm + 2 K
// values, train_step_smem_elems); nothing of
// size M x n goes to global memory. dU is accumulated with atomicAdd (fp32/fp64, sm_60+), so its
// low-order bits may differ run to run; the loss is written per slot and averaged by the caller.
#include <cuda_runtime.h>

#include <algorithm>

#include "../kernels/philox.h"
#include "../kernels/subspace_dae.h"
#include "../kernels/train_step.h"
#include "launchers.h"
#include "warp.cuh"

namespace molrg::cuda {
namespace {

using namespace molrg::kernels;

constexpr int kWarp = 32;
constexpr int kMaxWarps = 8;
constexpr int64_t kSmemBudget = 48 * 1024;

// Shared-memory elements per warp: x_t and g [n], proj and dP [K dm], w and <r_k, P_k> [K]
// (int64: the binding compares it with the device limit before anything is launched).
__host__ __device__ constexpr int64_t train_step_smem_elems(int n, int K, int dm) {
  return 2 * (int64_t)n + 2 * (int64_t)K * dm + 2 * (int64_t)K;
}

// P_k = U_k^T v for every k into proj (padded entries zero); sq[k] = ||P_k||^2 (lane 0 writes).
template <typename T>
__device__ void warp_project(const T* __restrict__ Ui, const T* v, const int32_t* __restrict__ dims,
                             int K, int n, int dm, int lane, T* proj, T* sq) {
  for (int k = 0; k < K; ++k) {
    const int dk = dims[k];
    const T* Uk = Ui + (int64_t)k * n * dm;
    T s = T(0);
    for (int j = 0; j < dk; ++j) {
      T acc = T(0);
      for (int i = lane; i < n; i += kWarp) acc += Uk[(int64_t)i * dm + j] * v[i];
      acc = warp_sum(acc);
      s += acc * acc;
      if (lane == 0) proj[k * dm + j] = acc;
    }
    for (int j = dk + lane; j < dm; j += kWarp) proj[k * dm + j] = T(0);
    if (lane == 0) sq[k] = s;
  }
  __syncwarp();
}

template <typename T>
__global__ void __launch_bounds__(kMaxWarps * kWarp, 2)
train_step_kernel(const T* __restrict__ X, int64_t N, const T* __restrict__ U,
                  const T* __restrict__ levels, const T* __restrict__ level_bias, int64_t L,
                  const int32_t* __restrict__ dims, int64_t P, int64_t M, int n, int K, int dm,
                  int mode, uint64_t seed, uint32_t step, T* __restrict__ slot_loss,
                  T* __restrict__ dU) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x & (kWarp - 1);
  const int wib = threadIdx.x / kWarp;
  const int64_t per_warp = train_step_smem_elems(n, K, dm);
  T* base = reinterpret_cast<T*>(smem_raw) + (int64_t)wib * per_warp;
  T* xt = base;
  T* g = xt + n;
  T* proj = g + n;
  T* dP = proj + K * dm;
  T* w = dP + K * dm;
  T* rps = w + K;  // <r_k, P_k>: every dlogit_k reads all of them (kernels::dae_dlogit)
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) / kWarp;
  const T inv_M = T(1) / T(M);
  for (int64_t slot_id = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp;
       slot_id < P * M; slot_id += nwarps) {
    const uint32_t p = (uint32_t)(slot_id / M), m = (uint32_t)(slot_id % M);
    const PhiloxSlot slot = philox_slot(seed, step, p, m);
    uint32_t i, l;
    philox_index_level(slot, (uint32_t)N, (uint32_t)L, &i, &l);
    const T* x0 = X + ((int64_t)p * N + i) * n;
    const T* Ui = U + (int64_t)p * K * n * dm;
    const T* lv = levels + (int64_t)l * kLvCols;
    const T sc = lv[kLvS], gm = lv[kLvGamma], lam = lv[kLvLambda], c = lv[kLvC],
            phi = lv[kLvPhi];
    // eps: block 1 + q holds eps[4q .. 4q+3] (philox_normals' layout), one block per lane.
    for (int q = lane; 4 * q < n; q += kWarp) {
      const Philox4 b = philox_block(slot, 1u + (uint32_t)q);
      T z[4];
      box_muller<T>(b.v[0], b.v[1], &z[0], &z[1]);
      box_muller<T>(b.v[2], b.v[3], &z[2], &z[3]);
#pragma unroll
      for (int j = 0; j < 4; ++j)  // unrolled: z stays in registers
        if (4 * q + j < n) xt[4 * q + j] = sc * x0[4 * q + j] + gm * z[j];
    }
    __syncwarp();
    int k0 = -1;
    if (mode == kHard) {  // component of the CLEAN sample, eq. (17); w is scratch for sq here
      warp_project(Ui, x0, dims, K, n, dm, lane, proj, w);
      k0 = dae_argmax<T>(w, K);
      __syncwarp();
    }
    warp_project(Ui, xt, dims, K, n, dm, lane, proj, w);
    if (lane == 0)  // in place: w[k] only reads sq[k] = w[k]
      dae_weights<T>(w, level_bias ? level_bias + (int64_t)l * K : nullptr, phi, K, mode, k0, w);
    __syncwarp();
    // y = c sum_k w_k U_k P_k, err = ||y - x0||^2, g = 2 lam / M (y - x0)
    T err = T(0);
    const T gscale = T(2) * lam * inv_M;
    for (int e = lane; e < n; e += kWarp) {
      T acc = T(0);
      for (int k = 0; k < K; ++k) {
        if (w[k] == T(0)) continue;
        const T* row = Ui + ((int64_t)k * n + e) * dm;
        T dot = T(0);
        for (int j = 0; j < dims[k]; ++j) dot += row[j] * proj[k * dm + j];
        acc += (c * w[k]) * dot;
      }
      const T d = acc - x0[e];
      err += d * d;
      g[e] = gscale * d;
    }
    err = warp_sum(err);
    if (lane == 0) slot_loss[slot_id] = lam * err;
    __syncwarp();
    // r_k = U_k^T g into dP, then dP_k = c w_k r_k + 2 phi dlogit_k P_k (lane 0, K*dm values)
    for (int k = 0; k < K; ++k) {
      const int dk = w[k] == T(0) ? 0 : dims[k];
      const T* Uk = Ui + (int64_t)k * n * dm;
      for (int j = 0; j < dk; ++j) {
        T acc = T(0);
        for (int e = lane; e < n; e += kWarp) acc += Uk[(int64_t)e * dm + j] * g[e];
        acc = warp_sum(acc);
        if (lane == 0) dP[k * dm + j] = acc;
      }
      for (int j = dk + lane; j < dm; j += kWarp) dP[k * dm + j] = T(0);
    }
    __syncwarp();
    if (lane == 0) {  // the denoiser backward's per-sample formulas (kernels/subspace_dae.h)
      dae_r_dot_proj<T>(dP, proj, w, K, dm, dims, rps);
      dae_dP_from_rp<T>(dP, proj, w, rps, c, phi, K, dm, dims, mode, dP, nullptr, nullptr);
    }
    __syncwarp();
    // dU_k += x_t dP_k^T + g (c w_k P_k)^T
    T* dUi = dU + (int64_t)p * K * n * dm;
    for (int k = 0; k < K; ++k) {
      const T wk = w[k];
      if (wk == T(0)) continue;
      const int dk = dims[k];
      const T a = c * wk;
      for (int e = lane; e < n * dk; e += kWarp) {
        const int r = e / dk, j = e - r * dk;
        atomicAdd(dUi + ((int64_t)k * n + r) * dm + j,
                  xt[r] * dP[k * dm + j] + (a * g[r]) * proj[k * dm + j]);
      }
    }
    __syncwarp();
  }
}

}  // namespace

template <typename T>
int64_t train_step_smem_bytes(int n, int K, int dm) {
  return (int64_t)train_step_smem_elems(n, K, dm) * (int64_t)sizeof(T);
}

template <typename T>
cudaError_t launch_train_step(const T* X, int64_t N, const T* U, const T* levels,
                              const T* level_bias, int64_t L, const int32_t* dims, int64_t P,
                              int64_t M, int n, int K, int dm, int mode, uint64_t seed,
                              uint32_t step, T* slot_loss, T* dU, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(dU, 0, (size_t)P * K * n * dm * sizeof(T), stream);
  if (err != cudaSuccess || P * M == 0) return err;
  const int64_t per_warp = train_step_smem_bytes<T>(n, K, dm);
  // Up to kSmemBudget (48 KiB, no opt-in needed) per block as before; a warp that needs more gets
  // the device's opt-in limit (about 227 KiB on sm_90), one or more warps per block.
  const int64_t budget = per_warp <= kSmemBudget ? kSmemBudget : train_step_max_smem_bytes();
  const int64_t warps = std::min<int64_t>(kMaxWarps, budget / per_warp);
  if (warps < 1) return cudaErrorInvalidValue;  // the binding checks this first
  const int64_t smem = warps * per_warp;
  if (smem > kSmemBudget) {
    err = cudaFuncSetAttribute(train_step_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               (int)smem);
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = std::min<int64_t>((P * M + warps - 1) / warps, 65535LL * 32);
  train_step_kernel<T><<<(unsigned)blocks, (unsigned)(warps * kWarp), smem, stream>>>(
      X, N, U, levels, level_bias, L, dims, P, M, n, K, dm, mode, seed, step, slot_loss, dU);
  return cudaGetLastError();
}

int64_t train_step_max_smem_bytes() {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return kSmemBudget;
  return std::max<int64_t>(kSmemBudget, optin);
}

#define MOLRG_INSTANTIATE(T)                                                                  \
  template int64_t train_step_smem_bytes<T>(int, int, int);                                   \
  template cudaError_t launch_train_step<T>(const T*, int64_t, const T*, const T*, const T*, \
                                            int64_t, const int32_t*, int64_t, int64_t, int,   \
                                            int, int, int, uint64_t, uint32_t, T*, T*,        \
                                            cudaStream_t);
MOLRG_INSTANTIATE(float)
MOLRG_INSTANTIATE(double)
#undef MOLRG_INSTANTIATE

}  // namespace molrg::cuda
