"""The CPU check run before the compiled module loads.

The default build compiles the kernels for the building machine (``-march=native``,
``MOLRG_NATIVE=ON``). Loaded on a CPU without those instructions (a wheel built on an AVX-512
server installed on an AVX2 laptop), the library would stop the interpreter with an illegal
instruction (SIGILL), possibly in its own static initialisers, before Python could say why. So
the build stores the extensions it uses as a plain string in the shared library
(``csrc/cpu_features.cpp``: ``MOLRG_CPU_FEATURES[avx2 fma ...]``, Linux's ``/proc/cpuinfo``
names), and the import reads that string from the file and compares it with the CPU's flags
before loading the file. ``MOLRG_CPU_CHECK=0`` (or ``false``, ``off``, ``no``) skips the check.

Limits: the flags are what the kernel reports. A kernel older than an extension's name (e.g.
``avx512_fp16`` before Linux 5.11) does not list it, and the check then refuses a build of this
very machine (the message says so, and how to skip it); a hypervisor may hide flags the CPU
runs. Where there is no flags line (other systems; x86 emulated on ARM, whose cpuinfo is
ARM's) nothing is checked.
"""
from __future__ import annotations

import mmap
import os
from typing import List, Optional, Set

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


def cpu_flags(cpuinfo: str = CPUINFO) -> Optional[Set[str]]:
    """The instruction-set flags every logical CPU reports in ``cpuinfo`` (Linux's ``flags``
    lines, intersected over the processors), or None where there is no such file or line (other
    systems, other architectures)."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    flags = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            these = set(value.split())
            flags = these if flags is None else flags & these
    return flags


def missing_features(path: str, cpuinfo: str = CPUINFO) -> List[str]:
    """The extensions the library at ``path`` needs and this CPU does not report (empty when it
    has them all, or when either side cannot be read)."""
    needed = recorded_features(path)
    have = cpu_flags(cpuinfo)
    if not needed or have is None:
        return []
    return [f for f in needed if f not in have]


def check(path: str, cpuinfo: str = CPUINFO) -> None:
    """Raise ImportError when the library at ``path`` needs instructions this CPU lacks."""
    if os.environ.get("MOLRG_CPU_CHECK", "1").strip().lower() in ("0", "false", "off", "no"):
        return
    try:
        missing = missing_features(path, cpuinfo)
    except OSError:  # unreadable: the loader will report it
        return
    if missing:
        raise ImportError(
            f"molrg_ext's compiled module {path} was built for another CPU: it uses "
            f"{' '.join(missing)}, which this CPU does not report ({cpuinfo}), and loading it "
            "would stop Python with an illegal instruction. The default build compiles for the "
            "building machine (MOLRG_NATIVE=ON, -march=native). Build it on this machine, or "
            "build a portable one: MOLRG_NATIVE=OFF pip install --no-build-isolation "
            "--force-reinstall --no-deps . (from the source tree). If this machine built it "
            "(a kernel too old to name a newer extension does not list it), MOLRG_CPU_CHECK=0 "
            "skips this check."
        )
