#!/usr/bin/env bash
# Runs a command on NP MPI ranks of this machine, for ctest (tests/mpi/CMakeLists.txt's
# bnorm_add_mpi_test() registers tests through it):
#
#   run_mpi.sh NP COMMAND [ARGS...]
#
# - Exits 77 ("skipped: mpirun not found") when there is no mpirun/mpiexec: register the test
#   with SKIP_RETURN_CODE 77 so ctest reports it skipped, by name.
# - Otherwise replaces itself with `mpirun -np NP COMMAND ARGS...` and exits with its code.
# - Always lets NP exceed the cores (the 2-core CI machine runs 3 ranks).
# - As root, adds OpenMPI's --allow-run-as-root (mpirun refuses root otherwise).
# - Under an ASan build, OpenMPI's allocations still held at exit are suppressed (lsan.supp).
# - Fault tests (a job that must end with an error) set, in the environment:
#     BNORM_MPI_EXPECT_EXIT=N        mpirun must exit with code N (default 0),
#     BNORM_MPI_EXPECT_OUTPUT=REGEX  its output (stdout + stderr) must match `grep -E REGEX`;
#   the script then exits 0 when both hold, else 1, naming what differed.
# MPIEXEC in the environment overrides the launcher.
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: run_mpi.sh NP COMMAND [ARGS...]" >&2
  exit 2
fi
np=$1
shift

launcher=${MPIEXEC:-}
if [ -z "$launcher" ]; then
  launcher=$(command -v mpirun || command -v mpiexec || true)
fi
if [ -z "$launcher" ]; then
  echo "skipped: mpirun not found"
  exit 77
fi

flags=(-np "$np")
if "$launcher" --version 2>&1 | grep -q "Open MPI"; then
  # More ranks than cores (slots) is allowed, and each waiting rank yields the core.
  flags+=(--oversubscribe)
  if [ "$(id -u)" -eq 0 ]; then
    flags+=(--allow-run-as-root)
  fi
fi

# Not set: OMPI_MCA_btl_vader_single_copy_mechanism=none. The shared-memory transport's
# single-copy path (CMA, process_vm_readv) worked on the Debian 12 container this was tested
# in, as root and as an unprivileged user (mpi_comm_test's 4 MiB all-reduce uses it). Where
# ptrace between processes is forbidden it fails with "Read -1, expected ..., errno = 1":
# export that variable there.

# LeakSanitizer (ASan builds; ignored otherwise): OpenMPI keeps allocations of its own until
# exit; lsan.supp suppresses those, by library, and nothing of bnorm's. The allocating frames
# are in MCA components that MPI_Finalize has unloaded, which LSan cannot name: the slow unwinder
# (fast_unwind_on_malloc=0) records the whole stack, down to the libmpi/libopen-rte frames the
# suppressions match. Options set by the caller come after these and win.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LSAN_OPTIONS="suppressions=$here/lsan.supp:fast_unwind_on_malloc=0:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"

if [ -z "${BNORM_MPI_EXPECT_EXIT:-}" ] && [ -z "${BNORM_MPI_EXPECT_OUTPUT:-}" ]; then
  exec "$launcher" "${flags[@]}" "$@"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
rc=0
"$launcher" "${flags[@]}" "$@" >"$log" 2>&1 || rc=$?
cat "$log"
expected_rc=${BNORM_MPI_EXPECT_EXIT:-0}
if [ "$rc" -ne "$expected_rc" ]; then
  echo "run_mpi.sh: FAILED: mpirun exited with $rc, expected $expected_rc"
  exit 1
fi
if [ -n "${BNORM_MPI_EXPECT_OUTPUT:-}" ] && ! grep -Eq -- "$BNORM_MPI_EXPECT_OUTPUT" "$log"; then
  echo "run_mpi.sh: FAILED: the output does not match: $BNORM_MPI_EXPECT_OUTPUT"
  exit 1
fi
echo "run_mpi.sh: exit code $rc and output as expected"
