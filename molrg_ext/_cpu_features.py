"""The CPU check run before the compiled module loads.

The default build compiles the kernels for the building machine (``-march=native``,
``MOLRG_NATIVE=ON``). Loaded on a CPU without those instructions (a wheel built on an AVX-512
server installed on an AVX2 laptop), the library would stop the interpreter with an illegal
instruction (SIGILL), possibly in its own static initialisers, before Python could say why. So
the build stores the extensions it uses as a plain string in the shared library
(``csrc/cpu_features.cpp``: ``MOLRG_CPU_FEATURES[avx2 fma ...]``, Linux's ``/proc/cpuinfo``
names), and the import reads that string from the file before loading it and compares it with
two accounts of what this CPU runs: the kernel's flags in ``/proc/cpuinfo`` (every processor
must list an extension) and the processor's own CPUID (with XGETBV for the registers the OS
saves), asked by ``molrg_ext._cpuid``, a separate module compiled for the baseline. CPUID
settles the names no processor's flags line holds, so a kernel older than an extension's name
(``avx512_fp16`` before Linux 5.11) does not refuse a build of the same machine; an extension
this CPU lacks by those accounts refuses the build, with an ImportError naming it.
``MOLRG_CPU_CHECK=0`` (or ``false``, ``off``, ``no``) skips the check.

Limits: a hypervisor may hide from both accounts extensions the CPU runs (a refusal the skip
answers). Without either (not x86 and no flags line) nothing is checked.
"""
from __future__ import annotations

import mmap
import os
from typing import List, Optional, Set, Tuple

MARKER = b"MOLRG_CPU_FEATURES["
CPUINFO = "/proc/cpuinfo"


def recorded_features(path: str) -> Optional[List[str]]:
    """The extensions the shared library at ``path`` was compiled to use (None when it holds no
    record: a build older than the record)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            start = data.find(MARKER)
            if start < 0:
                return None
            start += len(MARKER)
            end = data.find(b"]", start, start + 4096)
            if end < 0:
                return None
            return data[start:end].decode("ascii", "replace").split()


def _read_flags(cpuinfo: str) -> Optional[Tuple[Set[str], Set[str]]]:
    """(flags every logical CPU lists, flags any lists) from Linux's ``flags`` lines in
    ``cpuinfo``; None where there is no such file or line (other systems, other
    architectures)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    every = any_ = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            these = set(value.split())
            every = these if every is None else every & these
            any_ = these if any_ is None else any_ | these
    return None if every is None else (every, any_)


def cpu_flags(cpuinfo: str = CPUINFO) -> Optional[Set[str]]:
    """The instruction-set flags every logical CPU reports in ``cpuinfo`` (intersected over the
    processors), or None where there are none to read."""
    flags = _read_flags(cpuinfo)
    return None if flags is None else flags[0]


def cpuid_features() -> Optional[Set[str]]:
    """The recordable extensions the processor reports itself (CPUID) and the operating system
    has enabled (XGETBV), from ``molrg_ext._cpuid``: a module of its own compiled for the
    baseline, never ``-march=native``, so it is safe to load anywhere. None where the probe is
    absent (a build older than it) or the CPU is not x86."""
    try:
        from . import _cpuid
    except ImportError:
        return None
    names = _cpuid.features()
    return None if names is None else set(names.split())


def _missing(path: str, cpuinfo: str, probe: bool) -> Tuple[List[str], List[str]]:
    """(the extensions the library needs that this CPU has by no account, the accounts asked)."""
    needed = recorded_features(path)
    if not needed:
        return [], []
    flags = _read_flags(cpuinfo)
    cpuid = cpuid_features() if probe else None
    if flags is None and cpuid is None:
        return [], []
    if flags is None:
        have, asked = cpuid, ["CPUID"]
    elif cpuid is None:
        have, asked = flags[0], [cpuinfo]
    else:
        # CPUID answers for one core only: it settles the names no processor's flags line holds
        # (a kernel older than the extension), while a name some processors list and others do
        # not (cores with different extensions) must be listed by every one
        have, asked = flags[0] | (cpuid - flags[1]), [cpuinfo, "CPUID"]
    return [f for f in needed if f not in have], asked


def missing_features(path: str, cpuinfo: str = CPUINFO, probe: bool = True) -> List[str]:
    """The extensions the library at ``path`` needs that this CPU lacks by the accounts it has:
    the kernel's flags in ``cpuinfo`` (every processor must list one), and, when ``probe``,
    CPUID for names no processor's flags line holds (a kernel older than the extension does not
    list it). Empty when it has them all, or when nothing can be read."""
    return _missing(path, cpuinfo, probe)[0]


def check(path: str, cpuinfo: str = CPUINFO, probe: bool = True) -> None:
    """Raise ImportError when the library at ``path`` needs instructions this CPU lacks."""
    if os.environ.get("MOLRG_CPU_CHECK", "1").strip().lower() in ("0", "false", "off", "no"):
        return
    try:
        missing, asked = _missing(path, cpuinfo, probe)
    except OSError:  # unreadable: the loader will report it
        return
    if missing:
        which = "it" if len(missing) == 1 else "them"
        said = (f"neither {asked[0]} nor {asked[1]} names {which}" if len(asked) == 2
                else f"{asked[0]} does not name {which}")
        raise ImportError(
            f"molrg_ext's compiled module {path} was built for another CPU: it uses "
            f"{' '.join(missing)}, which this CPU does not report ({said}), and loading it would "
            "stop Python with an illegal instruction. The default build compiles for the "
            "building machine (MOLRG_NATIVE=ON, -march=native). Build it on this machine, or "
            "build a portable one: MOLRG_NATIVE=OFF pip install --no-build-isolation "
            "--force-reinstall --no-deps . (from the source tree). MOLRG_CPU_CHECK=0 skips this "
            "check."
        )
