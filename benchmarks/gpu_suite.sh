#!/usr/bin/env bash
# The GPU suite (see benchmarks/gpu_suite.py): every CUDA test, `moa check --device cuda`
# and the layer benchmarks, written into OUT.
#
#   bash benchmarks/gpu_suite.sh OUT [--quick] [--dry-run]
#
# Uses this checkout's files only (on PYTHONPATH; nothing is installed or downloaded) and
# the python in $PYTHON, else .venv/bin/python when present, else python3. Exit status:
# 0 when every step passed, 1 when one failed, 2 for bad arguments or no CUDA device.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
cd "$root"
exec "$PYTHON" "$root/benchmarks/gpu_suite.py" "$@"
