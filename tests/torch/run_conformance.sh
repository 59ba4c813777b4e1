#!/usr/bin/env bash
# Runs the PyTorch conformance suite (conformance.py) with the first Python interpreter that can
# import torch and numpy: Debian's /usr/bin/python3 (python3-torch), then python3 on PATH (which
# may be another installation without torch). Arguments are passed to conformance.py.
# Exit status: conformance.py's (0 all passed, 1 failures), or 77 (skip) when no interpreter can
# import torch.
#
# Environment: BNORM_LIBRARY (full path of libbnorm.so) and PYTHONPATH (<repo>/python) as ctest
# sets them; without them bnorm_ctypes.py finds <repo>/build/lib/libbnorm.so on its own.
set -u
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

candidates=(/usr/bin/python3)
if on_path="$(command -v python3 2>/dev/null)"; then
  candidates+=("$on_path")
fi

for py in "${candidates[@]}"; do
  [ -x "$py" ] || continue
  if "$py" -c 'import torch, numpy' >/dev/null 2>&1; then
    exec "$py" "$here/conformance.py" "$@"
  fi
done

echo "skipped: python3-torch not installed"
exit 77
