"""Moved to moa_kernels/contract.py; kept so that old imports work."""

from moa_kernels.contract import BACKEND_MODULES, check_triton_input, get_backend  # noqa: F401
