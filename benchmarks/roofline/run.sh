#!/usr/bin/env bash
# Builds and runs the roofline probe (roofline.cpp) with g++: fp32 FMA peak and memory bandwidth
# of this machine for the given thread count (default: all). Usage: run.sh [threads]
set -euo pipefail
dir=$(cd "$(dirname "$0")" && pwd)
exe=$(mktemp -d)/roofline
g++ -O3 -march=native -ffp-contract=fast -fopenmp -std=c++17 "$dir/roofline.cpp" -o "$exe"
"$exe" "$@"
