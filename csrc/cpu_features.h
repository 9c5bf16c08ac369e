// The x86 instruction-set extensions this library was compiled to use (-march=native by default,
// MOLRG_NATIVE=ON), in Linux's /proc/cpuinfo names, as one string literal stored in the shared
// library: "MOLRG_CPU_FEATURES[avx avx2 fma ...]". molrg_ext's import finds it by reading the
// file before loading it (molrg_ext/_cpu_features.py) and refuses a build that needs extensions
// the running CPU lacks (by /proc/cpuinfo and by CPUID: csrc/probe/cpuid.cpp, whose table
// holds the same names), which would otherwise stop the interpreter with an illegal instruction
// (SIGILL) in the library's own code. Listed: the vector, FMA/FMA4/XOP, bit-manipulation and
// prefetch extensions, which GCC may emit on its own (a few, such as VAES, only for their own
// types or intrinsics, listed to be safe); left out: those reached only through intrinsics this
// code does not use (AES, SHA, RDRAND, XSAVE, AMX, ...; python_tests/test_cpu_features.py
// checks the split against the compiler's macros for several targets). The baseline (x86-64:
// SSE2) is always there. Compiled with the same flags as every kernel.
#pragma once

namespace molrg {

// Defined in cpu_features.cpp (a separate object, kept with `used`, so the bytes are in the file
// even where a compiler could fold a use of them away).
extern const char kCpuFeaturesRecord[];

}  // namespace molrg
