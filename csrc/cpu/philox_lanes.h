// The training step's Philox draws (kernels/philox.h) for a run of consecutive batch slots,
// computed in SIMD lanes across slots (host only, torch-free). The values are those of
// kernels::philox_index_level / philox_normals slot by slot (same formulas, same counters);
// only the evaluation order differs, so that the ten Philox rounds, the log and the sin/cos of
// kPhiloxLanes slots (16 with AVX-512, 8 otherwise) run in one set of vector instructions.
#pragma once

#include <algorithm>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../kernels/philox.h"
#include "prefetch.h"
#include "vec_width.h"

namespace molrg::cpu {

using kernels::Philox4;
using kernels::philox4x32_10;

#if defined(_OPENMP)
#define MOLRG_LANES _Pragma("omp simd")
#else
#define MOLRG_LANES
#endif

// The lane type and the one step that differs between instruction sets: the 32 x 32 -> 64-bit
// products of a round, split into high and low halves (x times the constant m, lane by lane).
#if defined(__AVX512F__) && !defined(MOLRG_VEC256)
constexpr int kPhiloxLanes = 16;
using LaneVec = __m512i;
inline LaneVec lane_set1(uint32_t a) { return _mm512_set1_epi32((int)a); }
inline LaneVec lane_slots(uint32_t m0) {  // m0, m0 + 1, ..., m0 + 15
  return _mm512_add_epi32(lane_set1(m0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                           11, 12, 13, 14, 15));
}
inline LaneVec lane_xor3(LaneVec a, LaneVec b, LaneVec c) {
  return _mm512_ternarylogic_epi32(a, b, c, 0x96);  // one vpternlogd
}
inline void lane_store(uint32_t* p, LaneVec a) { _mm512_storeu_si512((void*)p, a); }
// AVX-512: the products of the even and odd lanes by two vpmuludq; each half is then one in-lane
// word swap (vpshufd) of one product merged under a mask into the other (no vpmulld: two uops and
// ten cycles on Intel cores).
inline void lane_mulhilo(LaneVec x, LaneVec m, LaneVec& hi, LaneVec& lo) {
  // 64-bit lanes: pe = x_even * m (words lo, hi), po = x_odd * m
  const LaneVec pe = _mm512_mul_epu32(x, m);
  const LaneVec po = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  // hi: odd words from po (in place), even words = pe's high words swapped down
  hi = _mm512_mask_shuffle_epi32(po, (__mmask16)0x5555, pe, _MM_PERM_CDAB);
  // lo: even words from pe (in place), odd words = po's low words swapped up
  lo = _mm512_mask_shuffle_epi32(pe, (__mmask16)0xAAAA, po, _MM_PERM_CDAB);
}
#elif defined(__AVX2__)
constexpr int kPhiloxLanes = 8;
using LaneVec = __m256i;
inline LaneVec lane_set1(uint32_t a) { return _mm256_set1_epi32((int)a); }
inline LaneVec lane_slots(uint32_t m0) {  // m0, m0 + 1, ..., m0 + 7
  return _mm256_add_epi32(lane_set1(m0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline LaneVec lane_xor3(LaneVec a, LaneVec b, LaneVec c) {
  return _mm256_xor_si256(_mm256_xor_si256(a, b), c);
}
inline void lane_store(uint32_t* p, LaneVec a) { _mm256_storeu_si256((__m256i*)p, a); }
// AVX2: the products of the even and odd lanes by two vpmuludq, the high halves re-interleaved
// with a blend; the low halves by vpmulld.
inline void lane_mulhilo(LaneVec x, LaneVec m, LaneVec& hi, LaneVec& lo) {
  const LaneVec pe = _mm256_mul_epu32(x, m);
  const LaneVec po = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  lo = _mm256_mullo_epi32(x, m);
}
#endif

// Philox4x32-10 of counters (c0 + b, m0 + l, p, step), b < NB blocks, l < kPhiloxLanes, into
// v[b][0..3][l]. The round keys depend only on the seed: PhiloxLaneKeys holds them (broadcast once
// per run of slots). One block is a chain of ten dependent rounds (multiply, shift, blend, xor);
// the rounds of NB blocks (2 or 4) run interleaved, which gives the core independent work (two
// blocks: 48 -> 41 ns alone on an AVX2 VM). Lanes: 16 with AVX-512, 8 with AVX2, 8 scalar ones
// otherwise.
#if defined(__AVX2__)
struct PhiloxLaneKeys {
  LaneVec k0[10], k1[10];
  PhiloxLaneKeys(uint32_t a, uint32_t b) {
    for (int r = 0; r < 10; ++r, a += 0x9E3779B9u, b += 0xBB67AE85u) {
      k0[r] = lane_set1(a);
      k1[r] = lane_set1(b);
    }
  }
};

template <int NB>
inline void philox_lanes(const PhiloxLaneKeys& key, uint32_t c0, uint32_t m0, uint32_t p,
                         uint32_t step, uint32_t (*v)[4][kPhiloxLanes]) {
  const LaneVec M0 = lane_set1(0xD2511F53u), M1 = lane_set1(0xCD9E8D57u);
  const LaneVec slots = lane_slots(m0);
  LaneVec x0[NB], x1[NB], x2[NB], x3[NB];
  for (int b = 0; b < NB; ++b) {
    x0[b] = lane_set1(c0 + (uint32_t)b);
    x1[b] = slots;
    x2[b] = lane_set1(p);
    x3[b] = lane_set1(step);
  }
  for (int r = 0; r < 10; ++r)
    for (int b = 0; b < NB; ++b) {
      LaneVec hi0, lo0, hi1, lo1;
      lane_mulhilo(x0[b], M0, hi0, lo0);
      lane_mulhilo(x2[b], M1, hi1, lo1);
      x0[b] = lane_xor3(hi1, x1[b], key.k0[r]);
      x1[b] = lo1;
      x2[b] = lane_xor3(hi0, x3[b], key.k1[r]);
      x3[b] = lo0;
    }
  for (int b = 0; b < NB; ++b) {
    lane_store(v[b][0], x0[b]);
    lane_store(v[b][1], x1[b]);
    lane_store(v[b][2], x2[b]);
    lane_store(v[b][3], x3[b]);
  }
}
#else
constexpr int kPhiloxLanes = 8;

struct PhiloxLaneKeys {
  uint32_t k0, k1;
  PhiloxLaneKeys(uint32_t a, uint32_t b) : k0(a), k1(b) {}
};

template <int NB>
inline void philox_lanes(const PhiloxLaneKeys& key, uint32_t c0, uint32_t m0, uint32_t p,
                         uint32_t step, uint32_t (*v)[4][kPhiloxLanes]) {
  for (int b = 0; b < NB; ++b) {
    MOLRG_LANES
    for (int l = 0; l < kPhiloxLanes; ++l) {
      const Philox4 o = philox4x32_10(c0 + (uint32_t)b, m0 + (uint32_t)l, p, step, key.k0, key.k1);
      v[b][0][l] = o.v[0];
      v[b][1][l] = o.v[1];
      v[b][2][l] = o.v[2];
      v[b][3][l] = o.v[3];
    }
  }
}
#endif

#if defined(__AVX2__)
// out[l * ld + j] = z[j * zs + l] for an 8 x 8 float block (unpack, shuffle, 128-bit permute).
inline bool store_transposed8(const float* z, int zs, float* out, int64_t ld) {
  __m256 r[8], t[8], u[8];
  for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(z + j * zs);
  for (int j = 0; j < 8; j += 2) {
    t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);      // r_j[0] r_j+1[0] r_j[1] r_j+1[1] | [4], [5]
    t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);  // the same for lanes 2, 3 | 6, 7
  }
  for (int h = 0; h < 8; h += 4) {  // h = 0: rows r0..r3, h = 4: rows r4..r7
    u[h] = _mm256_shuffle_ps(t[h], t[h + 2], 0x44);      // lane 0 | lane 4
    u[h + 1] = _mm256_shuffle_ps(t[h], t[h + 2], 0xEE);  // lane 1 | lane 5
    u[h + 2] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0x44);
    u[h + 3] = _mm256_shuffle_ps(t[h + 1], t[h + 3], 0xEE);
  }
  for (int l = 0; l < 4; ++l) {
    _mm256_storeu_ps(out + l * ld, _mm256_permute2f128_ps(u[l], u[l + 4], 0x20));
    _mm256_storeu_ps(out + (l + 4) * ld, _mm256_permute2f128_ps(u[l], u[l + 4], 0x31));
  }
  return true;
}
#else
inline bool store_transposed8(const float*, int, float*, int64_t) { return false; }
#endif

#if defined(__AVX512F__) && !defined(MOLRG_VEC256)
// out[l * ld + j] = z[j * zs + l] for a 16 x 16 float block, in zmm registers: pairs of rows
// interleaved (unpack ps), then pairs of pairs (unpack pd), then 128-bit lanes gathered (two
// rounds of shuffle_f32x4): 64 shuffles, against 96 and twice the loads and stores by 8 x 8.
inline bool store_transposed16(const float* z, int zs, float* out, int64_t ld) {
  __m512 r[16], t[16];
  for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(z + j * zs);
  for (int j = 0; j < 16; j += 2) {
    t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);      // lane L: r_j[4L], r_j+1[4L], [4L+1] ...
    t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);  // lane L: [4L+2], [4L+3] of both
  }
  auto lo = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  auto hi = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  for (int j = 0; j < 16; j += 4) {  // r[j + c], lane L: rows j .. j + 3 of column 4L + c
    r[j] = lo(t[j], t[j + 2]);
    r[j + 1] = hi(t[j], t[j + 2]);
    r[j + 2] = lo(t[j + 1], t[j + 3]);
    r[j + 3] = hi(t[j + 1], t[j + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // column 4L + c: lane L of r[c], r[4 + c], r[8 + c], r[12 + c]
    const __m512 u0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);   // A0 A1 B0 B1
    const __m512 u1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);   // A2 A3 B2 B3
    const __m512 v0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    _mm512_storeu_ps(out + (0 + c) * ld, _mm512_shuffle_f32x4(u0, v0, 0x88));  // A0 B0 C0 D0
    _mm512_storeu_ps(out + (4 + c) * ld, _mm512_shuffle_f32x4(u0, v0, 0xDD));
    _mm512_storeu_ps(out + (8 + c) * ld, _mm512_shuffle_f32x4(u1, v1, 0x88));
    _mm512_storeu_ps(out + (12 + c) * ld, _mm512_shuffle_f32x4(u1, v1, 0xDD));
  }
  return true;
}
#else
inline bool store_transposed16(const float*, int, float*, int64_t) { return false; }
#endif
inline bool store_transposed16(const double*, int, double*, int64_t) { return false; }

// No vector transpose for double: the caller stores element by element.
inline bool store_transposed8(const double*, int, double*, int64_t) { return false; }

// Sample index and level of slots m0 .. m0 + count - 1 of instance p (Philox block 0 of each
// slot), kPhiloxLanes slots per philox_lanes call: the rounds of a slot are a chain of dependent
// multiplies, and slot by slot they cost a few percent of a soft training step.
inline void philox_index_level_slots(uint64_t seed, uint32_t step, uint32_t p, uint32_t m0,
                                     int count, uint32_t N, uint32_t L, uint32_t* idx,
                                     uint32_t* level) {
  const PhiloxLaneKeys key((uint32_t)seed, (uint32_t)(seed >> 32));
  for (int t0 = 0; t0 < count; t0 += kPhiloxLanes) {
    uint32_t v[1][4][kPhiloxLanes];
    philox_lanes<1>(key, 0u, m0 + (uint32_t)t0, p, step, v);
    const int lanes = std::min(kPhiloxLanes, count - t0);
    for (int l = 0; l < lanes; ++l) {
      idx[t0 + l] = kernels::philox_below(v[0][0][l], N);
      level[t0 + l] = kernels::philox_below(v[0][1][l], L);
    }
  }
}

// Normals of Philox blocks 1 + q .. q + NB for Ln consecutive slots: z[j][l] is normal 4q + j of
// slot m0 + l, j < 4 NB.
template <typename T, int NB>
inline void philox_normals_block(const PhiloxLaneKeys& key, uint32_t step, uint32_t p, uint32_t m0,
                                 uint32_t q, T (*z)[kPhiloxLanes]) {
  constexpr int Ln = kPhiloxLanes;
  uint32_t v[NB][4][Ln];
  philox_lanes<NB>(key, 1u + q, m0, p, step, v);
  for (int b = 0; b < NB; ++b) {
    MOLRG_LANES
    for (int l = 0; l < Ln; ++l) {
      kernels::box_muller<T>(v[b][0][l], v[b][1][l], &z[4 * b][l], &z[4 * b + 1][l]);
      kernels::box_muller<T>(v[b][2][l], v[b][3][l], &z[4 * b + 2][l], &z[4 * b + 3][l]);
    }
  }
}

// rows[l * n + j] = z[j][l] for j < ne, l < lanes: by 16 x 16 (AVX-512) or 8 x 8 transposes where
// they apply.
template <typename T>
inline void store_normals(const T (*z)[kPhiloxLanes], int ne, int lanes, T* rows, int n) {
  int j0 = 0;
  if constexpr (kPhiloxLanes == 16)
    if (lanes == kPhiloxLanes)
      for (; j0 + 16 <= ne; j0 += 16)
        if (!store_transposed16(&z[j0][0], kPhiloxLanes, rows + j0, n)) break;
  if (lanes == kPhiloxLanes)
    for (; j0 + 8 <= ne; j0 += 8) {
      bool done = true;
      for (int h = 0; h < kPhiloxLanes && done; h += 8)  // 8 x 8 blocks: 8 normals of 8 slots
        done = store_transposed8(&z[j0][h], kPhiloxLanes, rows + (int64_t)h * n + j0, n);
      if (!done) break;
    }
  for (int l = 0; l < lanes; ++l)
    for (int j = j0; j < ne; ++j) rows[(int64_t)l * n + j] = z[j][l];
}

// Philox blocks per step along a row: 4 (16 normals, two 8 x 8 transposes per 8 slots) measured
// faster than 2 (-12%) and 3 (a partial transpose) and as fast as 6, in a standalone harness of
// the normals (AVX2).
constexpr int kWideBlocks = 4;

// eps [count, n]: the normals of slots m0 .. m0 + count - 1 of instance p. kWideBlocks Philox
// blocks at a time (rounds interleaved) give 4 kWideBlocks normals of kPhiloxLanes slots, stored
// by 8 x 8 transposes into the slots' rows; the rest of a row by two blocks (8 normals) or one.
// If pf is given, pf->next() is called once per step (philox_normal_steps of them): the training
// step prefetches the scattered rows of its next block of samples during this stretch of compute
// without loads from memory (and, in soft mode with AVX-512, during its tiles). Box-Muller's lane
// loops at the full vector width (MOLRG_FULL_WIDTH, vec_width.h); a caller that inlines this gives
// its own width, hence the same attribute on train_block.
template <typename T>
MOLRG_FULL_WIDTH inline void philox_normals_slots(uint64_t seed, uint32_t step, uint32_t p,
                                                  uint32_t m0, int count, int n, T* eps,
                                                  RangePrefetch* pf = nullptr) {
  constexpr int Ln = kPhiloxLanes;
  const PhiloxLaneKeys key((uint32_t)seed, (uint32_t)(seed >> 32));
  for (int t0 = 0; t0 < count; t0 += Ln) {
    const int lanes = std::min(Ln, count - t0);
    T* rows = eps + (int64_t)t0 * n;
    int e0 = 0;
    for (; e0 + 4 * kWideBlocks <= n; e0 += 4 * kWideBlocks) {
      if (pf) pf->next();
      T z[4 * kWideBlocks][Ln];
      philox_normals_block<T, kWideBlocks>(key, step, p, m0 + (uint32_t)t0, (uint32_t)(e0 / 4), z);
      store_normals<T>(z, 4 * kWideBlocks, lanes, rows + e0, n);
    }
    for (; e0 < n; e0 += 8) {
      if (pf) pf->next();
      T z[8][Ln];
      const uint32_t q = (uint32_t)(e0 / 4);
      const int ne = std::min(8, n - e0);
      if (ne > 4) philox_normals_block<T, 2>(key, step, p, m0 + (uint32_t)t0, q, z);
      else philox_normals_block<T, 1>(key, step, p, m0 + (uint32_t)t0, q, z);
      store_normals<T>(z, ne, lanes, rows + e0, n);
    }
  }
}

// The steps of philox_normals_slots (its pf->next() calls) for count slots of n normals: per run
// of kPhiloxLanes slots, the wide ones, then the rest of a row by 8 normals.
inline int philox_normal_steps(int count, int n) {
  const int wide = n / (4 * kWideBlocks), rest = (n % (4 * kWideBlocks) + 7) / 8;
  return (count + kPhiloxLanes - 1) / kPhiloxLanes * (wide + rest);
}

}  // namespace molrg::cpu
