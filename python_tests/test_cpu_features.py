"""The CPU check before the compiled module loads (molrg_ext/_cpu_features.py): a build that uses
instructions the running CPU lacks is refused with an ImportError instead of SIGILL."""
import os
import pathlib
import platform
import re
import shutil
import subprocess

import pytest

import molrg_ext
from molrg_ext import _cpu_features as cf

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cpu_features.cpp"


def _cxx():
    """The C++ compiler ($CXX, g++ or c++); skips the test without one."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    return cxx


def _record_names():
    """Every name csrc/cpu_features.cpp can put in the record."""
    return set(re.findall(r'^\s*" ([a-z0-9_]+)"$', SOURCE.read_text(), re.M))


@pytest.fixture
def no_probe(monkeypatch):
    """The kernel's flags as the only account (tests with a made-up /proc/cpuinfo)."""
    monkeypatch.setattr(cf, "cpuid_features", lambda: None)


def _cpuinfo(tmp_path, *flag_lines, name="cpuinfo"):
    text = "".join(f"processor\t: {i}\nvendor_id\t: Test\nflags\t\t: {flags}\n\n"
                   for i, flags in enumerate(flag_lines))
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _library(tmp_path, features, name="lib.so"):
    path = tmp_path / name
    path.write_bytes(b"\x7fELF" + b"\0" * 100 + b"MOLRG_CPU_FEATURES[" + features.encode()
                     + b"]\0" + b"\1" * 100)
    return str(path)


def test_the_build_in_use_records_what_it_was_compiled_for():
    """The record the import reads from the file is the one the module reports, and it is in the
    file once: with LTO, GCC once folded a second, garbled copy of the string into the library
    (bindings.cpp now reads it through an opaque pointer), and the reader takes the first."""
    recorded = cf.recorded_features(molrg_ext._C.__file__)
    assert recorded is not None
    assert " ".join(recorded) == molrg_ext._C.cpu_features
    data = pathlib.Path(molrg_ext._C.__file__).read_bytes()
    assert data.count(cf.MARKER) == 1


def test_missing_features_are_named_with_the_way_out(tmp_path, monkeypatch, no_probe):
    monkeypatch.delenv("MOLRG_CPU_CHECK", raising=False)
    lib = _library(tmp_path, " avx2 fma avx512f avx512bw ")
    cpu = _cpuinfo(tmp_path, "fpu sse sse2 avx avx2 fma")
    assert cf.recorded_features(lib) == ["avx2", "fma", "avx512f", "avx512bw"]
    assert cf.missing_features(lib, cpu) == ["avx512f", "avx512bw"]
    with pytest.raises(ImportError) as err:
        cf.check(lib, cpu)
    msg = str(err.value)
    assert lib in msg and "avx512f avx512bw" in msg and "illegal instruction" in msg
    assert f"({cpu} does not name them)" in msg
    assert "MOLRG_NATIVE=OFF" in msg and "MOLRG_CPU_CHECK=0" in msg
    # all there: no error
    cf.check(lib, _cpuinfo(tmp_path, "sse2 avx2 fma avx512f avx512bw avx512vl", name="big"))
    # the escape hatch
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv("MOLRG_CPU_CHECK", off)
        cf.check(lib, cpu)
    monkeypatch.setenv("MOLRG_CPU_CHECK", "1")
    with pytest.raises(ImportError):
        cf.check(lib, cpu)


def test_every_processor_must_have_them(tmp_path, no_probe):
    lib = _library(tmp_path, "avx2 avx512f")
    cpu = _cpuinfo(tmp_path, "sse2 avx2 avx512f", "sse2 avx2")
    assert cf.cpu_flags(cpu) == {"sse2", "avx2"}
    assert cf.missing_features(lib, cpu) == ["avx512f"]


def test_nothing_to_compare_means_no_refusal(tmp_path, no_probe):
    lib = _library(tmp_path, "avx512f")
    # no such file (another system), or no flags line (another architecture's cpuinfo)
    assert cf.cpu_flags(str(tmp_path / "absent")) is None
    assert cf.missing_features(lib, str(tmp_path / "absent")) == []
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm\n")
    assert cf.cpu_flags(str(arm)) is None and cf.missing_features(lib, str(arm)) == []
    # a library without the record (built before it existed), an empty record, an empty file
    old = tmp_path / "old.so"
    old.write_bytes(b"\x7fELF" + b"\0" * 64)
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"")
    cpu = _cpuinfo(tmp_path, "sse2")
    for path in (str(old), _library(tmp_path, " ", name="base.so"), str(empty)):
        assert cf.missing_features(path, cpu) == []
        cf.check(path, cpu)


def test_cpuid_settles_names_the_kernel_does_not_list(tmp_path, monkeypatch):
    """A kernel older than an extension does not list it in /proc/cpuinfo, while CPUID reports it:
    not a refusal. An extension neither names is; with no flags line, CPUID alone decides."""
    lib = _library(tmp_path, "avx2 avx512f avx512_fp16")
    old_kernel = _cpuinfo(tmp_path, "sse2 avx2 avx512f")
    monkeypatch.setattr(cf, "cpuid_features", lambda: {"avx2", "avx512f", "avx512_fp16"})
    assert cf.missing_features(lib, old_kernel) == []
    cf.check(lib, old_kernel)
    monkeypatch.setattr(cf, "cpuid_features", lambda: {"avx2"})
    assert cf.missing_features(lib, old_kernel) == ["avx512_fp16"]
    with pytest.raises(ImportError, match=f"avx512_fp16, which this CPU does not report "
                                          f"\\(neither {old_kernel} nor CPUID names it\\)"):
        cf.check(lib, old_kernel)
    assert cf.missing_features(lib, old_kernel, probe=False) == ["avx512_fp16"]
    absent = str(tmp_path / "absent")
    assert cf.missing_features(lib, absent) == ["avx512f", "avx512_fp16"]
    with pytest.raises(ImportError, match="\\(CPUID does not name them\\)"):
        cf.check(lib, absent)
    only_sse2 = _cpuinfo(tmp_path, "sse2", name="c")
    with pytest.raises(ImportError, match=f"\\({only_sse2} does not name them\\)"):
        cf.check(_library(tmp_path, "avx2 avx512f", name="b.so"), only_sse2, probe=False)


def test_cpuid_does_not_override_cores_that_differ(tmp_path, monkeypatch):
    """CPUID answers for the core the import runs on: a name some processors list and others do
    not stays missing (every processor must have it), whatever that core says."""
    lib = _library(tmp_path, "avx2 avx512f")
    mixed = _cpuinfo(tmp_path, "sse2 avx2 avx512f", "sse2 avx2")
    monkeypatch.setattr(cf, "cpuid_features", lambda: {"avx2", "avx512f"})
    assert cf.missing_features(lib, mixed) == ["avx512f"]
    with pytest.raises(ImportError, match="avx512f, which this CPU does not report"):
        cf.check(lib, mixed)


_PROBE = pytest.mark.skipif(cf.cpuid_features() is None,
                            reason="needs the CPUID probe (molrg_ext._cpuid, x86)")


@_PROBE
@pytest.mark.skipif(not SOURCE.exists(), reason="needs the source tree (csrc/)")
@pytest.mark.skipif(cf.cpu_flags() is None, reason="needs /proc/cpuinfo flags")
def test_cpuid_agrees_with_the_kernel_on_every_recordable_name():
    """The probe's bit table against the kernel's own decoding of CPUID, for every name the
    record can hold: those this CPU has and those it lacks (the kernel here is newer than the
    extensions, so both accounts should say the same)."""
    names = _record_names()
    assert len(names) >= 37
    # the probe has a bit for every name the record can hold
    table = set(re.findall(r'\{"([a-z0-9_]+)", [0-5], ',
                           (ROOT / "csrc" / "probe" / "cpuid.cpp").read_text()))
    assert table == names
    cpuid, kernel = cf.cpuid_features(), cf.cpu_flags() & names
    assert cpuid <= names
    assert kernel <= cpuid, f"the kernel lists, CPUID lacks: {sorted(kernel - cpuid)}"
    # the other way only where the kernel knows every name (Linux 6 and later) and hides none
    release = tuple(int(v) for v in re.findall(r"\d+", platform.release())[:2])
    try:
        cmdline = pathlib.Path("/proc/cmdline").read_text()
    except OSError:
        cmdline = ""
    if release < (6, 0) or "clearcpuid" in cmdline:
        pytest.skip(f"kernel {platform.release()} may not name every extension: checked "
                    "only that CPUID has what it lists")
    assert cpuid == kernel, f"CPUID has, the kernel does not list: {sorted(cpuid - kernel)}"


@_PROBE
def test_the_probe_itself_is_built_for_the_baseline():
    """The probe is loaded before the record is checked, so it must not use any extension: no
    record in its file, and (where objdump exists) no VEX/EVEX instruction in its code."""
    from molrg_ext import _cpuid

    assert cf.recorded_features(_cpuid.__file__) is None
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump to disassemble the probe")
    code = subprocess.run([objdump, "-d", "--no-show-raw-insn", _cpuid.__file__],
                          capture_output=True, text=True, check=True).stdout
    mnemonics = set()
    for line in code.splitlines():  # instruction lines: "  addr:\tmnemonic operands"
        fields = line.split("\t")
        if line.startswith(" ") and len(fields) > 1 and fields[1].strip():
            mnemonics.add(fields[1].split()[0])
    assert len(mnemonics) > 20
    vex = sorted(m for m in mnemonics if m.startswith("v") or m.startswith("k"))
    assert vex == [], vex
    assert not re.search(r"%[yz]mm|%k[0-7]", code)


@pytest.mark.skipif(not SOURCE.exists(), reason="needs the source tree (csrc/)")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")
@pytest.mark.parametrize("march, has, lacks", [
    ("x86-64", [], ["avx", "avx2", "avx512f"]),
    ("haswell", ["avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "movbe", "sse4_2",
                 "lahf_lm"], ["avx512f", "3dnowprefetch"]),
    ("bdver4", ["avx2", "fma", "fma4", "xop", "tbm"], ["avx512f"]),
    ("knl", ["avx512f", "avx512er", "avx512pf", "3dnowprefetch"], ["avx512bw"]),
    ("skylake-avx512", ["avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"],
     ["avx512_bf16", "avx512_fp16", "avx512ifma"]),
    ("znver3", ["avx2", "fma", "vaes", "vpclmulqdq"], ["avx512f"]),
    ("icelake-server", ["avx512f", "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_vnni",
                        "avx512_bitalg", "avx512_vpopcntdq", "gfni", "vaes"],
     ["avx512_bf16", "avx512_fp16", "avx_vnni"]),
    ("sapphirerapids", ["avx512f", "avx512_fp16", "avx512_bf16", "avx_vnni"], []),
])
def test_the_record_follows_the_compiler_target(tmp_path, march, has, lacks):
    """csrc/cpu_features.cpp compiled for several targets records their extensions under the
    names Linux's /proc/cpuinfo uses."""
    cxx = _cxx()
    obj = tmp_path / f"{march}.o"
    out = subprocess.run([cxx, "-std=c++20", "-O2", f"-march={march}", "-c", str(SOURCE),
                          "-I", str(SOURCE.parent), "-o", str(obj)], capture_output=True, text=True)
    if out.returncode != 0 and "march" in out.stderr:
        pytest.skip(f"{cxx} does not know -march={march}")
    assert out.returncode == 0, out.stderr
    recorded = cf.recorded_features(str(obj))
    assert recorded is not None
    assert set(has) <= set(recorded) and not set(lacks) & set(recorded)
    if march == "x86-64":
        assert recorded == []
    # only names the record can hold (whose spelling the probe test checks against the kernel)
    assert set(recorded) <= _record_names()


# Macros a target defines beside AVX-512 that are no extension of their own to a CPU: newer
# compilers (GCC 14, clang 18) define the EVEX vector widths for every AVX-512 target, and
# AVX10.1 is the AVX-512 instruction set under a new CPUID leaf (its CPUs list avx512f and the
# rest). Covered by the avx512 names the record holds.
_COVERED_BY_AVX512 = {"EVEX512", "EVEX256", "AVX10_1", "AVX10_1_256", "AVX10_1_512"}
# Extensions GCC reaches only through intrinsics (or that another listed name covers): a build
# may enable them without the record naming them. Anything else a target enables must be in
# csrc/cpu_features.cpp, so that a new compiler's extension fails here instead of slipping by.
_INTRINSICS_ONLY = {
    "ABM",  # LZCNT + POPCNT, recorded under their own macros
    "ADX", "AES", "AMX_BF16", "AMX_INT8", "AMX_TILE", "AVX5124FMAPS", "AVX5124VNNIW",
    "AVX512VP2INTERSECT", "CLDEMOTE", "CLFLUSHOPT", "CLWB", "CLZERO", "CRC32", "ENQCMD",
    "FSGSBASE", "HRESET", "KL", "LWP", "MOVDIR64B", "MOVDIRI", "MWAITX", "PCLMUL", "PCONFIG",
    "PKU", "PREFETCHWT1", "PTWRITE", "RDPID", "RDRND", "RDSEED", "RTM", "SERIALIZE", "SGX",
    "SHA", "SHSTK", "SSE4A", "TSXLDTRK", "UINTR", "WAITPKG", "WBNOINVD", "WIDEKL", "XSAVE",
    "XSAVEC", "XSAVEOPT", "XSAVES",
}


def _isa_macros(cxx, march):
    out = subprocess.run([cxx, f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return set(re.findall(r"^#define __([A-Z0-9_]+)__ 1$", out.stdout, re.M))


@pytest.mark.skipif(not SOURCE.exists(), reason="needs the source tree (csrc/)")
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")
def test_every_extension_a_target_enables_is_recorded_or_intrinsics_only():
    cxx = _cxx()
    mapped = set(re.findall(r"#ifdef __([A-Z0-9_]+)__", SOURCE.read_text()))
    base = _isa_macros(cxx, "x86-64")
    assert base is not None and "SSE2" in base
    tried = []
    for march in ("native", "haswell", "skylake-avx512", "icelake-server", "sapphirerapids",
                  "alderlake", "znver3", "bdver4", "knm"):
        macros = _isa_macros(cxx, march)
        if macros is None:
            continue  # the compiler does not know this target
        tried.append(march)
        extra = macros - base - mapped - _INTRINSICS_ONLY
        if "AVX512F" in macros:
            extra -= _COVERED_BY_AVX512
        assert extra == set(), march
    assert "native" in tried and len(tried) >= 5


@pytest.mark.skipif(cf.cpu_flags() is None, reason="needs /proc/cpuinfo flags (Linux, x86)")
def test_import_refuses_a_build_for_another_cpu(package_copy):
    """The real compiled module with its record patched to an extension no CPU has: the import
    stops with the ImportError before loading it; with MOLRG_CPU_CHECK=0 the very same file loads
    (so the check, not a broken file, refused it)."""
    names = cf.recorded_features(molrg_ext._C.__file__)
    assert names is not None
    if not names:
        pytest.skip("this build records no extensions (MOLRG_NATIVE=OFF)")
    data = pathlib.Path(molrg_ext._C.__file__).read_bytes()
    name = names[0].encode()
    first = data.index(name, data.index(cf.MARKER))
    fake = b"z" * len(name)  # same length: the library stays a valid ELF file
    import_ = package_copy(data[:first] + fake + data[first + len(name):])

    out = import_(MOLRG_CPU_CHECK="1")
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "built for another CPU" in out.stderr
    assert "uses " + fake.decode() + ", which this CPU does not report" in out.stderr
    if cf.cpuid_features() is not None:  # both accounts asked
        assert "/proc/cpuinfo nor CPUID names it" in out.stderr
    assert "Segmentation" not in out.stderr and "did not load" not in out.stderr

    out = import_(MOLRG_CPU_CHECK="0")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "imported"
