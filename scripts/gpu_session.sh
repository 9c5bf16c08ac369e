#!/usr/bin/env bash
# The prepared run for a lent GPU machine (the device tool runs a command in a copy of the working
# tree and brings $OUT back; build outputs are not copied, so the extension is built there).
# Stages, each under its own time limit so that a slow one still leaves the others' output:
#   1. environment (nvidia-smi, torch, nvcc, cmake)           -> $OUT/env.txt
#   2. build with CUDA for the local GPU's architecture       -> $OUT/build.log
#   3. the tests marked cuda (CUDA against CPU, opcheck)      -> $OUT/test_cuda.log, .xml
#   4. the CUDA benchmarks (ours, eager, compile, CuPy peers) -> $OUT/bench_cuda.log, .json
# Usage: OUT=dir bash scripts/gpu_session.sh [python]    (default python3; STAGES="1 2 3 4";
# BUILD_S, TEST_S, BENCH_S: the stage limits in seconds, default 240, 180 and what is left of
# 570 s (150 s at least): under the device tool's 600 s per command)
# Without a GPU it still configures and builds (architecture 90) and checks the registration,
# leaves molrg_ext/ as it is, and the tests skip: the way to try it here, with a CUDA build of
# torch (docs/cuda.md).
set -uo pipefail
PY=${1:-python3}
# an absolute path to the interpreter: the script changes directory below
if [[ "$PY" == */* ]]; then PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
else PY=$(command -v "$PY" || echo "$PY"); fi
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$root/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$root"
stages=${STAGES:-1 2 3 4}
has() { [[ " $stages " == *" $1 "* ]]; }
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/stages.txt"; }
failed=0   # the exit status: 1 when any stage failed (the device tool reports it as rc)
built=1    # stages 3 and 4 need the CUDA build of stage 2 when it runs

if has 1; then
  { nvidia-smi || true
    "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'available', torch.cuda.is_available()); \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no device')"
    command -v nvcc && nvcc --version | tail -2
    cmake --version | head -1
    "$PY" -c "import cupy; print('cupy', cupy.__version__)" || true
  } > "$OUT/env.txt" 2>&1
  stamp "env done"
fi

if has 2; then
  arch=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" \
         2>/dev/null || echo 90)
  # pip wheels of torch keep cuBLAS/NVRTC headers and libraries in site-packages/nvidia/cu13
  # rather than the toolkit folder: point CMake at them when they are there (docs/cuda.md)
  sp=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  extra=()
  for d in "$sp"/nvidia/cu13 "$sp"/nvidia/cu12; do
    [ -d "$d/include" ] && extra+=("-DCMAKE_CXX_FLAGS=-isystem $d/include") && break
  done
  nvrtc=$(ls "$sp"/nvidia/cu13/lib/libnvrtc.so* "$sp"/nvidia/cuda_nvrtc/lib/libnvrtc.so* \
          2>/dev/null | head -1)
  [ -n "$nvrtc" ] && extra+=("-DCUDA_nvrtc_LIBRARY=$nvrtc")
  nvcc_bin=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  # torch's CMake config finds the toolkit from nvcc's folder: a wrapper script on PATH (this
  # machine's /usr/local/bin/nvcc) led it to /usr/local, and it stopped with "cannot find the
  # CUDA libraries". Ask nvcc where its toolkit is (its TOP), and use that toolkit's own nvcc.
  probe=$(mktemp -d)
  echo 'int main() {}' > "$probe/e.cu"
  top=$("$nvcc_bin" --dryrun -c "$probe/e.cu" -o "$probe/e.o" 2>&1 | sed -n 's/^#\$ TOP=//p' \
        | head -1)
  rm -rf "$probe"
  cuda_root=$(readlink -f "${top:-$(dirname "$(readlink -f "$nvcc_bin")")/..}")
  [ -x "$cuda_root/bin/nvcc" ] && nvcc_bin=$cuda_root/bin/nvcc
  echo "nvcc: $nvcc_bin (toolkit $cuda_root)" >> "$OUT/env.txt"
  extra+=("-DCUDA_TOOLKIT_ROOT_DIR=$cuda_root")
  # the interpreter's own CMake/Ninja first (a venv's pip cmake 4.x): the system CMake 3.25
  # does not know nvcc 13's C++20 dialect, and torch's CMake config then fails to find CUDA
  [ -x "$(dirname "$PY")/cmake" ] && export PATH="$(dirname "$PY"):$PATH"
  export TORCH_CUDA_ARCH_LIST="${arch:0:${#arch}-1}.${arch: -1}"
  rm -rf build/gpu
  timeout "${BUILD_S:-240}" bash -c '
    cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$1" \
      -DMOLRG_CUDA=ON -DMOLRG_NATIVE=OFF -DCMAKE_CUDA_COMPILER="$2" \
      -DCMAKE_CUDA_ARCHITECTURES="$3" "${@:4}" &&
    cmake --build build/gpu -j "$(nproc)"' _ "$(command -v "$PY")" "$nvcc_bin" "$arch" \
    "${extra[@]}" > "$OUT/build.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || { failed=1; built=0; }
  if [ $rc -eq 0 ]; then
    # the built library alone (no molrg_ext import): are all eight ops registered for CUDA?
    "$PY" -c "
import glob, sys, torch
torch.ops.load_library(glob.glob('build/gpu/_C*.so')[0])
ops = ['subspace_dae', 'subspace_dae_backward', 'hard_assign', 'train_step',
       'dae_jacobian_spectrum', 'sym_eig', 'optimal_denoiser', 'optimal_denoiser_backward']
has = torch._C._dispatch_has_kernel_for_dispatch_key
ok = [has('molrg::' + op, 'CUDA') for op in ops]
for op, k in zip(ops, ok):
    print(op, k)
# the float32 autocast kernels (csrc/autocast.cpp) of the ops that take activations
cast = [has('molrg::' + op, 'AutocastCUDA')
        for op in ('subspace_dae', 'hard_assign', 'dae_jacobian_spectrum', 'optimal_denoiser')]
print('AutocastCUDA', cast)
sys.exit(0 if all(ok) and all(cast) else 1)
" >> "$OUT/build.log" 2>&1 || { failed=1; built=0;
      rc="$rc, not every op has its CUDA and autocast kernels"; }
    # installed next to the Python sources for the tests only where there is a GPU (a dry run
    # here keeps the working tree's CPU build); renamed over the old module, as build_inplace.sh
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
      for so in build/gpu/_C*.so build/gpu/_cpuid*.so; do
        cp -f "$so" "molrg_ext/.$(basename "$so").tmp"
        mv -f "molrg_ext/.$(basename "$so").tmp" "molrg_ext/$(basename "$so")"
      done
    fi
  fi
  stamp "build rc=$rc (arch $arch)"
fi

if has 3 || has 4; then
  # without a working CUDA build the CUDA tests would skip and pass: not a result
  if [ $built -eq 0 ]; then stamp "stages 3-4 not run: the build failed"; exit 1; fi
fi

if has 3; then
  # every CUDA case (test_cuda.py, and the cuda parameters of test_float_range, test_bench,
  # test_array_peers): the cuda marker selects them
  PYTHONPATH=. timeout "${TEST_S:-180}" "$PY" -m pytest -q -rs -m cuda python_tests \
    -p no:cacheprovider --junitxml="$OUT/test_cuda.xml" > "$OUT/test_cuda.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || failed=1
  stamp "test_cuda rc=$rc ($(tail -1 "$OUT/test_cuda.log"))"
fi

if has 4; then
  # the time left of 570 s (cold torch.compile builds make this stage the longest), 150 s at least
  left=$(( 570 - ($(date +%s) - t0) ))
  bench_s=${BENCH_S:-$(( left > 150 ? left : 150 ))}
  PYTHONPATH=. timeout "$bench_s" "$PY" -m pytest -q benchmarks/bench_cuda.py \
    benchmarks/bench_optimal_denoiser_cuda.py -p no:cacheprovider --benchmark-only \
    --benchmark-columns=min,median,rounds --benchmark-json="$OUT/bench_cuda.json" \
    > "$OUT/bench_cuda.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || failed=1
  stamp "bench_cuda rc=$rc ($(tail -1 "$OUT/bench_cuda.log"))"
fi
exit $failed
