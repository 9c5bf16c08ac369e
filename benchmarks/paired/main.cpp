// Paired harness: two builds of the training step (A, B: variant.cpp) alternate step by step in
// one process, A first on even rounds and B first on odd ones, and each round's time ratio B/A
// is kept. On a shared VM whose speed drifts by 10-50% within minutes, the median of these
// paired ratios is far steadier than comparing separate runs.
// Usage: pair MODE(soft|hard) ROUNDS [N rows per instance, default 4096]; OMP_NUM_THREADS sets
// the threads. Shape: P = 64 instances, n = 48, K = 2, d = 6, M = 1024, 64 noise levels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <random>
#include <sys/mman.h>
#include <vector>

extern "C" double run_A(const float*, int, int, int, int, int, int, const float*, const float*,
                        int, int, uint32_t, float*, float*);
extern "C" double run_B(const float*, int, int, int, int, int, int, const float*, const float*,
                        int, int, uint32_t, float*, float*);

// Largest |a - b| / max(|a|, |b|, 1e-30) over two arrays (0 when they are bit-identical).
static double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs((double)a[i] - b[i]);
    if (d > 0) m = std::max(m, d / std::max({std::fabs((double)a[i]), std::fabs((double)b[i]), 1e-30}));
  }
  return m;
}

// Largest |a - b| over the largest |a|: a difference of rounding in a sum that cancels to nearly 0
// is large elementwise but not against the array's scale.
static double max_norm_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0, s = 1e-30;
  for (size_t i = 0; i < a.size(); ++i) {
    m = std::max(m, std::fabs((double)a[i] - b[i]));
    s = std::max(s, std::fabs((double)a[i]));
  }
  return m / s;
}

// The training set 64-byte aligned, as torch allocates tensors: from plain malloc a set this large
// is mmapped and starts 16 bytes into a page, so every 192-byte row (n = 48) would span four cache
// lines instead of three, and the harness would pay for a quarter more memory traffic than the op
// (1 thread, hard step on the Zen 4 VM: 8.2-8.4 ms against 7.8-7.9 ms aligned).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename O>
  Aligned64(const Aligned64<O>&) {}
  // PAIR_THP=1: arrays of 2 MiB or more are 2 MiB aligned and madvised for transparent huge
  // pages, as torch's allocator does with THP_MEM_ALLOC_ENABLE=1.
  static size_t alignment(size_t bytes) {
    static const bool thp = getenv("PAIR_THP") && !strcmp(getenv("PAIR_THP"), "1");
    return thp && bytes >= (2u << 20) ? (2u << 20) : 64;
  }
  T* allocate(size_t k) {
    const size_t bytes = k * sizeof(T), al = alignment(bytes);
    T* q = static_cast<T*>(::operator new(bytes, std::align_val_t(al)));
    if (al > 64) madvise(q, (bytes + al - 1) / al * al, MADV_HUGEPAGE);
    return q;
  }
  void deallocate(T* q, size_t k) {
    ::operator delete(q, std::align_val_t(alignment(k * sizeof(T))));
  }
  template <typename O>
  bool operator==(const Aligned64<O>&) const { return true; }
};

int main(int argc, char** argv) {
  if (argc < 3 || (strcmp(argv[1], "soft") && strcmp(argv[1], "hard"))) {
    fprintf(stderr, "usage: %s soft|hard ROUNDS [N]\n", argv[0]);
    return 2;
  }
  const int mode = strcmp(argv[1], "hard") == 0, rounds = std::max(2, atoi(argv[2]));
  const int N = argc > 3 ? atoi(argv[3]) : 4096;
  const int P = 64, n = 48, K = 2, d = 6, M = 1024, L = 64;
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  std::vector<float, Aligned64<float>> X((size_t)P * N * n);
  std::vector<float> U((size_t)P * K * n * d), lv(L * 5);
  std::vector<float> loss((size_t)P * M);
  for (auto& v : X) v = nd(rng);
  for (auto& v : U) v = nd(rng) / std::sqrt((float)n);
  const char* lvenv = getenv("PAIR_LEVELS");
  if (lvenv && !strcmp(lvenv, "bench")) {  // molrg_ext.bench._levels: s = 1, gamma 0.02 .. 1
    for (int l = 0; l < L; ++l) {
      const double gm = 0.02 + (1.0 - 0.02) * l / (L - 1), c = 1 / (1 + gm * gm);
      const float row[5] = {1.f, (float)gm, 1.f, (float)c, (float)(c / (2 * gm * gm))};
      std::copy(row, row + 5, lv.begin() + 5 * l);
    }
  } else
  for (int l = 0; l < L; ++l) {  // EDM-like sigmas 0.002 .. 80, s = 1 / sqrt(1 + sigma^2)
    const float sg = 0.002f * std::pow(80.f / 0.002f, l / float(L - 1));
    const float s = 1 / std::sqrt(1 + sg * sg);
    const float row[5] = {s, s * sg, 1.f, 1 / (1 + sg * sg), 1 / (sg * sg + 1e-3f)};
    std::copy(row, row + 5, lv.begin() + 5 * l);
  }
  // Step 1 of both builds, outputs kept: do they agree?
  const size_t acc_size = (size_t)P * 2 * K * d * ((n + 7) / 8 * 8);
  std::vector<float> la((size_t)P * M), lb((size_t)P * M), ga(acc_size), gb(acc_size);
  run_A(X.data(), P, N, n, K, d, M, U.data(), lv.data(), L, mode, 1, la.data(), ga.data());
  run_B(X.data(), P, N, n, K, d, M, U.data(), lv.data(), L, mode, 1, lb.data(), gb.data());
  const double dl = max_rel_diff(la, lb), dg = max_rel_diff(ga, gb);
  if (dl == 0 && dg == 0) printf("outputs: A and B bit-identical (slot losses and gradients)\n");
  else printf("outputs: A and B differ, max relative difference: slot losses %.3g, gradients %.3g "
              "(elementwise); gradients %.3g (of the largest entry)\n", dl, dg, max_norm_diff(ga, gb));
  std::vector<double> ta, tb, ratio;
  auto a = [&](uint32_t st) {
    return run_A(X.data(), P, N, n, K, d, M, U.data(), lv.data(), L, mode, st, loss.data(),
                 nullptr);
  };
  auto b = [&](uint32_t st) {
    return run_B(X.data(), P, N, n, K, d, M, U.data(), lv.data(), L, mode, st, loss.data(),
                 nullptr);
  };
  for (int r = 0; r < rounds; ++r) {
    double x, y;
    if (r % 2) y = b(r + 1), x = a(r + 1);
    else x = a(r + 1), y = b(r + 1);
    ta.push_back(x), tb.push_back(y), ratio.push_back(y / x);
  }
  for (auto* v : {&ta, &tb, &ratio}) std::sort(v->begin(), v->end());
  auto q = [](const std::vector<double>& v, double f) { return v[(size_t)(f * (v.size() - 1))]; };
  printf("%s N=%d: A min %.2f median %.2f ms | B min %.2f median %.2f ms | B/A median %.3f "
         "(quartiles %.3f, %.3f) over %d pairs\n", argv[1], N, ta[0] * 1e3, q(ta, .5) * 1e3,
         tb[0] * 1e3, q(tb, .5) * 1e3, q(ratio, .5), q(ratio, .25), q(ratio, .75), rounds);
  return 0;
}
