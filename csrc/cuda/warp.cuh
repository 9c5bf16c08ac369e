// Warp-wide reductions shared by the CUDA kernels (device only, torch-free): every lane of the
// full warp gets the result.
#pragma once

#include <cuda_runtime.h>

namespace molrg::cuda {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

}  // namespace molrg::cuda
