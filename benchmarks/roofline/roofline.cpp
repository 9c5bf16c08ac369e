// Roofline probe of this machine: the fp32 FMA peak (FMAs of the widest vectors, 8 or 16 lanes,
// into 10 independent accumulators per thread, so neither latency nor loads limit it) and the
// memory bandwidth of streaming reads, writes and a triad over 256 MiB arrays, with T OpenMP
// threads, and the triad over three 12 MiB arrays (the n = 48 denoiser benchmark's x, g and y at
// B = 65536), which stay in the last-level cache where it is large (260 MiB on the Xeon VM). Then the cost of scattered cache lines, which bounds a gather of random training
// rows (the fused training step reads 3 lines per drawn row at n = 48 float): the latency of one
// line (a pointer chase through a random cycle of the lines of a 256 MiB array, one thread) and
// the throughput of independent loads of random lines (T threads, each its own random line
// sequence), and the same for random rows of three adjacent lines of a training set of the
// benchmark's size.
// Build and run: benchmarks/roofline/run.sh [threads]. Prints one JSON object.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// FMAs of the widest vectors the build targets: 16 lanes with AVX-512 (-march=native on such a
// machine), 8 with AVX2. a * m + b on these GCC vectors is one FMA instruction: run.sh compiles
// with -ffp-contract=fast (an ISO -std otherwise turns contraction off).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(4 * kLanes)));

__attribute__((noinline)) static float fma_loop(long iters) {
  Vec a[10];
  for (int i = 0; i < 10; ++i) a[i] = Vec{} + 0.001f * i;
  const Vec m = Vec{} + 0.9999f, b = Vec{} + 1e-6f;
  for (long it = 0; it < iters; ++it)
    for (int i = 0; i < 10; ++i) a[i] = a[i] * m + b;
  Vec s = a[0];
  for (int i = 1; i < 10; ++i) s += a[i];
  return s[0];
}

template <typename F>
static double best_of(int reps, F&& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now();
    f();
    best = std::min(best, now() - t0);
  }
  return best;
}

int main(int argc, char** argv) {
  const int T = argc > 1 ? std::atoi(argv[1]) : omp_get_max_threads();
  omp_set_num_threads(T);
  const long iters = 20000000;
  float sink = 0;
  const double tf = best_of(5, [&] {
#pragma omp parallel reduction(+ : sink)
    sink += fma_loop(iters);
  });
  const double gflops = 2.0 * kLanes * 10 * iters * T / tf / 1e9;

  const size_t N = (size_t)64 << 20;  // 64 Mi floats = 256 MiB per array
  float* a = static_cast<float*>(std::aligned_alloc(64, N * 4));
  float* b = static_cast<float*>(std::aligned_alloc(64, N * 4));
  float* c = static_cast<float*>(std::aligned_alloc(64, N * 4));
#pragma omp parallel for
  for (size_t i = 0; i < N; ++i) a[i] = 1.0f, b[i] = 2.0f, c[i] = 0.0f;
  float acc = 0;
  const double tr = best_of(5, [&] {
    float s = 0;
#pragma omp parallel reduction(+ : s)
    {
      __m256 v[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
#pragma omp for
      for (size_t i = 0; i < N; i += 32)
        for (int q = 0; q < 4; ++q) v[q] = _mm256_add_ps(v[q], _mm256_load_ps(a + i + 8 * q));
      float o[8];
      _mm256_storeu_ps(o, _mm256_add_ps(_mm256_add_ps(v[0], v[1]), _mm256_add_ps(v[2], v[3])));
      for (float e : o) s += e;
    }
    acc += s;
  });
  const double tw = best_of(5, [&] {
#pragma omp parallel for simd
    for (size_t i = 0; i < N; ++i) c[i] = 1.5f;
  });
  const double tt = best_of(5, [&] {
#pragma omp parallel for simd
    for (size_t i = 0; i < N; ++i) c[i] = a[i] + 0.5f * b[i];
  });
  const double MB = N * 4.0 / 1e9;
  // The same triad over the first 12 MiB of each array, repeated: cache-resident when the last
  // level holds 36 MiB.
  const size_t Nc = (size_t)3 << 20;  // 3 Mi floats = 12 MiB
  const double ttc = best_of(40, [&] {
#pragma omp parallel for simd
    for (size_t i = 0; i < Nc; ++i) c[i] = a[i] + 0.5f * b[i];
  });

  // Scattered lines of the 256 MiB array a, viewed as 64-byte lines of 16 uint32 words.
  const size_t lines = N / 16;
  uint32_t* w = reinterpret_cast<uint32_t*>(a);
  std::vector<uint32_t> perm(lines);
  std::iota(perm.begin(), perm.end(), 0u);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(7));
  for (size_t i = 0; i < lines; ++i) w[(size_t)perm[i] * 16] = perm[(i + 1) % lines];
  const long hops = 2000000;
  uint32_t at = perm[0];
  const double tl = best_of(3, [&] {
    for (long h = 0; h < hops; ++h) at = w[(size_t)at * 16];
  });
  // Best of 3 of `count` loads per thread at random indices below `range` (a per-thread LCG
  // seeded by `seed`, so no address depends on a loaded value); load(i) reads at index i.
  uint64_t xs = 0;
  auto scattered = [&](long count, uint64_t seed, size_t range, auto load) {
    return best_of(3, [&] {
      uint64_t s = 0;
#pragma omp parallel reduction(+ : s)
      {
        uint64_t r = seed * (uint64_t)(omp_get_thread_num() + 1);
        for (long i = 0; i < count; ++i) {
          r = r * 6364136223846793005ull + 1442695040888963407ull;
          s += load((size_t)((r >> 33) % range));
        }
      }
      xs += s;
    });
  };
  const long loads = 4000000;  // per thread
  const double tg = scattered(loads, 0x9E3779B97F4A7C15ull, lines,
                              [&](size_t i) -> uint64_t { return w[i * 16]; });
  // Scattered rows as the training-step benchmark reads them: rows of three adjacent lines (192
  // bytes, one float32 row of n = 48) drawn at random from a 48 MiB set (its 64 x 4096 rows), one
  // word of each line, rows independent. Adjacent lines share a DRAM page, the set's page tables
  // stay cached and part of the set stays in L3 from one repetition to the next, as from one
  // training step to the next, so a line costs less than a lone line of 256 MiB.
  const long rows = 1500000;  // per thread
  const double trw = scattered(rows, 0xD1B54A32D192ED03ull, (size_t)64 * 4096,
                               [&](size_t i) -> uint64_t {
                                 const uint32_t* row = w + i * 48;
                                 return row[0] + row[16] + row[32];
                               });
  std::printf(
      "{\"threads\": %d, \"fma_peak_gflops\": %.1f, \"read_gbs\": %.1f, \"write_gbs\": %.1f, "
      "\"triad_gbs\": %.1f, \"fma_lanes\": %d, \"line_latency_ns\": %.0f, "
      "\"random_line_ns\": %.1f, \"random_line_gbs\": %.2f, \"row3_line_ns\": %.1f, "
      "\"cached_triad_gbs\": %.1f, \"cached_set_mib\": 36, \"_\": %g}\n",
      T, gflops, MB / tr, MB / tw, 3 * MB / tt, kLanes, tl / hops * 1e9, tg / loads * 1e9,
      64.0 * loads * T / tg / 1e9, trw / (3.0 * rows) * 1e9, 3 * Nc * 4.0 / 1e9 / ttc,
      (double)(sink + acc + c[N / 2] + at + xs));
  std::free(a);
  std::free(b);
  std::free(c);
  return 0;
}
