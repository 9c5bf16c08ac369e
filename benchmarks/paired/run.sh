#!/usr/bin/env bash
# Paired A/B timing of the CPU training step: A = csrc/ of git revision REV, B = the working
# tree's csrc/, linked into one binary that alternates them (main.cpp). Usage:
#   benchmarks/paired/run.sh REV [soft|hard] [rounds] [N]      (OMP_NUM_THREADS sets threads)
# train_block's signature gained the next block's slot count at 79a0694: A_NEXT_S / B_NEXT_S = 1
# (the default for B, and for A when REV contains 79a0694) pass it. A_FLAGS / B_FLAGS: extra
# compiler flags for one side (B_FLAGS=-mno-avx512f: the AVX2 kernels against the AVX-512 ones).
# A tree whose train_block takes a NextBlock (MOLRG_TRAIN_NEXT_BLOCK) runs with the op's claim of
# the next instance ahead (variant.cpp). PAIR_LEVELS=bench: the level table of molrg_ext.bench
# (the benchmark's) instead of EDM-like sigmas; PAIR_THP=1: the training set on transparent huge
# pages (2 MiB aligned, madvised).
set -euo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$dir/../.." && pwd)
rev=${1:?usage: run.sh REV [soft|hard] [rounds] [N]}
mode=${2:-hard}; rounds=${3:-20}; N=${4:-4096}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git -C "$root" archive "$rev" csrc | tar -x -C "$tmp"
a_next=${A_NEXT_S:-$(git -C "$root" merge-base --is-ancestor 79a0694 "$rev" && echo 1 || echo 0)}
b_next=${B_NEXT_S:-1}
# --param=avoid-fma-max-bits=0: as in CMakeLists.txt (FMA chains kept under GCC's AMD tunings)
flags=(-O3 -march=native -fopenmp -std=c++20 -DNDEBUG -fno-math-errno -fno-trapping-math -Wno-psabi
       --param=avoid-fma-max-bits=0)
build() {  # build SRC_ROOT NAMESPACE SYMBOL NEXT_S OUT EXTRA_FLAGS
  g++ "${flags[@]}" $6 -I"$1/csrc" -Dmolrg="$2" -DVFUNC="$3" \
    $([ "$4" = 1 ] && echo -DNEXT_S || true) -c "$dir/variant.cpp" -o "$5"
}
build "$tmp" molrgA run_A "$a_next" "$tmp/a.o" "${A_FLAGS:-}"
build "$root" molrgB run_B "$b_next" "$tmp/b.o" "${B_FLAGS:-}"
g++ "${flags[@]}" "$dir/main.cpp" "$tmp/a.o" "$tmp/b.o" -o "$tmp/pair"
"$tmp/pair" "$mode" "$rounds" "$N"
