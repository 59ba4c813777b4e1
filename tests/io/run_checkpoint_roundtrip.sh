#!/usr/bin/env bash
# Runs tests/torch/checkpoint_roundtrip.py with the first Python that can import torch: Debian's
# /usr/bin/python3 (python3-torch), then python3 on PATH. Argument: the checkpoint_tool binary.
# Exit status: the script's (0 passed, 1 failed), or 77 (skip) when no interpreter has torch.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
candidates=(/usr/bin/python3)
if on_path="$(command -v python3 2>/dev/null)"; then
  candidates+=("$on_path")
fi
for py in "${candidates[@]}"; do
  [ -x "$py" ] || continue
  if "$py" -c 'import torch, numpy' >/dev/null 2>&1; then
    exec "$py" "$here/../torch/checkpoint_roundtrip.py" "$@"
  fi
done
echo "skipped: python3-torch not installed"
exit 77
