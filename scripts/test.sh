#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint, then run the whole test suite, Triton interpreter tests
# included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check moa moa_kernels tests benchmarks examples
.venv/bin/python -m pytest -q "$@"
