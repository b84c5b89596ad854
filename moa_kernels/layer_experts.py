"""Moved to moa_kernels/gated_adapter.py (the parallel adapter's op) and
moa_kernels/prompt_attention.py (the prompt expert's); kept so that old imports work."""

from moa_kernels.gated_adapter import gated_adapter  # noqa: F401
from moa_kernels.prompt_attention import (  # noqa: F401
    prompt_attention,
    prompt_attention_recipe,
    prompt_expert,
    prompt_keys_values,
)
