// Register-tiled small matrix products for the CPU denoiser kernels (host only, torch-free).
//
// On a block of S samples the denoiser is three small matrix products against one basis panel
// U [n, w] (w columns, a multiple of the vector width; the panel is a few KiB and stays in L1):
//   project  out[S, w] = A[S, n] @ U[n, w]                    (P = U^T x, r = U^T g)
//   expand   Y[S, n]   = C[S, J] @ UT[J, n]                   (reconstruction, dx)
//   outer    dU^T[J, n] += B^T[J, S] @ A[S, n] + B2^T @ A2   (gradient wrt the basis)
// Each keeps a tile of accumulators in vector registers across the whole inner dimension, so a
// multiply-add costs one FMA and a fraction of a load, instead of the dot-product-per-output form
// (one horizontal reduction per output). Vectors are GCC vector extensions of kVecBytes: 64
// (AVX-512) where -march=native targets it, 32 otherwise (AVX2/FMA, or two SSE halves); float and
// double share the code. The width changes only how many columns one instruction covers: every
// output is the same sum in the same order, so the results do not depend on it. Rows of A, A2
// and Y are pointer arrays, so samples can be gathered (hard mode groups the samples of a block
// by component) without copying them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "prefetch.h"
#include "vec_width.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

// Builds without AVX (MOLRG_NATIVE=OFF) pass these 32-byte vectors in two SSE registers; the
// functions are inline and never cross a library boundary, so the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace molrg::cpu {

// Orders this thread's non-temporal stores (simd::stream) before its later stores: called before
// the data written by them is handed to another thread or back to the caller.
inline void stream_fence() {
#if defined(__AVX2__)
  _mm_sfence();
#endif
}

// Bytes: the vector size, kVecBytes unless a kernel asks for half vectors (project, narrow panels)
template <typename T, int Bytes = kVecBytes>
struct simd {
  typedef T v __attribute__((vector_size(Bytes)));
  static constexpr int W = Bytes / (int)sizeof(T);
  static inline v load(const T* p) {
    v r;
    std::memcpy(&r, p, sizeof r);
    return r;
  }
  static inline void store(T* p, const v& a) { std::memcpy(p, &a, sizeof a); }
  // A non-temporal store (to memory, past the caches, no read for ownership) where the vector is
  // a 32- or 64-byte register of the target; p must be aligned to the vector size. Ordered only by
  // stream_fence().
  static inline void stream(T* p, const v& a) {
#if defined(__AVX512F__)
    if constexpr (Bytes == 64) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), (__m512i)a);
      return;
    }
#endif
#if defined(__AVX2__)
    if constexpr (Bytes == 32) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), (__m256i)a);
      return;
    }
#endif
    store(p, a);
  }
  static inline v set1(T a) { return bcast(a, std::make_integer_sequence<int, W>{}); }
  // Sum of the lanes as a tree (halves added pairwise: log2(W) dependent adds). An in-order sum
  // (what GCC makes of an omp simd reduction) is a chain of W dependent scalar adds.
  static inline T hsum(const v& a) { return tree_sum<W>(a); }
  template <int L, typename VL>
  static inline T tree_sum(const VL& a) {
    if constexpr (L == 1) {
      return a[0];
    } else {
      return tree_sum<L / 2>(lanes<0>(a, std::make_integer_sequence<int, L / 2>{}) +
                             lanes<L / 2>(a, std::make_integer_sequence<int, L / 2>{}));
    }
  }
  // lanes Off .. Off + sizeof...(I) - 1 of a, as a vector of that many lanes
  template <int Off, typename VL, int... I>
  static inline auto lanes(const VL& a, std::integer_sequence<int, I...>) {
    return __builtin_shufflevector(a, a, (I + Off)...);
  }
  // a uniform constructor: one broadcast instruction
  template <int... I>
  static inline v bcast(T a, std::integer_sequence<int, I...>) {
    return v{((void)I, a)...};
  }
};

// f(std::integral_constant<int, i>) for i = 0 .. N-1, expanded in the source. The tiles store
// their accumulators with it: as loops over (r, q), even loops GCC was told to unroll (#pragma
// GCC unroll), the accumulator array lived on the stack outside the product loop (zeroed there,
// spilled after it and reloaded for the stores: 72 extra vector moves per 8 x 3 tile of expand),
// since the loops are unrolled only after the pass that keeps an array's elements in registers.
template <int N, typename F>
inline void unrolled(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (f(std::integral_constant<int, I>{}), ...);
  }(std::make_integer_sequence<int, N>{});
}

// Round n up to a multiple of the vector width of T.
template <typename T>
inline int round_up_vec(int n) {
  constexpr int W = simd<T>::W;
  return (n + W - 1) / W * W;
}

// Calls f(std::integral_constant<int, m>) for the runtime count 0 < m < RT: the rows left after
// the full tiles run as one tile of exactly m rows, not m one-row tiles (a one-row tile is FMA-
// latency bound: a few accumulators and n dependent steps each).
template <int RT, typename F>
inline void with_tail(int m, F&& f) {
  if constexpr (RT > 1) {
    if (m == RT - 1) f(std::integral_constant<int, RT - 1>{});
    else with_tail<RT - 1>(m, f);
  }
}

// Calls f(i0, std::integral_constant<int, nb>) for the chunks of up to four vectors that cover
// [0, np), np = n rounded up to the vector width: the column blocks of expand and outer.
template <typename T, typename F>
inline void for_vector_chunks(int n, F&& f) {
  constexpr int W = simd<T>::W;
  const int np = round_up_vec<T>(n);
  for (int i0 = 0; i0 < np;) {
    const int nb = std::min(4, (np - i0) / W);
    if (nb == 4) f(i0, std::integral_constant<int, 4>{});
    else if (nb == 3) f(i0, std::integral_constant<int, 3>{});
    else if (nb == 2) f(i0, std::integral_constant<int, 2>{});
    else f(i0, std::integral_constant<int, 1>{});
    i0 += nb * W;
  }
}

// Packed panels. A panel [rows, w] (w a multiple of the vector width) is stored by column chunks
// of up to MaxV vectors, the last one narrower, each chunk [rows, its width] row-major, the chunks
// one after another: the projection's panels U with MaxV = kProjectChunk (its column blocks), the
// expansion's panels UT with MaxV = kExpandChunk (those of for_vector_chunks). A tile then walks
// one contiguous block. Row-major panels a whole width apart cost a TLB entry per row once rows
// are kilobytes long: at n = 3072, D = 400 (AVX-512, one thread) the projection went from 94-114
// to 122-140 GFLOP/s and the expansion from 75-82 to 102-136 in a standalone harness. Panels of
// one chunk (every n = 48 shape) are laid out exactly as row-major ones.
constexpr int kProjectChunk = 3, kExpandChunk = 4;

// Columns per chunk of a panel chunked by MaxV vectors.
template <typename T, int MaxV>
constexpr int chunk_cols() {
  return MaxV * simd<T>::W;
}

// Offset of element (row, col) of a chunked panel [rows, w].
template <typename T, int MaxV>
inline int64_t chunked_offset(int row, int col, int rows, int w) {
  constexpr int CW = chunk_cols<T, MaxV>();
  const int c0 = col / CW * CW, cw = std::min(CW, w - c0);
  return (int64_t)c0 * rows + (int64_t)row * cw + (col - c0);
}

// ---- project: out[r, 0:NV*W] = sum_i A[r][i] U[i, 0:NV*W] for RT rows. Bytes < kVecBytes (half
// vectors, NV = 1): the panel is one full vector wide with nothing past its first half, and
// out[r, W:2W] is written as zeros.
template <typename T, int NV, int RT, int Bytes = kVecBytes>
inline void project_tile(const T* const* A, int n, const T* U, int ustride, T* out, int ostride) {
  using S = simd<T, Bytes>;
  using v = typename S::v;
  constexpr int W = S::W;
  v acc[RT][NV];
  unrolled<RT>([&](auto r) { unrolled<NV>([&](auto q) { acc[r][q] = v{}; }); });
  for (int i = 0; i < n; ++i) {
    v u[NV];
    for (int q = 0; q < NV; ++q) u[q] = S::load(U + (int64_t)i * ustride + q * W);
    for (int r = 0; r < RT; ++r) {
      const v a = S::set1(A[r][i]);
      for (int q = 0; q < NV; ++q) acc[r][q] += a * u[q];
    }
  }
  unrolled<RT>([&](auto r) {
    unrolled<NV>([&](auto q) { S::store(out + (int64_t)r * ostride + q * W, acc[r][q]); });
    if constexpr (Bytes != kVecBytes) {
      static_assert(NV == 1 && 2 * Bytes == kVecBytes, "half vectors: one column block");
      S::store(out + (int64_t)r * ostride + W, v{});
    }
  });
}

// Not inlined: the extension is linked with LTO (pybind11's default), and there GCC inlined both
// column widths' tiles into project, where the half-vector ones ran slower than the full-vector
// ones had (training step, hard, 1.06 in the op, against 0.95 in the paired harness built without
// LTO). As one call per column block: 0.96 in the op (LTO), 0.93-0.95 in the harness.
template <typename T, int NV, int RT, int Bytes = kVecBytes>
__attribute__((noinline)) void project_cols(const T* const* A, int R, int n, const T* U,
                                            int ustride, T* out, int ostride, RangePrefetch* pf) {
  int r = 0;
  for (; r + RT <= R; r += RT) {
    if (pf) pf->next();
    project_tile<T, NV, RT, Bytes>(A + r, n, U, ustride, out + (int64_t)r * ostride, ostride);
  }
  with_tail<RT>(R - r, [&](auto m) {
    if (pf) pf->next();
    project_tile<T, NV, decltype(m)::value, Bytes>(A + r, n, U, ustride,
                                                   out + (int64_t)r * ostride, ostride);
  });
}

// Rows per projection tile of nv vectors: nv * RT accumulators, nv panel vectors and one
// broadcast must fit in the vector registers (4, 6, 8 rows with 16 of them), and the RT row
// pointers in the 16 general registers: with 16 rows (32 vector registers), GCC kept half the
// pointers in vector registers and moved them back for every load, and zeroed and stored the
// tile through the stack (paired, AVX-512: 16 -> 8 rows at nv = 1 took 8% off a training step).
constexpr int project_rows(int nv) { return std::min(8, (kVecRegs - nv - 1) / nv); }

// out [R, w] (row stride ostride) = A [R rows of n] @ U [n, w], U the first n rows of a chunked
// panel [urows, w] (kProjectChunk); w a multiple of the width. used (optional): the panel is zero
// past its first `used` columns. With 64-byte vectors, a one-vector panel with used <= W / 2 (a
// component of d_k <= 8, float) is multiplied in half vectors: the same sums in the same order,
// and the FMAs of the zero half, which cost as much as the other half on cores that split 512-bit
// operations in two (AMD Zen 4), are not issued. pf (optional): lines prefetched a few per tile.
template <typename T>
inline void project(const T* const* A, int R, int n, const T* U, int urows, int w, T* out,
                    int ostride, int used = -1, RangePrefetch* pf = nullptr) {
  constexpr int W = simd<T>::W;
  static_assert(kProjectChunk == 3, "project's column blocks are the panel's chunks");
  if constexpr (kVecBytes == 64) {
    if (w == W && used >= 0 && 2 * used <= W) {
      project_cols<T, 1, project_rows(1), kVecBytes / 2>(A, R, n, U, W, out, ostride, pf);
      return;
    }
  }
  for (int c = 0; c < w;) {
    const int nv = std::min(kProjectChunk, (w - c) / W);
    const T* Uc = U + (int64_t)c * urows;  // the chunk: urows rows of nv vectors
    if (nv == 3) project_cols<T, 3, project_rows(3)>(A, R, n, Uc, 3 * W, out + c, ostride, pf);
    else if (nv == 2) project_cols<T, 2, project_rows(2)>(A, R, n, Uc, 2 * W, out + c, ostride, pf);
    else project_cols<T, 1, project_rows(1)>(A, R, n, Uc, W, out + c, ostride, pf);
    c += nv * W;
  }
}

// The largest divisor of w that is at most m (m >= 1).
constexpr int divisor_at_most(int w, int m) {
  int d = m < w ? m : w;
  while (w % d != 0) --d;
  return d;
}

// Coefficient matrices [R, J] (C of expand, B of outer) come row-major (entry (r, j) at
// r * stride + j) or, with Lanes, lane-major by groups of W rows: group q is a [stride][W] block
// (stride >= J columns of W lanes), entry (r, j) at (r / W) W stride + j W + r % W. That is the
// layout the soft mode's per-sample math makes in vector lanes (dae_blocks.h), read here without
// transposing it back into rows. Only the broadcasts' addresses differ: the same sums in the same
// order, so both layouts give the same bits. Without the transposes back (one 16 x 16 each, about
// 3 cycles per sample; paired in the op on two threads, Xeon VM): the denoiser's soft fwd+bwd at
// (48, 2, 6, 65536) 0.983-0.988, at (48, 3, 8, 65536) 0.968; the soft training step 0.994.
template <typename T, bool Lanes>
inline int64_t coef_offset(int r, int j, int stride) {
  constexpr unsigned W = (unsigned)simd<T>::W;
  if constexpr (Lanes)
    return (int64_t)((unsigned)r / W) * W * stride + (int64_t)j * W + (unsigned)r % W;
  else
    return (int64_t)r * stride + j;
}

// ---- expand: Y[r][i0 : i0 + NB*W] = sum_{j<J} C[r, j] UTc[j, 0 : NB*W] for RT rows, UTc the
// panel's chunk of columns i0 .. (rows NB*W apart); entries of the last vector beyond n are not
// written. Stream: the whole-vector rows are written by non-temporal stores (expand). Lanes: C
// points at the tile's first row inside one lane-major group (rows r at C[r + j W]).
template <typename T, int NB, int RT, bool Stream = false, bool Lanes = false>
inline void expand_tile(const T* C, int cstride, int J, const T* UTc, int i0, int n,
                        T* const* Y) {
  using S = simd<T>;
  using v = typename S::v;
  constexpr int W = S::W;
  v acc[RT][NB];
  unrolled<RT>([&](auto r) { unrolled<NB>([&](auto b) { acc[r][b] = v{}; }); });
  for (int j = 0; j < J; ++j) {
    v u[NB];
    for (int b = 0; b < NB; ++b) u[b] = S::load(UTc + (int64_t)j * (NB * W) + b * W);
    for (int r = 0; r < RT; ++r) {
      const v a = S::set1(Lanes ? C[r + j * W] : C[(int64_t)r * cstride + j]);
      for (int b = 0; b < NB; ++b) acc[r][b] += a * u[b];
    }
  }
  if (i0 + NB * W <= n) {  // whole vectors
    T* y[RT];  // the row pointers read once (a store through Y[r] might otherwise alias them)
    for (int r = 0; r < RT; ++r) y[r] = Y[r] + i0;
    unrolled<RT>([&](auto r) {
      unrolled<NB>([&](auto b) {
        if constexpr (Stream) S::stream(y[r] + b * W, acc[r][b]);
        else S::store(y[r] + b * W, acc[r][b]);
      });
    });
    return;
  }
  // the last vector is partial: the tile through a buffer, then the n - i0 values of each row
  T buf[RT][NB * W];
  unrolled<RT>([&](auto r) { unrolled<NB>([&](auto b) { S::store(buf[r] + b * W, acc[r][b]); }); });
  const int m = n - i0;
  for (int r = 0; r < RT; ++r)
    for (int e = 0; e < m; ++e) Y[r][i0 + e] = buf[r][e];
}

// Lanes: the tiles run group by group (a tile's rows must lie in one group).
template <typename T, int NB, int RT, bool Stream, bool Lanes>
inline void expand_rows(const T* C, int cstride, int R, int J, const T* UTc, int i0, int n,
                        T* const* Y, RangePrefetch* pf) {
  const int G = Lanes ? simd<T>::W : R;
  for (int g0 = 0; g0 < R; g0 += G) {
    const int Rg = std::min(G, R - g0);
    auto at = [&](int r) { return C + coef_offset<T, Lanes>(g0 + r, 0, cstride); };
    int r = 0;
    for (; r + RT <= Rg; r += RT) {
      if (pf) pf->next();
      expand_tile<T, NB, RT, Stream, Lanes>(at(r), cstride, J, UTc, i0, n, Y + g0 + r);
    }
    with_tail<RT>(Rg - r, [&](auto m) {
      if (pf) pf->next();
      expand_tile<T, NB, decltype(m)::value, Stream, Lanes>(at(r), cstride, J, UTc, i0, n,
                                                            Y + g0 + r);
    });
  }
}

// Y [R rows of n] = C [R, J] (row stride cstride) @ UT [J, np], UT the first J rows of a chunked
// panel [utrows, np] (kExpandChunk; np = n rounded up, zero padded). stream: the rows of Y are
// an output larger than the caches, each row aligned to 64 bytes and a whole number of vectors
// long (stream_rows): written by non-temporal stores, which skip reading every line in from
// memory before overwriting it, and leave the caches to the inputs; the caller calls
// stream_fence() before the rows are handed on. pf (optional): lines prefetched a few per tile.
// lanes: C is lane-major by groups of W rows (coef_offset), cstride its columns per group.
template <typename T>
inline void expand(const T* C, int cstride, int R, int J, const T* UT, int utrows, int n,
                   T* const* Y, bool stream = false, RangePrefetch* pf = nullptr,
                   bool lanes = false) {
  static_assert(kExpandChunk == 4, "for_vector_chunks' column blocks are the panel's chunks");
  for_vector_chunks<T>(n, [&](int i0, auto nb) {
    constexpr int NB = decltype(nb)::value;
    // rows per tile: 3, 4, 6, 8 (16 registers) or twice that, at most 8: as in project, the
    // row pointers must fit in the general registers. With 16 rows of one vector (32 registers:
    // the soft mode's per-component spread, comp_spread), GCC kept the pointers in vector
    // registers and the accumulators on the stack; at 8 rows the soft backward took 57-60 ns
    // per sample against 62-63 (one thread, in cache, AVX-512).
    constexpr int F = kVecRegs / 16;
    constexpr int RT = std::min(8, (NB == 1 ? 8 : 12 / NB) * F);
    const T* UTc = UT + (int64_t)i0 * utrows;
    // lane-major C: tiles of a divisor of W rows, so that a group of W is whole tiles (with RT = 6
    // and W = 8 each group ended in a two-row tile of too few accumulators to hide the FMA latency)
    constexpr int RTL = divisor_at_most(simd<T>::W, RT);
    auto run = [&](auto st, auto ln) {
      constexpr bool L = decltype(ln)::value;
      expand_rows<T, NB, L ? RTL : RT, decltype(st)::value, L>(C, cstride, R, J, UTc, i0, n, Y,
                                                               pf);
    };
    if (lanes) {
      if (stream) run(std::true_type{}, std::true_type{});
      else run(std::false_type{}, std::true_type{});
    } else {
      if (stream) run(std::true_type{}, std::false_type{});
      else run(std::false_type{}, std::false_type{});
    }
  });
}

// ---- outer: dUT[j0 + jj][i0 : i0 + NB*W] += sum_r B[r, j0 + jj] A[r][i0 : ...] for RJ columns of
// B. The accumulators run along n (no padding of the basis columns is multiplied), each gets one
// FMA per row r, and a row costs NB vector loads and RJ broadcasts for RJ*NB FMAs. Full: the
// NB vectors lie inside the rows of A; otherwise the last ones are read through a zero-filled
// copy, so nothing past a row's n entries is touched.
template <typename T, int NB, int RJ, bool Full, bool Lanes = false>
inline void outer_tile(const T* const* A, const T* B, int bstride, int R, int j0, int i0, int n,
                       T* dUT, int np) {
  using S = simd<T>;
  using v = typename S::v;
  constexpr int W = S::W;
  v acc[RJ][NB];
  unrolled<RJ>([&](auto jj) { unrolled<NB>([&](auto q) { acc[jj][q] = v{}; }); });
  for (int r = 0; r < R; ++r) {
    v b[RJ];
    const T* Br = B + coef_offset<T, Lanes>(r, j0, bstride);
    for (int jj = 0; jj < RJ; ++jj) b[jj] = S::set1(Br[Lanes ? jj * W : jj]);
    const T* a = A[r] + i0;
    for (int q = 0; q < NB; ++q) {
      v av;
      if (Full) {
        av = S::load(a + q * W);
      } else {
        T tmp[W] = {};
        const int m = std::min(W, n - i0 - q * W);
        for (int e = 0; e < m; ++e) tmp[e] = a[q * W + e];
        av = S::load(tmp);
      }
      for (int jj = 0; jj < RJ; ++jj) acc[jj][q] += b[jj] * av;
    }
  }
  unrolled<RJ>([&](auto jj) {
    unrolled<NB>([&](auto q) {
      T* p = dUT + (int64_t)(j0 + jj) * np + i0 + q * W;
      S::store(p, S::load(p) + acc[jj][q]);
    });
  });
}

template <typename T, int NB, int RJ, bool Lanes>
inline void outer_rows(const T* const* A, const T* B, int bstride, int R, int J, int i0, int n,
                       T* dUT, int np, RangePrefetch* pf) {
  constexpr int W = simd<T>::W;
  auto run = [&](auto full) {
    constexpr bool F = decltype(full)::value;
    int j = 0;
    for (; j + RJ <= J; j += RJ) {
      if (pf) pf->next();
      outer_tile<T, NB, RJ, F, Lanes>(A, B, bstride, R, j, i0, n, dUT, np);
    }
    with_tail<RJ>(J - j, [&](auto m) {
      if (pf) pf->next();
      outer_tile<T, NB, decltype(m)::value, F, Lanes>(A, B, bstride, R, j, i0, n, dUT, np);
    });
  };
  if (i0 + NB * W <= n) run(std::true_type{});
  else run(std::false_type{});
}

// dUT [J rows of np] += B^T A + B2^T A2, with A, A2 [R rows of n], B, B2 [R, >= J] (row stride
// bstride) and np = n rounded up to the vector width: the gradient wrt the basis, transposed.
// pf (optional): lines prefetched a few per tile. lanes: B and B2 are lane-major by groups of W
// rows (coef_offset), bstride their columns per group.
template <typename T>
inline void outer(const T* const* A, const T* B, const T* const* A2, const T* B2, int bstride,
                  int R, int J, int n, T* dUT, RangePrefetch* pf = nullptr, bool lanes = false) {
  const int np = round_up_vec<T>(n);
  for (int pass = 0; pass < 2; ++pass) {
    const T* const* Ap = pass ? A2 : A;
    const T* Bp = pass ? B2 : B;
    for_vector_chunks<T>(n, [&](int i0, auto nb) {
      constexpr int NB = decltype(nb)::value;
      // RJ*NB accumulators + RJ broadcasts + 1 load: 3, 3, 5, 7 (16 registers), 6, 7, 10, 15 (32)
      constexpr int RJ = (kVecRegs - 1) / (NB + 1);
      if (lanes) outer_rows<T, NB, RJ, true>(Ap, Bp, bstride, R, J, i0, n, dUT, np, pf);
      else outer_rows<T, NB, RJ, false>(Ap, Bp, bstride, R, J, i0, n, dUT, np, pf);
    });
  }
}

}  // namespace molrg::cpu
