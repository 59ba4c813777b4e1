#!/usr/bin/env bash
# The batch-norm benchmark, in one run: STREAM-like copy and non-temporal copy, bnorm, oneDNN and
# PyTorch on the shapes of bench/shapes/*.txt, every implementation validated before it is timed.
# Installs the bench dependencies, builds Release from scratch in build/bench, prints the markdown
# table and writes build/bench/results/{bench.csv,table.md,bench.log}. bench/README.md has the
# details.
#
#   bash scripts/bench.sh [--shapes FILE]... [--ops LIST] [--impls copy,bnorm,onednn,torch]
#                         [--mode warm|cold|both] [--cold] [--cold-mib MIB] [--quick]
#                         [--threads N] [--keep-build] [--build-dir DIR]
#                         [--dtypes f32,bf16,f16] [--half-ops LIST]
#
#   --shapes FILE   a shape file (repeatable); default: every bench/shapes/*.txt
#   --ops LIST      a subset of fwd_train,fwd_infer,bwd,fwd_train_relu,fwd_infer_relu,bwd_relu,
#                   fwd_train_add_relu (default: all; the *_relu ops are the fused BN + ReLU)
#   --impls LIST    a subset of copy,bnorm,onednn,torch (without copy the % columns are empty)
#   --mode MODE     warm (default: repeated calls on the same buffers), cold (each call on the
#                   next of a rotation of buffer sets > 2 x the L3), or both
#   --cold          the same as --mode cold
#   --cold-mib MIB  memory the cold rotation may take per measurement (default 1536)
#   --quick         fewer repetitions (>= 5 calls, >= 0.05 s each) and a smaller copy, to iterate
#   --threads N     threads for every implementation (default 2)
#   --keep-build    reuse the build directory instead of building from scratch
#   --build-dir DIR build (and results) there instead of build/bench
#   --dtypes LIST   the tensors' element types, a subset of f32,bf16,f16 (bf16/f16: bnorm's
#                   16-bit views, oneDNN's bf16/f16 primitives, PyTorch bf16; what a peer refuses
#                   is a row saying "unsupported by ..."). Default f32,bf16,f16 with the 16-bit
#                   ones on fwd_train,fwd_infer,bwd only; given, every dtype runs every op of --ops
#   --half-ops LIST the ops the 16-bit dtypes run (default: fwd_train,fwd_infer,bwd without
#                   --dtypes, every op of --ops with it)
# BNORM_BENCH_TIMEOUT (seconds, default 3600) stops a runner that hangs; its rows so far are kept
# (bnorm_bench took 28 min in a --quick run of every op under load, before the 16-bit rows).
# Exit status: 0, or 1 when an implementation failed validation or a call failed (the table
# still prints, with those rows marked).
set -euo pipefail

invocation="bash scripts/bench.sh${*:+ $*}"
shapes=()
ops=fwd_train,fwd_infer,bwd,fwd_train_relu,fwd_infer_relu,bwd_relu,fwd_train_add_relu
impls=copy,bnorm,onednn,torch
mode=warm
cold_mib=1536
quick=()
threads=2
keep_build=0
build=build/bench
dtypes=f32,bf16,f16
half_ops=fwd_train,fwd_infer,bwd  # the default run's 16-bit ops; --dtypes alone: every op
half_ops_set=0
timeout=${BNORM_BENCH_TIMEOUT:-3600}  # seconds per runner
while [ $# -gt 0 ]; do
  case "$1" in
    --shapes) shapes+=("$(realpath "$2")"); shift 2 ;;
    --ops) ops=$2; shift 2 ;;
    --impls) impls=$2; shift 2 ;;
    --mode)
      case "$2" in warm|cold|both) mode=$2 ;;
        *) echo "bench.sh: --mode '$2' is not warm, cold or both" >&2; exit 2 ;; esac
      shift 2 ;;
    --cold) mode=cold; shift ;;
    --cold-mib) cold_mib=$2; shift 2 ;;
    --quick) quick=(--quick); shift ;;
    --threads) threads=$2; shift 2 ;;
    --keep-build) keep_build=1; shift ;;
    --build-dir) build=$(realpath -m "$2"); shift 2 ;;
    --dtypes)
      dtypes=$2
      [ "$half_ops_set" -eq 1 ] || half_ops=""
      shift 2 ;;
    --half-ops) half_ops=$2; half_ops_set=1; shift 2 ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
root=$PWD
start=$(date +%s)
bash scripts/install_deps.sh bench

results=$build/results
if [ "$keep_build" -eq 0 ]; then rm -rf "$build"; fi
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DBNORM_BUILD_BENCH=ON -DBNORM_BUILD_TESTS=OFF \
  -DBNORM_BUILD_EXAMPLES=OFF -DBNORM_BUILD_NN=OFF >"$build.configure.log" 2>&1 ||
  { cat "$build.configure.log" >&2; exit 1; }
grep "bnorm bench:" "$build.configure.log" || true
cmake --build "$build" --target bnorm_bench -j "$(nproc)" >"$build.build.log" 2>&1 ||
  { cat "$build.build.log" >&2; exit 1; }
mkdir -p "$results"
rm -f "$results"/*.csv "$results"/table.md

if [ ${#shapes[@]} -eq 0 ]; then
  for f in "$root"/bench/shapes/*.txt; do shapes+=("$f"); done
fi
shape_args=()
for f in "${shapes[@]}"; do shape_args+=(--shapes "$f"); done
dtype_args=(--dtypes "$dtypes")
[ -n "$half_ops" ] && dtype_args+=(--half-ops "$half_ops")

# oneDNN in Debian runs on OpenMP; PyTorch uses OpenMP too (and set_num_threads).
export OMP_NUM_THREADS=$threads
export BNORM_NUM_THREADS=$threads
log=$results/bench.log
: >"$log"

has() { [[ ",$impls," == *",$1,"* ]]; }
status=0
cxx_impls=()
for i in copy bnorm onednn; do has $i && cxx_impls+=("$i"); done
if [ ${#cxx_impls[@]} -gt 0 ]; then
  echo "== bnorm_bench (${cxx_impls[*]}), $threads threads" | tee -a "$log"
  # A hung implementation must not hang the run: each runner gets $timeout seconds.
  timeout "$timeout" "$build/bin/bnorm_bench" "${shape_args[@]}" --ops "$ops" \
    --impls "$(IFS=,; echo "${cxx_impls[*]}")" --threads "$threads" "${quick[@]}" \
    --mode "$mode" --cold-mib "$cold_mib" "${dtype_args[@]}" --csv "$results/bnorm.csv" 2>&1 |
    tee -a "$log" ||
    status=1
fi

# PyTorch: the first interpreter that imports torch (Debian's python3-torch lives in the
# system interpreter, which is not always the python3 first on PATH).
torch_python=""
torch_missing=""
if has torch; then
  for candidate in /usr/bin/python3 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c "import torch" >/dev/null 2>&1; then
      torch_python=$(command -v "$candidate")
      break
    fi
  done
  if [ -n "$torch_python" ]; then
    echo "== PyTorch ($torch_python), $threads threads" | tee -a "$log"
    timeout "$timeout" "$torch_python" bench/peers/torch_runner.py "${shape_args[@]}" --ops "$ops" \
      --threads "$threads" "${quick[@]}" --mode "$mode" --cold-mib "$cold_mib" "${dtype_args[@]}" \
      --csv "$results/torch.csv" 2>&1 | tee -a "$log" || status=1
  else
    torch_missing="no python3 on this machine imports torch"
    echo "== PyTorch: not found ($torch_missing)" | tee -a "$log"
  fi
else
  torch_missing="not requested (--impls)"
fi

report_python=${torch_python:-$(command -v python3 || true)}
if [ -z "$report_python" ]; then
  echo "bench.sh: no python3 to write the report; raw CSV in $results" >&2
  exit 1
fi
report_args=(--csv "$results/bnorm.csv" --command "$invocation"
  --out-csv "$results/bench.csv" --out-md "$results/table.md")
[ -f "$results/torch.csv" ] && report_args+=(--csv "$results/torch.csv")
[ -n "$torch_missing" ] && report_args+=(--torch-missing "$torch_missing")
echo
"$report_python" bench/report.py "${report_args[@]}" || status=1
echo
echo "Results: $results/table.md, $results/bench.csv (merged), $results/bench.log;" \
  "took $(( $(date +%s) - start )) s"
exit $status
