#!/usr/bin/env bash
# Paired timing of the whole train_step op (op_pair.py): the extension of git revision REV, built
# on the CPU only with its op and C++ namespaces renamed to molrg_ref (-Dmolrg=molrg_ref), against
# the build that `import molrg_ext` finds (with PYTHONPATH=. after scripts/build_inplace.sh: the
# working tree; otherwise the installed one), alternating call by call in one process. Usage:
#   benchmarks/paired/op_run.sh REV [rounds] [M] [P] [OP] [SHAPE]   (PYTHON: the interpreter,
#   default python3; SHAPE: n,K,d for train and dae, default 48,2,6)
# OP = train (default), dae (the denoiser's forward and backward ops on M samples per instance) or
# optimal (the optimal denoiser's forward and backward; the last argument is then B,N,n).
# The build of REV (about 1.5 min on 2 cores) is kept in build/op_ref/REV_HASH for later runs.
set -euo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$dir/../.." && pwd)
rev=${1:?usage: op_run.sh REV [rounds] [M] [P] [OP] [SHAPE]}
PY=${PYTHON:-python3}
hash=$(git -C "$root" rev-parse "$rev^{commit}")
# REF_CMAKE_ARGS: extra cmake arguments for the build of REV (its build is kept apart from the plain one)
extra=${REF_CMAKE_ARGS:-}
out="$root/build/op_ref/$hash${extra:+-$(echo "$extra" | md5sum | cut -c1-8)}"
if ! ls "$out"/build/_C*.so >/dev/null 2>&1; then
  rm -rf "$out" && mkdir -p "$out/src"
  git -C "$root" archive "$hash" | tar -x -C "$out/src"
  # torch 2.8 (not 2.11 and later) stringizes TORCH_LIBRARY*'s namespace argument unexpanded
  # (-D did not reach it: the reference build registered "molrg" a second time and aborted)
  find "$out/src/csrc" -name '*.cpp' -exec sed -i -E \
    's/\b(TORCH_LIBRARY(_FRAGMENT|_IMPL)?)\(molrg,/\1(molrg_ref,/g' {} +
  { cmake -S "$out/src" -B "$out/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DMOLRG_CUDA=OFF \
      -DPython_EXECUTABLE="$("$PY" -c 'import sys; print(sys.executable)')" \
      -DCMAKE_CXX_FLAGS="-Dmolrg=molrg_ref" $extra && cmake --build "$out/build"; } >"$out/build.log" 2>&1 ||
    { tail -30 "$out/build.log" >&2; exit 1; }
fi
"$PY" "$dir/op_pair.py" "$(ls "$out"/build/_C*.so | head -1)" "${2:-40}" "${3:-1024}" \
  "${4:-64}" "${5:-train}" ${6:+"$6"}
