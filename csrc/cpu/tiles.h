// Register-tiled small matrix products for the CPU denoiser kernels (host only, torch-free).
//
// On a block of S samples the denoiser is three small matrix products against one basis panel
// U [n, w] (w columns, a multiple of the vector width; the panel is a few KiB and stays in L1):
//   project  out[S, w] = A[S, n] @ U[n, w]                    (P = U^T x, r = U^T g)
//   expand   Y[S, n]   = C[S, J] @ UT[J, n]                   (reconstruction, dx)
//   outer    dU[n, w] += A^T[n, S] @ B[S, w] + A2^T @ B2      (gradient wrt the basis)
// Each keeps a tile of accumulators in vector registers across the whole inner dimension, so a
// multiply-add costs one FMA and a fraction of a load, instead of the dot-product-per-output form
// (one horizontal reduction per output). Vectors are GCC vector extensions of 32 bytes: AVX2/FMA
// instructions under -march=native on this class of machine, two SSE halves otherwise; float and
// double share the code. Rows of A, A2 and Y are pointer arrays, so samples can be gathered
// (hard mode groups the samples of a block by component) without copying them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace molrg::cpu {

template <typename T>
struct simd {
  typedef T v __attribute__((vector_size(32)));
  static constexpr int W = 32 / (int)sizeof(T);
  static inline v load(const T* p) {
    v r;
    std::memcpy(&r, p, sizeof r);
    return r;
  }
  static inline void store(T* p, const v& a) { std::memcpy(p, &a, sizeof a); }
  static inline v set1(T a) {  // a uniform constructor: one broadcast instruction
    if constexpr (W == 8) return v{a, a, a, a, a, a, a, a};
    else return v{a, a, a, a};
  }
};

// Round n up to a multiple of the vector width of T.
template <typename T>
inline int round_up_vec(int n) {
  constexpr int W = simd<T>::W;
  return (n + W - 1) / W * W;
}

// ---- project: out[r, 0:NV*W] = sum_i A[r][i] U[i, 0:NV*W] for RT rows.
template <typename T, int NV, int RT>
inline void project_tile(const T* const* A, int n, const T* U, int ustride, T* out, int ostride) {
  using S = simd<T>;
  using v = typename S::v;
  constexpr int W = S::W;
  v acc[RT][NV];
  for (int r = 0; r < RT; ++r)
    for (int q = 0; q < NV; ++q) acc[r][q] = v{};
  for (int i = 0; i < n; ++i) {
    v u[NV];
    for (int q = 0; q < NV; ++q) u[q] = S::load(U + (int64_t)i * ustride + q * W);
    for (int r = 0; r < RT; ++r) {
      const v a = S::set1(A[r][i]);
      for (int q = 0; q < NV; ++q) acc[r][q] += a * u[q];
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int q = 0; q < NV; ++q) S::store(out + (int64_t)r * ostride + q * W, acc[r][q]);
}

template <typename T, int NV, int RT>
inline void project_cols(const T* const* A, int R, int n, const T* U, int ustride, T* out,
                         int ostride) {
  int r = 0;
  for (; r + RT <= R; r += RT)
    project_tile<T, NV, RT>(A + r, n, U, ustride, out + (int64_t)r * ostride, ostride);
  for (; r < R; ++r) project_tile<T, NV, 1>(A + r, n, U, ustride, out + (int64_t)r * ostride, ostride);
}

// out [R, w] (row stride ostride) = A [R rows of n] @ U [n, w]; w a multiple of the width.
template <typename T>
inline void project(const T* const* A, int R, int n, const T* U, int w, T* out, int ostride) {
  constexpr int W = simd<T>::W;
  for (int c = 0; c < w;) {
    const int nv = std::min(3, (w - c) / W);
    if (nv == 3) project_cols<T, 3, 4>(A, R, n, U + c, w, out + c, ostride);
    else if (nv == 2) project_cols<T, 2, 6>(A, R, n, U + c, w, out + c, ostride);
    else project_cols<T, 1, 8>(A, R, n, U + c, w, out + c, ostride);
    c += nv * W;
  }
}

// ---- expand: Y[r][i0 : i0 + NB*W] = sum_{j<J} C[r, j] UT[j, i0 : ...] for RT rows; entries of
// the last vector beyond n are not written.
template <typename T, int NB, int RT>
inline void expand_tile(const T* C, int cstride, int J, const T* UT, int np, int i0, int n,
                        T* const* Y) {
  using S = simd<T>;
  using v = typename S::v;
  constexpr int W = S::W;
  v acc[RT][NB];
  for (int r = 0; r < RT; ++r)
    for (int b = 0; b < NB; ++b) acc[r][b] = v{};
  for (int j = 0; j < J; ++j) {
    v u[NB];
    for (int b = 0; b < NB; ++b) u[b] = S::load(UT + (int64_t)j * np + i0 + b * W);
    for (int r = 0; r < RT; ++r) {
      const v a = S::set1(C[(int64_t)r * cstride + j]);
      for (int b = 0; b < NB; ++b) acc[r][b] += a * u[b];
    }
  }
  for (int r = 0; r < RT; ++r)
    for (int b = 0; b < NB; ++b) {
      const int i = i0 + b * W;
      if (i + W <= n) {
        S::store(Y[r] + i, acc[r][b]);
      } else {
        T tmp[W];
        S::store(tmp, acc[r][b]);
        for (int e = 0; e < n - i; ++e) Y[r][i + e] = tmp[e];
      }
    }
}

template <typename T, int NB, int RT>
inline void expand_rows(const T* C, int cstride, int R, int J, const T* UT, int np, int i0, int n,
                        T* const* Y) {
  int r = 0;
  for (; r + RT <= R; r += RT)
    expand_tile<T, NB, RT>(C + (int64_t)r * cstride, cstride, J, UT, np, i0, n, Y + r);
  for (; r < R; ++r) expand_tile<T, NB, 1>(C + (int64_t)r * cstride, cstride, J, UT, np, i0, n, Y + r);
}

// Y [R rows of n] = C [R, J] (row stride cstride) @ UT [J, np] (np = n rounded up, zero padded).
template <typename T>
inline void expand(const T* C, int cstride, int R, int J, const T* UT, int n, T* const* Y) {
  constexpr int W = simd<T>::W;
  const int np = round_up_vec<T>(n);
  for (int i0 = 0; i0 < np;) {
    const int nb = std::min(4, (np - i0) / W);
    if (nb == 4) expand_rows<T, 4, 3>(C, cstride, R, J, UT, np, i0, n, Y);
    else if (nb == 3) expand_rows<T, 3, 4>(C, cstride, R, J, UT, np, i0, n, Y);
    else if (nb == 2) expand_rows<T, 2, 6>(C, cstride, R, J, UT, np, i0, n, Y);
    else expand_rows<T, 1, 8>(C, cstride, R, J, UT, np, i0, n, Y);
    i0 += nb * W;
  }
}

// ---- outer: dU[i, 0:NV*W] += sum_r A[r][i] B[r, :] + A2[r][i] B2[r, :] for RI rows i.
template <typename T, int NV, int RI>
inline void outer_tile(const T* const* A, const T* B, const T* const* A2, const T* B2,
                       int bstride, int R, int i0, T* dU, int ustride) {
  using S = simd<T>;
  using v = typename S::v;
  constexpr int W = S::W;
  v acc[RI][NV];
  for (int i = 0; i < RI; ++i)
    for (int q = 0; q < NV; ++q) acc[i][q] = v{};
  for (int r = 0; r < R; ++r) {
    v b[NV], b2[NV];
    for (int q = 0; q < NV; ++q) {
      b[q] = S::load(B + (int64_t)r * bstride + q * W);
      b2[q] = S::load(B2 + (int64_t)r * bstride + q * W);
    }
    const T* a = A[r] + i0;
    const T* a2 = A2[r] + i0;
    for (int i = 0; i < RI; ++i) {
      const v ai = S::set1(a[i]), a2i = S::set1(a2[i]);
      for (int q = 0; q < NV; ++q) {  // two separate FMAs into the accumulator
        acc[i][q] += ai * b[q];
        acc[i][q] += a2i * b2[q];
      }
    }
  }
  for (int i = 0; i < RI; ++i)
    for (int q = 0; q < NV; ++q) {
      T* p = dU + (int64_t)(i0 + i) * ustride + q * W;
      S::store(p, S::load(p) + acc[i][q]);
    }
}

template <typename T, int NV, int RI>
inline void outer_cols(const T* const* A, const T* B, const T* const* A2, const T* B2,
                       int bstride, int R, int n, T* dU, int ustride) {
  int i = 0;
  for (; i + RI <= n; i += RI) outer_tile<T, NV, RI>(A, B, A2, B2, bstride, R, i, dU, ustride);
  for (; i < n; ++i) outer_tile<T, NV, 1>(A, B, A2, B2, bstride, R, i, dU, ustride);
}

// dU [n, w] += A^T B + A2^T B2 with A, A2 [R rows of n] and B, B2 [R, w] (row stride bstride).
template <typename T>
inline void outer(const T* const* A, const T* B, const T* const* A2, const T* B2, int bstride,
                  int R, int n, T* dU, int w) {
  constexpr int W = simd<T>::W;
  for (int c = 0; c < w;) {
    const int nv = std::min(2, (w - c) / W);
    if (nv == 2) outer_cols<T, 2, 4>(A, B + c, A2, B2 + c, bstride, R, n, dU + c, w);
    else outer_cols<T, 1, 6>(A, B + c, A2, B2 + c, bstride, R, n, dU + c, w);
    c += nv * W;
  }
}

}  // namespace molrg::cpu
