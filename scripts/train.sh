#!/usr/bin/env bash
# The main job: installs what bnorm needs (Debian 12, apt-get), builds it from scratch and runs
# `bnorm train`. Without arguments it reproduces Figure 1 of Ioffe & Szegedy (2015) on
# Fashion-MNIST (the paper-mlp preset, 50,000 steps with and without batch norm) plus a short
# learning-rate sweep, and writes runs/paper-mlp/: report.md, report.json, the plots and the
# two checkpoints. With arguments they go to `bnorm train` as they are, e.g.
#   bash scripts/train.sh --preset cnn
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/install_deps.sh build
rm -rf build/release
mkdir -p build
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DBNORM_BUILD_TESTS=OFF >build/release.configure.log 2>&1 \
  || { cat build/release.configure.log; exit 1; }
cmake --build build/release -j "$(nproc 2>/dev/null || echo 2)" >build/release.build.log 2>&1 \
  || { tail -50 build/release.build.log; exit 1; }
if [ $# -eq 0 ]; then
  set -- --preset paper-mlp --lr-sweep 0.1,0.5,2,8,32 --sweep-steps 5000
fi
./build/release/bin/bnorm train "$@"
