"""Moved to moa_kernels/fusable.py; kept so that old imports work."""

from moa_kernels.fusable import (  # noqa: F401
    COMPILED_REDUCTION_MAX_FEATURES,
    COMPILED_REDUCTION_MAX_TOKENS,
    fusable_addmm,
    fusable_attention,
    fusable_linear,
)
