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
cp -f build/inplace/_C*.so molrg_ext/
