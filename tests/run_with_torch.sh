#!/usr/bin/env bash
# Runs a Python test script (tests/run_with_torch.sh SCRIPT ARGS..., SCRIPT a path) with the
# first interpreter that can import torch and numpy: Debian's /usr/bin/python3 (python3-torch),
# then python3 on PATH (which may be another installation without torch).
# Exit status: the script's, or 77 (skip) when no interpreter can import torch.
# Environment: BNORM_LIBRARY and PYTHONPATH as ctest sets them.
set -u
script="$1"
shift

candidates=(/usr/bin/python3)
if on_path="$(command -v python3 2>/dev/null)"; then
  candidates+=("$on_path")
fi

for py in "${candidates[@]}"; do
  [ -x "$py" ] || continue
  if "$py" -c 'import torch, numpy' >/dev/null 2>&1; then
    exec "$py" "$script" "$@"
  fi
done

echo "skipped: python3-torch not installed"
exit 77
