#!/usr/bin/env bash
# Data-parallel training and synchronized batch norm, measured: builds Release with the
# benchmarks in build/bench-dist (incrementally when it exists), then
#   (a) `bnorm train --preset cnn --only bn` for a few hundred steps as 1 process x 2 threads and
#       under mpirun as 2 ranks x 1 thread, with --sync-bn (reproducible and per-rank) and
#       without, each configuration --repeats times in turn (the VM's speed drifts), and reads
#       each report.json (steps/s, ms/step, all-reduce calls, bytes, time): medians and ranges;
#   (b) bnorm_sync_bn_bench under mpirun -np 2 (and -np 3, oversubscribed): sync_forward_train +
#       sync_backward against the local passes on the cnn preset's batch-norm layers, and bare
#       all-reduces of the same sizes and of the fused gradient buffer;
#   (c) writes build/bench-dist/distributed.md (the commands, the date, the tables) and prints it.
# About 3 minutes on 2 cores with the build done, 4 from scratch (the build: about 1 minute).
#
#   bash scripts/distributed_bench.sh [--steps N] [--repeats N] [--reps N] [--no-np3] [--fresh]
#
#   --steps N   training steps of each run (default 200)
#   --repeats N runs of each training configuration (default 3)
#   --reps N    timed repetitions of each bench measurement (default 50)
#   --no-np3    skip the 3-rank bench (3 ranks on 2 cores are oversubscribed)
#   --fresh     build from scratch (default: reuse build/bench-dist)
# Needs OpenMPI (Debian: openmpi-bin libopenmpi-dev). As root, mpirun gets --allow-run-as-root.
set -euo pipefail

steps=200
repeats=3
reps=50
np3=1
fresh=0
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --no-np3) np3=0; shift ;;
    --fresh) fresh=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "distributed_bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/install_deps.sh bench

mpirun=mpirun  # from PATH (the commands in the summary read as typed)
if ! command -v mpirun >/dev/null 2>&1; then
  echo "distributed_bench.sh: mpirun not found (Debian: apt-get install openmpi-bin libopenmpi-dev)" >&2
  exit 1
fi
mpi_flags=()
if [ "$(id -u)" -eq 0 ]; then mpi_flags+=(--allow-run-as-root); fi

build=build/bench-dist
if [ "$fresh" -eq 1 ]; then rm -rf "$build"; fi
echo "== building $build (Release, BNORM_BUILD_BENCH=ON)"
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DBNORM_BUILD_BENCH=ON -DBNORM_BUILD_TESTS=OFF \
  -DBNORM_BUILD_EXAMPLES=OFF -DBNORM_MPI=ON >"$build.configure.log" 2>&1 ||
  { cat "$build.configure.log" >&2; exit 1; }
cmake --build "$build" --target bnorm_cli bnorm_sync_bn_bench -j "$(nproc)" >"$build.build.log" 2>&1 ||
  { cat "$build.build.log" >&2; exit 1; }
bin=$build/bin
out=$build/dist
rm -rf "$out"
mkdir -p "$out"
log=$out/run.log
: >"$log"

# ---- (a) training runs.
train_args=(train --preset cnn --only bn --steps "$steps" --eval-every 0 --no-plots)
names=()
commands=()
add_config() {  # name, then the command (its --out is added per run)
  local name=$1
  shift
  names+=("$name")
  commands+=("$*")
}
add_config 1x2 "$bin/bnorm" "${train_args[@]}" --threads 2
add_config 2x1-sync "$mpirun" "${mpi_flags[@]}" -np 2 "$bin/bnorm" "${train_args[@]}" --threads 1 \
  --sync-bn
add_config 2x1-sync-per-rank "$mpirun" "${mpi_flags[@]}" -np 2 "$bin/bnorm" "${train_args[@]}" \
  --threads 1 --sync-bn --sync-mode per-rank
add_config 2x1-nosync "$mpirun" "${mpi_flags[@]}" -np 2 "$bin/bnorm" "${train_args[@]}" --threads 1
# Round-robin, so that a slow spell of the machine spreads over every configuration.
for ((r = 1; r <= repeats; ++r)); do
  for i in "${!names[@]}"; do
    name=${names[$i]}
    echo "== train: $name, run $r of $repeats" | tee -a "$log"
    # shellcheck disable=SC2086  # the command was stored as words without spaces inside them
    ${commands[$i]} --out "$out/$name/run$r" >>"$log" 2>&1 ||
      { echo "distributed_bench.sh: $name run $r failed; $log has its output" >&2
        tail -20 "$log" >&2; exit 1; }
  done
done

# ---- (b) the sync BN bench.
bench_cmds=()
echo "== bnorm_sync_bn_bench, 2 ranks" | tee -a "$log"
bench_cmds+=("$mpirun ${mpi_flags[*]} -np 2 $bin/bnorm_sync_bn_bench --reps $reps --threads 1")
"$mpirun" "${mpi_flags[@]}" -np 2 "$bin/bnorm_sync_bn_bench" --reps "$reps" --threads 1 \
  --json "$out/sync_bn_np2.json" >"$out/sync_bn_np2.md" 2>>"$log"
if [ "$np3" -eq 1 ]; then
  echo "== bnorm_sync_bn_bench, 3 ranks (oversubscribed)" | tee -a "$log"
  bench_cmds+=("$mpirun ${mpi_flags[*]} --oversubscribe -np 3 $bin/bnorm_sync_bn_bench --reps $reps --threads 1")
  "$mpirun" "${mpi_flags[@]}" --oversubscribe -np 3 "$bin/bnorm_sync_bn_bench" --reps "$reps" \
    --threads 1 --json "$out/sync_bn_np3.json" >"$out/sync_bn_np3.md" 2>>"$log"
fi

# ---- (c) the summary.
md=$build/distributed.md
cpu=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)
mpi_version=$("$mpirun" --version 2>&1 | head -1)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git status --porcelain 2>/dev/null | head -1)
{
  echo "# Distributed training and synchronized batch norm"
  echo
  echo "Run of $(date -u '+%Y-%m-%d %H:%M UTC') by \`bash scripts/distributed_bench.sh\`, commit $commit${dirty:+ (with uncommitted changes)};"
  echo "${cpu:-unknown CPU}, $(nproc) cores, $mpi_version."
  echo
  echo "## Training: \`bnorm train --preset cnn --only bn\`, $steps steps of the global batch 128"
  echo
  echo "Commands (each run with \`--out $out/<config>/run<i>\`), $repeats runs of each, in turn:"
  echo
  for i in "${!names[@]}"; do echo "- ${names[$i]}: \`${commands[$i]}\`"; done
  echo
  python3 - "$out" "$repeats" "${names[@]}" <<'EOF'
import json, statistics, sys
out, repeats, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
rows = []
for name in names:
    runs = []
    for i in range(1, repeats + 1):
        r = json.load(open(f"{out}/{name}/run{i}/report.json"))
        runs.append((r, r["runs"][0]))
    rows.append((name, runs))
med = statistics.median
base = med(run["steps_per_s"] for _, run in rows[0][1])
print("| config | ranks x threads | sync BN | steps/s, median (min - max) | ms/step | vs 1 x 2 | "
      "all-reduce calls/step | MiB/step | all-reduce ms/step | all-reduce % of step | "
      "test accuracy |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for name, runs in rows:
    r0, run0 = runs[0]
    sps_all = [run["steps_per_s"] for _, run in runs]
    sps = med(sps_all)
    ms = 1000.0 / sps
    d = r0.get("distributed", {})
    ranks = d.get("ranks", 1)
    threads = d.get("threads_per_rank", r0.get("threads"))
    sync = (d.get("sync_mode") or "on") if d.get("sync_bn") else "-"
    cs = [(run["distributed"], run["steps"]) for _, run in runs if run.get("distributed")]
    if cs:
        calls = f"{med(c['allreduce_calls'] / n for c, n in cs):.2f}"
        mib = f"{med(c['allreduce_bytes'] / n for c, n in cs) / 2**20:.2f}"
        ar_ms = med(1e3 * c["allreduce_seconds"] / n for c, n in cs)
        ar = f"{ar_ms:.2f}"
        share = f"{100 * ar_ms / ms:.0f} %"
    else:
        calls = mib = ar = share = "-"
    accs = sorted({run["final"]["test_accuracy"] for _, run in runs
                   if run["final"]["test_accuracy"] is not None})
    acc = " / ".join(f"{100 * a:.2f} %" for a in accs) or "-"
    print(f"| {name} | {ranks} x {threads} | {sync} | {sps:.1f} ({min(sps_all):.1f} - "
          f"{max(sps_all):.1f}) | {ms:.1f} | {sps / base:.2f}x | {calls} | {mib} | {ar} | "
          f"{share} | {acc} |")
print()
print("steps/s is the report's steps_per_s (training time only: the final test evaluation is "
      "not in it), ms/step = 1000 / its median; the all-reduce figures are the medians of each "
      "run's `distributed.allreduce_*` divided by its steps, so they include the few "
      "all-reduces of the replica checks and of the sharded final evaluation (and their "
      "waiting). Test accuracy: every distinct value over the runs (the runs are "
      "deterministic).")
EOF
  echo
  echo "## Synchronized batch norm per layer: \`bnorm_sync_bn_bench\`"
  echo
  echo "Commands:"
  echo
  for c in "${bench_cmds[@]}"; do echo "- \`$c\`"; done
  echo
  cat "$out/sync_bn_np2.md"
  if [ "$np3" -eq 1 ]; then
    echo
    echo "3 ranks on 2 cores (oversubscribed: one core runs two ranks, so waiting for the slow"
    echo "rank shows up in the all-reduce time):"
    echo
    cat "$out/sync_bn_np3.md"
  fi
  echo
  echo "Raw: $out/ (report.json of each run, sync_bn_np*.json, run.log)."
} >"$md"
cat "$md"
echo
echo "Summary: $md; took $(( $(date +%s) - start )) s"
