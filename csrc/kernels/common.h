// Torch-free helpers shared by the CPU (.cpp) and CUDA (.cu) kernels.
// Everything here takes raw pointers and sizes so that the same math runs on both devices.
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define MOLRG_HD __host__ __device__ __forceinline__
#else
#define MOLRG_HD inline
#endif

// Full unrolling of short constant-trip loops (lets the host compiler vectorise loops that call
// them lane by lane).
#if defined(__CUDACC__)
#define MOLRG_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define MOLRG_UNROLL _Pragma("GCC unroll 16")
#else
#define MOLRG_UNROLL
#endif

namespace molrg::kernels {

template <typename T> MOLRG_HD T m_exp(T v);
template <> MOLRG_HD float m_exp<float>(float v) { return expf(v); }
template <> MOLRG_HD double m_exp<double>(double v) { return exp(v); }

template <typename T> MOLRG_HD T m_sqrt(T v);
template <> MOLRG_HD float m_sqrt<float>(float v) { return sqrtf(v); }
template <> MOLRG_HD double m_sqrt<double>(double v) { return sqrt(v); }

template <typename T> MOLRG_HD T m_max(T a, T b) { return a > b ? a : b; }

}  // namespace molrg::kernels
