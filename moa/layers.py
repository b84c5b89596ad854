"""Moved to moa/modules/: MoALinear to linear.py, MoARouter to router.py, the backend and
dtype helpers to dispatch.py; kept so that old imports work."""

from moa.modules.dispatch import (  # noqa: F401
    ORDINARY_TENSOR_TYPES,
    autocast_off,
    backend_function,
    base_compute_dtype,
    compute_dtype,
    default_adapter_dtype,
    generate_cached,
    is_plain_linear,
    resolve_backend,
    triton_available,
)
from moa.modules.linear import (  # noqa: F401
    DEFAULT_ROUTER,
    MoALinear,
    describe_signature,
    expert_signature,
)
from moa.modules.router import MoARouter, threshold_straight_through  # noqa: F401
