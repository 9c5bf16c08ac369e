// CUDA kernels of the Jacobian-spectrum ops (SPEC section 4; CPU: csrc/cpu/jacobian_cpu.cpp):
// one thread per sample (per matrix) running the shared MOLRG_HD math of kernels/jacobian.h and
// kernels/sym_eig.h on a per-thread slice of a global workspace. The matrices are small
// (r = min(n, sum d_k), e.g. 12): per-thread serial Householder + QR is the simple, exact port of
// the CPU code; a thread that fails to converge sets *failed.
#include <cuda_runtime.h>

#include <algorithm>

#include "../kernels/jacobian.h"
#include "launchers.h"

namespace molrg::cuda {
namespace {

using namespace molrg::kernels;

constexpr int kThreads = 128;
// 2 resident blocks of 128 threads per SM allow 255 registers per thread: the serial fp64
// eigensolver spills under the default heuristic (64) and still at 168.
constexpr int kMinBlocks = 2;

int64_t workers_for(int64_t total, int64_t work_per, int64_t elem_bytes, int64_t order_len) {
  const int64_t slice = std::max<int64_t>(1, work_per * elem_bytes + order_len * 4);
  const int64_t by_bytes = std::max<int64_t>(1, kJacobianWorkBytes / slice);
  return std::min<int64_t>({total, kJacobianMaxWorkers, by_bytes});
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
jacobian_kernel(const T* __restrict__ x, const T* __restrict__ U, const T* __restrict__ R,
                const T* __restrict__ S, const T* __restrict__ c, const T* __restrict__ phi,
                const T* __restrict__ bias, const int64_t* __restrict__ assign,
                const int32_t* __restrict__ dims, const int32_t* __restrict__ offs, int64_t P,
                int64_t B, int n, int K, int dm, int r, int D, int mode, T* __restrict__ svals,
                T* __restrict__ vecs, T* __restrict__ work, int64_t work_per,
                int32_t* __restrict__ order, int* __restrict__ failed, int64_t workers) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= workers) return;  // the last block may be partial: no scratch slice past `workers`
  T* my_work = work + t * work_per;
  int32_t* my_order = order + t * r;
  for (int64_t idx = t; idx < P * B; idx += workers) {
    const int64_t p = idx / B;
    const int k0 = assign ? (int)assign[idx] : -1;
    const bool ok = dae_jacobian_sample<T>(
        x + idx * n, U + p * K * (int64_t)n * dm, R + p * (int64_t)r * D,
        S + p * (int64_t)K * r * r, K, n, dm, r, D, dims, offs, c[idx], phi[idx],
        bias ? bias + idx * K : nullptr, mode, k0, svals + idx * r,
        vecs ? vecs + idx * (int64_t)r * r : nullptr, my_work, my_order);
    if (!ok) atomicExch(failed, 1);
  }
}

// A [total, m, m] (symmetric, destroyed) -> ascending eigenvalues [total, m], vectors as columns.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
sym_eig_kernel(T* __restrict__ A, int64_t total, int m, T* __restrict__ evals,
               T* __restrict__ evecs, T* __restrict__ work, int64_t work_per,
               int32_t* __restrict__ order, int* __restrict__ failed, int64_t workers) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= workers) return;  // the last block may be partial: no scratch slice past `workers`
  const int64_t mm = (int64_t)m * m;
  T* lam = work + t * work_per;
  T* e = lam + m;
  T* tmp = e + m;
  T* neg = tmp + m;
  T* Vt = evecs ? neg + m : nullptr;
  int32_t* ord = order + t * m;
  for (int64_t idx = t; idx < total; idx += workers) {
    const bool ok = sym_eig_unsorted<T>(A + idx * mm, m, lam, Vt, e, tmp);
    if (!ok) atomicExch(failed, 1);
    for (int i = 0; i < m; ++i) neg[i] = -lam[i];
    argsort_desc<T>(neg, m, ord);  // ascending eigenvalues
    for (int i = 0; i < m; ++i) evals[idx * m + i] = lam[ord[i]];
    if (evecs) {
      for (int i = 0; i < m; ++i) {
        const T* v = Vt + (int64_t)ord[i] * m;
        for (int j = 0; j < m; ++j) evecs[idx * mm + (int64_t)j * m + i] = v[j];
      }
    }
  }
}

unsigned blocks_for(int64_t workers) { return (unsigned)((workers + kThreads - 1) / kThreads); }

}  // namespace

int64_t jacobian_workers(int64_t total, int64_t work_per, int64_t elem_bytes, int64_t order_len) {
  return workers_for(total, work_per, elem_bytes, order_len);
}

int64_t jacobian_work_per(int K, int dm, int r, bool vectors) {
  return dae_jacobian_work(K, dm, r, vectors);
}

int64_t sym_eig_work_per(int m, bool vectors) {
  return 4 * (int64_t)m + (vectors ? (int64_t)m * m : 0);
}

template <typename T>
cudaError_t launch_dae_jacobian_spectrum(const T* x, const T* U, const T* R, const T* S,
                                         const T* c, const T* phi, const T* bias,
                                         const int64_t* assign, const int32_t* dims,
                                         const int32_t* offs, int64_t P, int64_t B, int n, int K,
                                         int dm, int r, int D, int mode, T* svals, T* vecs,
                                         T* work, int32_t* order, int* failed,
                                         cudaStream_t stream) {
  const int64_t total = P * B;
  if (total == 0) return cudaSuccess;
  const int64_t work_per = dae_jacobian_work(K, dm, r, vecs != nullptr);
  const int64_t workers = workers_for(total, work_per, sizeof(T), r);
  jacobian_kernel<T><<<blocks_for(workers), kThreads, 0, stream>>>(
      x, U, R, S, c, phi, bias, assign, dims, offs, P, B, n, K, dm, r, D, mode, svals, vecs,
      work, work_per, order, failed, workers);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sym_eig(T* A, int64_t total, int m, T* evals, T* evecs, T* work,
                           int32_t* order, int* failed, cudaStream_t stream) {
  if (total == 0 || m == 0) return cudaSuccess;
  const int64_t work_per = sym_eig_work_per(m, evecs != nullptr);
  const int64_t workers = workers_for(total, work_per, sizeof(T), m);
  sym_eig_kernel<T><<<blocks_for(workers), kThreads, 0, stream>>>(
      A, total, m, evals, evecs, work, work_per, order, failed, workers);
  return cudaGetLastError();
}

#define MOLRG_INSTANTIATE(T)                                                                   \
  template cudaError_t launch_dae_jacobian_spectrum<T>(                                        \
      const T*, const T*, const T*, const T*, const T*, const T*, const T*, const int64_t*,   \
      const int32_t*, const int32_t*, int64_t, int64_t, int, int, int, int, int, int, T*, T*, \
      T*, int32_t*, int*, cudaStream_t);                                                       \
  template cudaError_t launch_sym_eig<T>(T*, int64_t, int, T*, T*, T*, int32_t*, int*,         \
                                         cudaStream_t);
MOLRG_INSTANTIATE(float)
MOLRG_INSTANTIATE(double)
#undef MOLRG_INSTANTIATE

}  // namespace molrg::cuda
