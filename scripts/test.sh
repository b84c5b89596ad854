#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, then run the whole test suite, Triton interpreter tests
# included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check moa moa_kernels tests benchmarks examples tools
# The whole suite takes about 8-9 minutes on 2 CPU cores; a run past 25 minutes is a hang, and
# SIGINT makes pytest print where it was and what failed before it stops.
timeout --signal=INT --kill-after=60 1500 .venv/bin/python -m pytest -q "$@"
