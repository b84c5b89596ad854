#!/usr/bin/env bash
# The GPU suite (see benchmarks/gpu_suite.py): every CUDA test, `moa check --device cuda`
# and the layer benchmarks, written into OUT.
#
#   bash benchmarks/gpu_suite.sh OUT [--quick] [--dry-run]
#
# Uses this checkout's files only (on PYTHONPATH; nothing is installed or downloaded) and
# the python in $PYTHON, else the first of .venv/bin/python, python3, python that imports
# torch. Exit status:
# 0 when every step passed, 1 when one failed, 2 for bad arguments or no CUDA device.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    for candidate in "$root/.venv/bin/python" python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" 2>/dev/null; then
            PYTHON="$candidate"
            break
        fi
    done
fi
if [[ -z "${PYTHON:-}" ]]; then
    echo "gpu_suite.sh: no python here imports torch (set PYTHON=...)" >&2
    exit 2
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$PYTHON" "$root/benchmarks/gpu_suite.py" "$@"
