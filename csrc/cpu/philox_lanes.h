// The training step's Philox draws (kernels/philox.h) for a run of consecutive batch slots,
// computed in SIMD lanes across slots (host only, torch-free). The values are those of
// kernels::philox_index_level / philox_normals slot by slot (same formulas, same counters);
// only the evaluation order differs, so that the ten Philox rounds, the log and the sin/cos of
// eight slots run in one set of vector instructions.
#pragma once

#include <algorithm>

#include "../kernels/philox.h"

namespace molrg::cpu {

using kernels::Philox4;
using kernels::philox4x32_10;

constexpr int kPhiloxLanes = 8;

#if defined(_OPENMP)
#define MOLRG_LANES _Pragma("omp simd")
#else
#define MOLRG_LANES
#endif

// Sample index and level of slots m0 .. m0 + count - 1 of instance p.
inline void philox_index_level_slots(uint64_t seed, uint32_t step, uint32_t p, uint32_t m0,
                                     int count, uint32_t N, uint32_t L, uint32_t* idx,
                                     uint32_t* level) {
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  MOLRG_LANES
  for (int t = 0; t < count; ++t) {
    const Philox4 b = philox4x32_10(0u, m0 + (uint32_t)t, p, step, k0, k1);
    idx[t] = kernels::philox_below(b.v[0], N);
    level[t] = kernels::philox_below(b.v[1], L);
  }
}

// Normals of Philox block 1 + q for Ln consecutive slots: z[j][l] is normal 4q + j of slot m0 + l.
template <typename T>
inline void philox_normals_block(uint32_t k0, uint32_t k1, uint32_t step, uint32_t p, uint32_t m0,
                                 uint32_t q, T (*z)[kPhiloxLanes]) {
  constexpr int Ln = kPhiloxLanes;
  uint32_t v[4][Ln];
  MOLRG_LANES
  for (int l = 0; l < Ln; ++l) {
    const Philox4 b = philox4x32_10(1u + q, m0 + (uint32_t)l, p, step, k0, k1);
    v[0][l] = b.v[0];
    v[1][l] = b.v[1];
    v[2][l] = b.v[2];
    v[3][l] = b.v[3];
  }
  MOLRG_LANES
  for (int l = 0; l < Ln; ++l) {
    kernels::box_muller<T>(v[0][l], v[1][l], &z[0][l], &z[1][l]);
    kernels::box_muller<T>(v[2][l], v[3][l], &z[2][l], &z[3][l]);
  }
}

// eps [count, n]: the normals of slots m0 .. m0 + count - 1 of instance p.
template <typename T>
inline void philox_normals_slots(uint64_t seed, uint32_t step, uint32_t p, uint32_t m0,
                                 int count, int n, T* eps) {
  constexpr int Ln = kPhiloxLanes;
  const uint32_t k0 = (uint32_t)seed, k1 = (uint32_t)(seed >> 32);
  for (int t0 = 0; t0 < count; t0 += Ln) {
    const int lanes = std::min(Ln, count - t0);
    for (int q = 0; 4 * q < n; ++q) {
      T z[4][Ln];
      philox_normals_block<T>(k0, k1, step, p, m0 + (uint32_t)t0, (uint32_t)q, z);
      const int e0 = 4 * q, ne = std::min(4, n - e0);
      for (int l = 0; l < lanes; ++l) {
        T* out = eps + (int64_t)(t0 + l) * n + e0;
        for (int j = 0; j < ne; ++j) out[j] = z[j][l];
      }
    }
  }
}

}  // namespace molrg::cpu
