#!/usr/bin/env bash
# The PyTorch training-step benchmark, in one run: torchvision's ResNet-18 (batch 16, 112x112,
# NCHW and channels_last) and the paper MLP, each with torch's batch norm, after
# bnorm.torch.convert and with batch norm replaced by identity, on 1 and 2 threads, every
# converted model validated against torch's before it is timed (bench/torch_step_bench.py).
# Builds libbnorm Release in build/torch-bench/lib-build (incremental), runs with /usr/bin/python3
# and writes build/torch-bench/results.{md,json}. 5-10 minutes on 2 quiet cores (11 on a busy one).
#
#   bash scripts/torch_bench.sh [--quick] [--threads 1,2] [any bench/torch_step_bench.py option]
#
# Exit status: 0, or 1 when a row failed validation or bnorm.torch did not import (the table
# still prints, with those rows marked).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh bench

build=build/torch-bench/lib-build
mkdir -p build/torch-bench
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DBNORM_BUILD_TESTS=OFF \
  -DBNORM_BUILD_EXAMPLES=OFF -DBNORM_BUILD_NN=OFF -DBNORM_MPI=OFF \
  >build/torch-bench/configure.log 2>&1 ||
  { cat build/torch-bench/configure.log >&2; exit 1; }
cmake --build "$build" --target bnorm -j "$(nproc)" >build/torch-bench/build.log 2>&1 ||
  { cat build/torch-bench/build.log >&2; exit 1; }

python=/usr/bin/python3
[ -x "$python" ] || python=$(command -v python3)
export BNORM_LIBRARY=$PWD/$build/lib/libbnorm.so
export PYTHONPATH=$PWD/python${PYTHONPATH:+:$PYTHONPATH}
command_line="bash scripts/torch_bench.sh${*:+ $*}"
cxx=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$build/CMakeCache.txt")
compiler=$("$cxx" --version 2>/dev/null | head -1 || echo "$cxx")
exec "$python" bench/torch_step_bench.py --out-dir build/torch-bench --command "$command_line" \
  --bnorm-build "Release, $compiler" "$@"
