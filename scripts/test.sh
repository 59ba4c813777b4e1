#!/usr/bin/env bash
# Installs what the tests need, builds from scratch and runs every test:
#   1. Release build: every test (GoogleTest unit and kernel tests, nn, io, the CLI end to end,
#      the PyTorch conformance suite and checkpoint round trip with python3-torch).
#   2. ASan + UBSan build: every test that does not load the library into Python.
#   3. ThreadSanitizer build: the fast kernels and the one thread pool (ctest label cpu), the
#      layers on that pool (nn), the readers (io) and the in-process communicator's simulated
#      ranks (comm).
#   4. libFuzzer build (clang, ASan + UBSan): each fuzz target of tests/fuzz/ for 40 s.
# The MPI tests (label mpi, under mpirun) run in suites 1 and 2.
# Exits non-zero if anything fails. With BNORM_REQUIRE_ALL_TESTS=1 (set by .ci/run) a test that
# reports itself skipped (e.g. "skipped: python3-torch not installed") is a failure too.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
bash scripts/install_deps.sh test

jobs=$(nproc 2>/dev/null || echo 2)
run_suite() {  # name, cmake args...
  local name=$1; shift
  local dir="build/test-$name"
  rm -rf "$dir"
  echo "== $name: configure and build"
  cmake -S . -B "$dir" -DBNORM_BUILD_TESTS=ON "$@" >"$dir.configure.log" 2>&1 || { cat "$dir.configure.log"; return 1; }
  cmake --build "$dir" -j "$jobs" >"$dir.build.log" 2>&1 || { tail -50 "$dir.build.log"; return 1; }
  echo "== $name: test"
  ctest --test-dir "$dir" --output-on-failure -j "$jobs" ${CTEST_ARGS:-} 2>&1 | tee "$dir.ctest.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || return "$rc"
  if [ "${BNORM_REQUIRE_ALL_TESTS:-0}" = 1 ] && grep -q "Not Run\|Skipped" "$dir.ctest.log"; then
    echo "test.sh: a test was skipped, and BNORM_REQUIRE_ALL_TESTS=1 requires every test to run" >&2
    return 1
  fi
}

mkdir -p build
run_suite release -DCMAKE_BUILD_TYPE=Release
# The conformance suite's summary: the largest error against PyTorch per output.
sed -n '/random configurations/,/passed, .* failed/p' build/test-release/Testing/Temporary/LastTest.log
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  run_suite sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBNORM_SANITIZE=ON -DBNORM_BUILD_EXAMPLES=OFF
TSAN_OPTIONS=halt_on_error=1 CTEST_ARGS='-L ^(cpu|nn|comm|io)$' \
  run_suite tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBNORM_TSAN=ON -DBNORM_BUILD_EXAMPLES=OFF
# 4. The libFuzzer targets (tests/fuzz/: safetensors and IDX readers, the C API), built with
#    clang under ASan + UBSan, 40 s each on seeds made from real files (scripts/fuzz.sh).
echo "== fuzz: build and run each target for 40 s"
BNORM_FUZZ_BUILD=build/test-fuzz bash scripts/fuzz.sh --ci
echo "test.sh: all suites passed"
