#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu standalone (no torch) for sm_90 and sm_80 with `-Xptxas -v`,
# prints a per-kernel register/spill table and fails on a compile error or any register spill.
# Usage: scripts/check_cuda.sh   (env: NVCC=path to nvcc, CUDA_ARCHS="90 80", CUDA_STD=c++17,
# JOBS=parallel compiles, default 2)
set -uo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
ARCHS=${CUDA_ARCHS:-"90 80"}
STD=${CUDA_STD:-c++17}
JOBS=${JOBS:-2}
PY=${PYTHON:-python3}
if [ ! -x "$NVCC" ]; then
  echo "check_cuda: nvcc not found at $NVCC (set NVCC=...)" >&2
  exit 2
fi
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then
  echo "check_cuda: no csrc/cuda/*.cu files" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

compile() {  # file arch -> writes $tmp/<base>.sm_<arch>.log and .rc
  local f=$1 a=$2 base
  base=$(basename "$f" .cu)
  "$NVCC" -std="$STD" -arch=sm_"$a" -O3 -Xptxas -v -Icsrc -c "$f" \
    -o "$tmp/$base.sm_$a.o" >"$tmp/$base.sm_$a.log" 2>&1
  echo $? >"$tmp/$base.sm_$a.rc"
}

running=0
for f in "${files[@]}"; do
  for a in $ARCHS; do
    compile "$f" "$a" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
      wait -n
      running=$((running - 1))
    fi
  done
done
wait

failed=0
for rc in "$tmp"/*.rc; do
  if [ "$(cat "$rc")" != "0" ]; then
    log=${rc%.rc}.log
    echo "check_cuda: compile FAILED: $(basename "${rc%.rc}")" >&2
    grep -E "error|warning" "$log" >&2 || tail -20 "$log" >&2
    failed=1
  fi
done
[ "$failed" -eq 0 ] || exit 1
"$PY" scripts/ptxas_report.py "$tmp"/*.log
