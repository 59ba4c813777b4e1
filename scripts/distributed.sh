#!/usr/bin/env bash
# Data-parallel training with synchronized batch norm against one process: the cnn preset with
# the same global batch (128) and seed on 1 process and under mpirun on 2 and 3 ranks with
# --sync-bn, then tools/compare_runs.py: runs/distributed/comparison.md (+ .json, loss_curves.png)
# shows the K-rank curves beside the 1-process one and checks the stated tolerance.
#   bash scripts/distributed.sh [--steps N]   (default 469 steps: one epoch; ~6 minutes)
# Installs what it needs (apt-get), builds build/release from scratch like scripts/train.sh.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
steps=469
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    *) echo "distributed.sh: unknown option $1 (expected --steps N)" >&2; exit 2 ;;
  esac
done
bash scripts/install_deps.sh build
rm -rf build/release
mkdir -p build
cmake -S . -B build/release -DCMAKE_BUILD_TYPE=Release -DBNORM_BUILD_TESTS=OFF >build/release.configure.log 2>&1 \
  || { cat build/release.configure.log; exit 1; }
cmake --build build/release -j "$(nproc 2>/dev/null || echo 2)" >build/release.build.log 2>&1 \
  || { tail -50 build/release.build.log; exit 1; }

flags=(--oversubscribe)
[ "$(id -u)" -eq 0 ] && flags+=(--allow-run-as-root)
out=runs/distributed
mkdir -p "$out"
common=(train --preset cnn --only bn --steps "$steps" --eval-every $(( (steps + 3) / 4 )) --no-plots --threads 1)
echo "== 1 process"
BNORM_NUM_THREADS=1 ./build/release/bin/bnorm "${common[@]}" --out "$out/np1"
for k in 2 3; do
  echo "== $k ranks, --sync-bn"
  mpirun "${flags[@]}" -np "$k" ./build/release/bin/bnorm "${common[@]}" --sync-bn --out "$out/np$k"
done
py=/usr/bin/python3
[ -x "$py" ] || py=python3
"$py" tools/compare_runs.py "$out" "$out/np1" "$out/np2" "$out/np3"
echo "comparison: $out/comparison.md"
