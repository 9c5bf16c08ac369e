// The CPU kernels' vector width (host only, torch-free): the register tiles' vectors (tiles.h)
// and the loops that GCC vectorises itself (MOLRG_FULL_WIDTH).
#pragma once

namespace molrg::cpu {

// Vector width and register count: 64-byte vectors and 32 registers where the build targets
// AVX-512 (-march=native on such a machine), 32-byte vectors and 16 registers otherwise (AVX2,
// or two SSE halves; -DMOLRG_VEC256 forces this on AVX-512 too, as it does the 8-lane Philox of
// philox_lanes.h). The panels' padding (round_up_vec) and the tile shapes follow.
#if defined(__AVX512F__) && !defined(MOLRG_VEC256)
constexpr int kVecBytes = 64, kVecRegs = 32;
#else
constexpr int kVecBytes = 32, kVecRegs = 16;
#endif

}  // namespace molrg::cpu

// Marks a function whose loops GCC is to vectorise at kVecBytes. Its tunings for AVX-512 cores
// prefer 256-bit vectors for the loops it vectorises itself (-mprefer-vector-width=256), `omp
// simd` loops included: half the lanes per instruction. The loops marked so work lane by lane (no
// reductions across lanes), so the results do not depend on the width. A target attribute, not
// an `omp simd simdlen`, which GCC's link-time optimisation (pybind11's default in release
// builds) drops. A loop inlined into a caller is vectorised at the caller's preference: the
// callers that inline a marked function are marked too.
// (Box-Muller of the training step's normals, one core of the Xeon VM: 1.11 -> 0.78-0.80 ns per
// normal; the training step op 0.91-0.92 of its time, paired.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__) && !defined(MOLRG_VEC256)
#define MOLRG_FULL_WIDTH __attribute__((target("prefer-vector-width=512")))
#else
#define MOLRG_FULL_WIDTH
#endif
