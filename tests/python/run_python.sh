#!/usr/bin/env bash
# Runs one of the Python tests of this folder (tests/python/SCRIPT ARGS...) with the first
# interpreter that can import torch and numpy: Debian's /usr/bin/python3 (python3-torch), then
# python3 on PATH. Exit status: the script's, or 77 (skip) when no interpreter has torch.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
script="$1"
shift

candidates=(/usr/bin/python3)
if on_path="$(command -v python3 2>/dev/null)"; then
  candidates+=("$on_path")
fi

for py in "${candidates[@]}"; do
  [ -x "$py" ] || continue
  if "$py" -c 'import torch, numpy' >/dev/null 2>&1; then
    exec "$py" "$here/$script" "$@"
  fi
done

echo "skipped: python3-torch not installed"
exit 77
