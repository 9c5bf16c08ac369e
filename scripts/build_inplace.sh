#!/usr/bin/env bash
# Developer build: compiles molrg_ext._C into build/inplace and copies it next to the Python
# sources, so `PYTHONPATH=. python ...` uses the working tree. Serialised with flock so that
# several shells may call it at once. Usage: scripts/build_inplace.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-${PYTHON:-python3}}
mkdir -p build
exec 9>build/.inplace.lock
flock 9
if [ ! -f build/inplace/build.ninja ]; then
  cmake -S . -B build/inplace -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
    -DMOLRG_CUDA="${MOLRG_CUDA:-AUTO}" >/dev/null
fi
cmake --build build/inplace
# copied beside the target, then renamed over it: a process that has the old module loaded keeps
# its inode (cp over it rewrote the mapped file, and a test run in progress crashed)
for so in build/inplace/_C*.so build/inplace/_cpuid*.so; do
  cp -f "$so" "molrg_ext/.$(basename "$so").tmp"
  mv -f "molrg_ext/.$(basename "$so").tmp" "molrg_ext/$(basename "$so")"
done
# An installed molrg_ext (pip install -e . in particular: scikit-build-core's editable import hook
# runs before PYTHONPATH) would shadow the module just built: say so instead of letting tests and
# benchmarks silently run a stale binary.
loaded=$(PYTHONPATH=. "$PY" -c 'import molrg_ext._C as c; print(c.__file__)' 2>/dev/null || true)
here=$(ls "$PWD"/molrg_ext/_C*.so | head -1)
if [ -n "$loaded" ] && [ "$(readlink -f "$loaded")" != "$(readlink -f "$here")" ]; then
  echo "build_inplace: warning: PYTHONPATH=. imports $loaded, not $here;" \
       "pip uninstall molrg_ext to use the working tree" >&2
fi
