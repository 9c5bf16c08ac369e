// Counter-based random numbers for the fused training step (SPEC section 3): Philox4x32-10
// (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) with Box-Muller normals.
//
// Every number is a pure function of (seed, step, p, m, block), so the CPU and CUDA kernels draw
// the same integers whatever their thread layout, and nothing has to be stored in between.
//
// Stream layout of one batch slot (instance p, slot m) of training step `step`:
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (block, m, p, step)          (all 32-bit)
//   block 0:      u0 -> sample index  i = floor(u0 * N / 2^32)
//                 u1 -> noise level   l = floor(u1 * L / 2^32)
//   block 1 + q:  four normals eps[4q .. 4q+3] by Box-Muller on (u0, u1) and (u2, u3)
// The multiply-shift maps to [0, N) with a bias below N / 2^32 per value (no rejection, so the
// stream layout stays fixed).
#pragma once

#include "common.h"
#include "series_math.h"

namespace molrg::kernels {

struct Philox4 {
  uint32_t v[4];
};

MOLRG_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t prod = (uint64_t)a * (uint64_t)b;
  hi = (uint32_t)(prod >> 32);
  lo = (uint32_t)prod;
}

// Philox4x32 with 10 rounds.
MOLRG_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  MOLRG_UNROLL
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(M0, c0, hi0, lo0);
    philox_mulhilo(M1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += W0;
    k1 += W1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

struct PhiloxSlot {
  uint32_t k0, k1, m, p, step;
};

MOLRG_HD PhiloxSlot philox_slot(uint64_t seed, uint32_t step, uint32_t p, uint32_t m) {
  return PhiloxSlot{(uint32_t)seed, (uint32_t)(seed >> 32), m, p, step};
}

MOLRG_HD Philox4 philox_block(const PhiloxSlot& s, uint32_t block) {
  return philox4x32_10(block, s.m, s.p, s.step, s.k0, s.k1);
}

// Uniform integer in [0, range) from one 32-bit draw (multiply-shift).
MOLRG_HD uint32_t philox_below(uint32_t u, uint32_t range) {
  return (uint32_t)(((uint64_t)u * (uint64_t)range) >> 32);
}

// Sample index in [0, N) and level in [0, L) of one slot (block 0).
MOLRG_HD void philox_index_level(const PhiloxSlot& s, uint32_t N, uint32_t L, uint32_t* idx,
                                 uint32_t* level) {
  const Philox4 b = philox_block(s, 0);
  *idx = philox_below(b.v[0], N);
  *level = philox_below(b.v[1], L);
}

// Uniform in (0, 1]: (u + 1/2) / 2^32 never reaches 0, so log() below stays finite.
template <typename T>
MOLRG_HD T philox_open01(uint32_t u) {
  return (T)u * T(2.3283064365386963e-10) + T(1.1641532182693481e-10);
}

// Two standard normals from two 32-bit draws (Box-Muller; log and sin/cos from series_math.h).
template <typename T>
MOLRG_HD void box_muller(uint32_t a, uint32_t b, T* z0, T* z1) {
  const T u1 = philox_open01<T>(a);
  const T u2 = philox_open01<T>(b);
  const T r = m_sqrt<T>(T(-2) * bm_log<T>(u1 < T(1) ? u1 : T(1)));
  T sn, cs;
  bm_sincos_2pi<T>(u2, &sn, &cs);
  *z0 = r * cs;
  *z1 = r * sn;
}

// Normals eps[0 .. n) of one slot (blocks 1 .. ceil(n/4)).
template <typename T>
MOLRG_HD void philox_normals(const PhiloxSlot& s, int n, T* eps) {
  for (int q = 0; 4 * q < n; ++q) {
    const Philox4 b = philox_block(s, 1u + (uint32_t)q);
    T z[4];
    box_muller<T>(b.v[0], b.v[1], &z[0], &z[1]);
    box_muller<T>(b.v[2], b.v[3], &z[2], &z[3]);
    const int e0 = 4 * q;
    for (int j = 0; j < 4 && e0 + j < n; ++j) eps[e0 + j] = z[j];
  }
}

}  // namespace molrg::kernels
