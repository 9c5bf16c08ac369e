// Torch-free CUDA launchers of the molrg kernels. Raw device pointers, sizes and a stream; no
// allocation, no synchronisation. Each returns the cudaError_t of its launches (cudaSuccess or the
// launch error), so the torch bindings can turn it into a Python exception.
//
// Layouts (SPEC section 3, same as the CPU kernels): x, y, g [P,B,n]; U, dU [P,K,n,dm];
// c, phi [P,B]; bias [P,B,K] or null; assign [P,B] int64 or null; proj [P,B,K,dm]; w [P,B,K];
// dims [K] int32 in device memory. mode 0 = soft, 1 = hard.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace molrg::cuda {

// Forward: y, proj (padded columns zero) and w for every sample.
template <typename T>
cudaError_t launch_subspace_dae_forward(const T* x, const T* U, const T* c, const T* phi,
                                        const T* bias, const int64_t* assign,
                                        const int32_t* dims, int64_t P, int64_t B, int n, int K,
                                        int dm, int mode, T* y, T* proj, T* w,
                                        cudaStream_t stream);

// Number of T elements of workspace the backward needs (dP and the K sums <r_k, P_k> per sample,
// plus the partial sums of the dU reduction over the batch).
int64_t subspace_dae_backward_workspace(int64_t P, int64_t B, int n, int K, int dm, bool need_dU);

// Backward: dx (may be null), dU (may be null), dc, dphi, dbias. workspace holds
// subspace_dae_backward_workspace(...) elements. dU is fully written (no need to zero it); the
// reduction over the batch is deterministic (fixed-order partial sums, no atomics).
template <typename T>
cudaError_t launch_subspace_dae_backward(const T* g, const T* x, const T* U, const T* c,
                                         const T* phi, const T* proj, const T* w,
                                         const int32_t* dims, int64_t P, int64_t B, int n, int K,
                                         int dm, int mode, T* dx, T* dU, T* dc, T* dphi,
                                         T* dbias, T* workspace, cudaStream_t stream);

// argmax_k ||U_k^T x|| per sample (ties to the lowest k) into out [P,B] int64.
template <typename T>
cudaError_t launch_hard_assign(const T* x, const T* U, const int32_t* dims, int64_t P, int64_t B,
                               int n, int K, int dm, int64_t* out, cudaStream_t stream);

// Fused training step (csrc/cuda/train_step.cu): X [P,N,n]; U [P,K,n,dm]; levels [L,5] =
// (s, gamma, lambda, c, phi); level_bias [L,K] or null. Writes slot_loss [P,M] (lambda ||y - x0||^2
// per slot) and dU [P,K,n,dm] (gradient of the mean slot loss; zeroed here). Draws from the
// Philox stream of kernels/philox.h, the same numbers as the CPU op for the same seed and step.
template <typename T>
cudaError_t launch_train_step(const T* X, int64_t N, const T* U, const T* levels,
                              const T* level_bias, int64_t L, const int32_t* dims, int64_t P,
                              int64_t M, int n, int K, int dm, int mode, uint64_t seed,
                              uint32_t step, T* slot_loss, T* dU, cudaStream_t stream);

// Shared memory one warp of the train_step kernel needs, and the most a block may use (the
// current device's opt-in limit, at least 48 KiB).
template <typename T>
int64_t train_step_smem_bytes(int n, int K, int dm);
int64_t train_step_max_smem_bytes();

// Jacobian spectrum (csrc/cuda/jacobian.cu), one thread per sample / matrix. The workspace holds
// jacobian_workers(total) slices: work of jacobian_work_per(K, dm, r, vectors) (that is
// dae_jacobian_work of kernels/jacobian.h) or sym_eig_work_per(m, vectors) elements, and order
// of r (m) int32 each.
// *failed (device int, zeroed by the caller) becomes 1 if some eigensolve did not converge.
// The number of workers (and slices) is capped at kJacobianMaxWorkers and so that the slices take
// at most kJacobianWorkBytes: at r = 400 a float64 slice is 1.4 MB (2.6 MB with vectors), and
// 65536 of them would not fit in a GPU. The kernels loop over the samples with a stride.
constexpr int64_t kJacobianMaxWorkers = 65536;
constexpr int64_t kJacobianWorkBytes = int64_t(1) << 30;
// work_per: elements of elem_bytes per slice; order_len: its int32 entries.
int64_t jacobian_workers(int64_t total, int64_t work_per, int64_t elem_bytes, int64_t order_len);
int64_t jacobian_work_per(int K, int dm, int r, bool vectors);  // = dae_jacobian_work
int64_t sym_eig_work_per(int m, bool vectors);

template <typename T>
cudaError_t launch_dae_jacobian_spectrum(const T* x, const T* U, const T* R, const T* S,
                                         const T* c, const T* phi, const T* bias,
                                         const int64_t* assign, const int32_t* dims,
                                         const int32_t* offs, int64_t P, int64_t B, int n, int K,
                                         int dm, int r, int D, int mode, T* svals, T* vecs,
                                         T* work, int32_t* order, int* failed,
                                         cudaStream_t stream);

// A [total, m, m] symmetric (overwritten) -> evals [total, m] ascending, evecs [total, m, m]
// (columns; may be null).
template <typename T>
cudaError_t launch_sym_eig(T* A, int64_t total, int m, T* evals, T* evecs, T* work,
                           int32_t* order, int* failed, cudaStream_t stream);

// Empirical optimal denoiser (csrc/cuda/optimal_denoiser.cu): x [B, n], X [N, n], s, gamma [B].
// The training set is cut into optimal_denoiser_splits(B, N) ranges; with more than one, the
// partial states need a workspace part of splits * B * n T elements (with one it may be null) and
// always stats of 2 * splits * B doubles. The forward writes y [B, n] and lse [B] (double for
// both input types); the backward
// dx [B, n] and sets *failed (device int, zeroed by the caller) to 1 when lse is inconsistent
// with the inputs (a logit above lse, or every weight exp(l_j - lse) underflowing).
constexpr int64_t kOdMaxSplits = 65535;  // grid.y limit
int64_t optimal_denoiser_splits(int64_t B, int64_t N);
// Largest B the grid can cover (grid.x = ceil(B / 16) < 2^31).
int64_t optimal_denoiser_max_batch();

template <typename T>
cudaError_t launch_optimal_denoiser(const T* x, const T* X, const T* s, const T* gamma,
                                    int64_t B, int64_t N, int64_t n, int64_t splits, T* part,
                                    double* stats, T* y, double* lse, cudaStream_t stream);

template <typename T>
cudaError_t launch_optimal_denoiser_backward(const T* grad_y, const T* x, const T* X,
                                             const T* s, const T* gamma, const T* y,
                                             const double* lse, int64_t B, int64_t N, int64_t n,
                                             int64_t splits, T* part, double* stats, T* dx,
                                             int* failed, cudaStream_t stream);

}  // namespace molrg::cuda
