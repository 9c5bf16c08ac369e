#!/usr/bin/env python3
"""Parse `nvcc -Xptxas -v` output into a per-kernel register/spill table (no torch needed).

Usage: ptxas_report.py LOG [LOG ...]; each LOG is the stderr of one nvcc run and its name
`<file>.<arch>.log` labels the rows. Prints the table; exits 1 when any kernel spills (nonzero
"bytes spill stores" or "bytes spill loads"), 0 otherwise. `scripts/check_cuda.sh` calls it;
`python_tests/test_cuda.py` tests `parse_ptxas` on canned output.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")


@dataclass
class KernelInfo:
    name: str  # mangled
    arch: str = ""
    registers: int = -1
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse_ptxas(text: str) -> list[KernelInfo]:
    """Kernels (entry functions) and device functions with their registers and spill bytes."""
    found: dict[str, KernelInfo] = {}
    order: list[str] = []
    current: KernelInfo | None = None  # the function the next "Used"/spill line belongs to
    arch = ""

    def get(name: str) -> KernelInfo:
        if name not in found:
            found[name] = KernelInfo(name, arch)
            order.append(name)
        return found[name]

    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            arch = m.group(2)
            current = get(m.group(1))
            current.arch = arch
            continue
        m = _PROPS.search(line)
        if m:
            current = get(m.group(1))
            continue
        m = _SPILL.search(line)
        if m and current is not None:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m and current is not None:
            current.registers = int(m.group(1))
    return [found[n] for n in order]


def demangle(names: list[str]) -> list[str]:
    """Readable kernel names via c++filt when it exists (template args kept, params dropped)."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines() if out.returncode == 0 else []
    if len(lines) != len(names):
        return names
    nice = []
    for s in lines:
        s = re.sub(r"\(anonymous namespace\)::", "", s)
        s = re.sub(r"^void ", "", s)
        depth, cut = 0, len(s)
        for i, ch in enumerate(s):  # drop the parameter list (first top-level '(')
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif ch == "(" and depth == 0:
                cut = i
                break
        nice.append(s[:cut])
    return nice


def main(argv: list[str]) -> int:
    rows = []
    for path in argv:
        label = os.path.basename(path)
        label = label[:-4] if label.endswith(".log") else label
        with open(path, encoding="utf-8", errors="replace") as f:
            infos = parse_ptxas(f.read())
        if not infos:
            print(f"check_cuda: no ptxas information in {path}", file=sys.stderr)
            return 1
        for info, nice in zip(infos, demangle([i.name for i in infos])):
            rows.append((label, info, nice))
    width = max([len(r[2]) for r in rows] + [6])
    print(f"{'file.arch':<28} {'kernel':<{width}} {'regs':>5} {'stack':>6} {'spill_st':>9} {'spill_ld':>9}")
    bad = []
    for label, info, nice in rows:
        regs = str(info.registers) if info.registers >= 0 else "-"  # device function
        print(f"{label:<28} {nice:<{width}} {regs:>5} {info.stack:>6} "
              f"{info.spill_stores:>9} {info.spill_loads:>9}")
        if info.spills:
            bad.append(f"{label}: {nice}")
    if bad:
        print("check_cuda: FAILED, register spills in:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    print(f"check_cuda: OK, {len(rows)} kernels, no spills")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
