// Subnormal floats on x86: an instruction with a subnormal operand or result takes a microcode
// assist of ~100+ cycles unless the thread runs with FTZ (results flushed to zero) and DAZ
// (subnormal operands read as zero), MXCSR bits 15 and 6. The soft-max weights of components
// far from a sample are subnormal (exp of a logit gap of 87-103 in float32), and so are the
// coefficients and gradient rows built from them: 0.5% of the weights in the n = 48 training
// step benchmark, where every one costs assists in each product it enters. The CPU kernels
// therefore run their work with FTZ and DAZ set on each worker thread and restored afterwards
// (parallel_for_flushed, dae_panels_at.h): a value changes by less than the smallest normal
// (1.2e-38 in float32), as on a GPU with flush-to-zero. The operands the denoiser's GEMM path
// hands to MKL are computed by those loops, so they hold no subnormal either. Torch-free (the
// paired harness uses it too); a no-op off x86.
#pragma once

#if defined(__x86_64__) || defined(_M_X64) || defined(__SSE2__)
#include <xmmintrin.h>
#define MOLRG_HAVE_MXCSR 1
#endif

namespace molrg::cpu {

class FlushSubnormals {
 public:
#ifdef MOLRG_HAVE_MXCSR
  static constexpr unsigned kFtzDaz = 0x8040u;
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFtzDaz); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#else
  FlushSubnormals() {}
#endif

 public:
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

}  // namespace molrg::cpu
