#!/usr/bin/env bash
# The main job (until the training CLI lands): installs the build tools, builds bnorm from
# scratch and runs examples/train_eval_demo, a layer in training and eval on real numbers.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/install_deps.sh build
rm -rf build/example
cmake -S . -B build/example -DCMAKE_BUILD_TYPE=Release -DBNORM_BUILD_TESTS=OFF >/dev/null
cmake --build build/example -j "$(nproc 2>/dev/null || echo 2)" >/dev/null
./build/example/bin/train_eval_demo
