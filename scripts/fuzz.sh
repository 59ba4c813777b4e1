#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/: the safetensors reader, the IDX reader, the C API)
# with clang under ASan + UBSan and runs them.
#   scripts/fuzz.sh [--time SECONDS] [--ci] [TARGET ...]
#     --time S   run each target S seconds (default 3600: the long run)
#     --ci       the test suite's run (scripts/test.sh): 40 s per target on a fresh corpus
#     TARGET     fuzz_safetensors, fuzz_idx, fuzz_c_api (default: all three)
# Build in build/fuzz (BNORM_FUZZ_BUILD overrides). Seeds are made at each run from real files
# (tests/fuzz/make_seeds.py: checkpoints of the presets, Fashion-MNIST if installed); the corpus
# persists in build/fuzz/corpus/TARGET across long runs. Anything found is written to
# build/fuzz/artifacts/TARGET/, minimized (minimized-*) and reported; the exit status is then 1.
# Each target's last libFuzzer status line (executions, cov, ft) is printed at the end.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
seconds=3600
ci=0
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --time) seconds=$2; shift 2 ;;
    --ci) ci=1; seconds=40; shift ;;
    fuzz_safetensors|fuzz_idx|fuzz_c_api) targets+=("$1"); shift ;;
    *) echo "fuzz.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(fuzz_safetensors fuzz_idx fuzz_c_api)
command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ not found (install_deps.sh test installs clang)" >&2; exit 1; }

build=${BNORM_FUZZ_BUILD:-build/fuzz}
jobs=$(nproc 2>/dev/null || echo 2)
echo "== fuzz: configure and build ($build)"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_C_COMPILER=clang -DBNORM_FUZZ=ON -DBNORM_BUILD_TESTS=OFF -DBNORM_BUILD_EXAMPLES=OFF \
  -DBNORM_MPI=OFF >"$build.configure.log" 2>&1 || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "$jobs" --target "${targets[@]}" write_seed_checkpoint \
  >"$build.build.log" 2>&1 || { tail -50 "$build.build.log"; exit 1; }

work="$build/run"
rm -rf "$work"
mkdir -p "$work/checkpoints"
ASAN_OPTIONS=detect_leaks=0 "$build/bin/write_seed_checkpoint" "$work/checkpoints"
python3 tests/fuzz/make_seeds.py "$work/seeds" --checkpoint "$work/checkpoints/paper-mlp.safetensors" \
  --checkpoint "$work/checkpoints/cnn.safetensors"
# The readers take paths: inputs go through a file, in memory when /dev/shm is there.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then export TMPDIR=/dev/shm; fi

failed=0
summary=()
for t in "${targets[@]}"; do
  corpus="$build/corpus/$t"
  [ "$ci" = 1 ] && corpus="$work/corpus/$t"
  artifacts="$build/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  dict=()
  [ "$t" = fuzz_safetensors ] && dict=(-dict=tests/fuzz/safetensors.dict)
  echo "== fuzz: $t for ${seconds} s"
  set +e
  "$build/bin/$t" "$corpus" "$work/seeds/$t" "${dict[@]}" -max_total_time="$seconds" \
    -max_len=8192 -timeout=25 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$artifacts/" >"$work/$t.log" 2>&1
  rc=$?
  set -e
  last=$(grep -E '^#[0-9]+' "$work/$t.log" | tail -1 || true)
  execs=$(grep -E 'stat::number_of_executed_units' "$work/$t.log" | awk '{print $2}' || true)
  summary+=("$t: ${execs:-?} executions; last: ${last:-none}")
  if [ "$rc" -ne 0 ]; then
    failed=1
    echo "fuzz.sh: $t found a problem (exit $rc):" >&2
    grep -E 'ERROR|SUMMARY|runtime error|fuzz_|Test unit written' "$work/$t.log" | head -20 >&2
    for crash in "$artifacts"/crash-* "$artifacts"/timeout-* "$artifacts"/oom-* "$artifacts"/leak-*; do
      [ -f "$crash" ] || continue
      case "$crash" in */minimized-*) continue ;; esac
      echo "fuzz.sh: minimizing $crash" >&2
      "$build/bin/$t" "$crash" -minimize_crash=1 -max_total_time=120 \
        -exact_artifact_path="$artifacts/minimized-$(basename "$crash")" >>"$work/$t.minimize.log" 2>&1 || true
    done
    echo "fuzz.sh: artifacts in $artifacts (reproduce: $build/bin/$t FILE); log $work/$t.log" >&2
  elif [ "$ci" = 0 ]; then
    # Keep the long-run corpus small: only inputs that add coverage.
    mkdir -p "$corpus.merged"
    "$build/bin/$t" -merge=1 "$corpus.merged" "$corpus" >"$work/$t.merge.log" 2>&1 &&
      rm -rf "$corpus" && mv "$corpus.merged" "$corpus"
  fi
done
printf '%s\n' "${summary[@]}"
[ "$failed" = 0 ] && echo "fuzz.sh: no problem found" || exit 1
