// molrg_ext._cpuid: which of the extensions csrc/cpu_features.cpp can record this CPU runs, asked
// of the processor itself (CPUID) and of the operating system (XGETBV: whether it saves the AVX
// and AVX-512 registers, without which those instructions fault). The import consults it beside
// /proc/cpuinfo (molrg_ext/_cpu_features.py), whose names a kernel older than an extension does
// not list, and where there is no /proc/cpuinfo. A module of its own, compiled for the baseline
// x86-64 (never -march=native), so that loading and running it is safe on any x86-64 CPU.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define MOLRG_X86 1
#endif

namespace {

#ifdef MOLRG_X86
struct Bit {
  const char* name;  // as /proc/cpuinfo spells it
  int reg;           // 0 leaf 1 ECX, 1 leaf 7.0 EBX, 2 leaf 7.0 ECX, 3 leaf 7.0 EDX,
                     // 4 leaf 7.1 EAX, 5 leaf 0x80000001 ECX
  int bit;
  int state;  // registers the OS must save: 0 none, 1 AVX (XCR0 bits 1-2), 2 AVX-512 (also 5-7)
};

// bit positions from the Intel SDM (vol. 2A, CPUID) and AMD's APM (vol. 3, appendix E)
constexpr Bit kBits[] = {
    {"pni", 0, 0, 0},           {"ssse3", 0, 9, 0},        {"fma", 0, 12, 1},
    {"sse4_1", 0, 19, 0},       {"sse4_2", 0, 20, 0},      {"movbe", 0, 22, 0},
    {"popcnt", 0, 23, 0},       {"avx", 0, 28, 1},         {"f16c", 0, 29, 1},
    {"bmi1", 1, 3, 0},          {"avx2", 1, 5, 1},         {"bmi2", 1, 8, 0},
    {"avx512f", 1, 16, 2},      {"avx512dq", 1, 17, 2},    {"avx512ifma", 1, 21, 2},
    {"avx512pf", 1, 26, 2},     {"avx512er", 1, 27, 2},    {"avx512cd", 1, 28, 2},
    {"avx512bw", 1, 30, 2},     {"avx512vl", 1, 31, 2},    {"avx512vbmi", 2, 1, 2},
    {"avx512_vbmi2", 2, 6, 2},  {"gfni", 2, 8, 0},         {"vaes", 2, 9, 1},
    {"vpclmulqdq", 2, 10, 1},   {"avx512_vnni", 2, 11, 2}, {"avx512_bitalg", 2, 12, 2},
    {"avx512_vpopcntdq", 2, 14, 2}, {"avx512_fp16", 3, 23, 2}, {"avx_vnni", 4, 4, 1},
    {"avx512_bf16", 4, 5, 2},   {"lahf_lm", 5, 0, 0},      {"abm", 5, 5, 0},
    {"3dnowprefetch", 5, 8, 0}, {"xop", 5, 11, 1},         {"fma4", 5, 16, 1},
    {"tbm", 5, 21, 0},
};

std::uint64_t xcr0() {
  std::uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (std::uint64_t(hi) << 32) | lo;
}

std::string features() {
  unsigned a, b, c, d;
  std::uint32_t regs[6] = {};
  const unsigned max_leaf = __get_cpuid_max(0, nullptr);
  bool osxsave = false;
  if (max_leaf >= 1 && __get_cpuid(1, &a, &b, &c, &d)) {
    regs[0] = c;
    osxsave = (c >> 27) & 1;
  }
  if (max_leaf >= 7 && __get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    regs[1] = b;
    regs[2] = c;
    regs[3] = d;
    if (a >= 1 && __get_cpuid_count(7, 1, &a, &b, &c, &d)) regs[4] = a;
  }
  if (__get_cpuid_max(0x80000000u, nullptr) >= 0x80000001u &&
      __get_cpuid(0x80000001u, &a, &b, &c, &d))
    regs[5] = c;
  const std::uint64_t x = osxsave ? xcr0() : 0;
  const bool avx_state = (x & 0x6) == 0x6;
  const bool avx512_state = avx_state && (x & 0xe0) == 0xe0;
  std::string out;
  for (const Bit& f : kBits) {
    if (!((regs[f.reg] >> f.bit) & 1)) continue;
    if ((f.state == 1 && !avx_state) || (f.state == 2 && !avx512_state)) continue;
    if (!out.empty()) out += ' ';
    out += f.name;
  }
  return out;
}
#endif

}  // namespace

PYBIND11_MODULE(_cpuid, m) {
  m.doc() = "CPUID + XGETBV probe of the x86 extensions molrg_ext's build may record";
#ifdef MOLRG_X86
  m.def("features", &features,
        "space-separated /proc/cpuinfo names of the recordable extensions this CPU runs");
#else
  m.def("features", []() { return pybind11::none(); }, "None: not an x86 CPU");
#endif
}
