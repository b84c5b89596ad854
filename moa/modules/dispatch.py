"""What every MoA module kind shares: which backend runs (`resolve_backend`,
`backend_function`), the dtype a module computes in (`compute_dtype`, `autocast_off`,
`default_adapter_dtype`, `base_compute_dtype`), whether a base is a plain nn.Linear whose
GEMM a backend may compute itself (`is_plain_linear`), values kept over one generate call
(`generate_cached`), and `Hook`, the base of the modules' forward hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from moa_kernels.backends import available, moa_linear_of, select_backend

# Which backend runs, and its entry point, from the registry (moa_kernels/contract.py): an
# explicit choice wins, then MOA_BACKEND, then auto; the entry point is checked to run x.
resolve_backend = select_backend
backend_function = moa_linear_of


def generate_cached(module: nn.Module, key, make: Callable):
    """make(), kept under `key` in module.generate_cache while that cache is on and grad mode
    is off (prompt_key_cache in moa/modules/prompt.py turns it on for one MoAModel.generate): what
    is derived from the weights (casts, concatenations) is fixed over a generate call, so
    decoding computes it once, not once per token. Under torch.compile a cached value is read
    (a graph input) but none is written (no side effect inside the graph)."""
    cache = getattr(module, "generate_cache", None)
    if cache is None or torch.is_grad_enabled():
        return make()
    value = cache.get(key)
    if value is None:
        value = make()
        if not torch.compiler.is_compiling():
            cache[key] = value
    return value


def triton_available() -> bool:
    """True when the triton backend can be imported (triton installed)."""
    return available("triton")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's, when autocast is on for x's device
    (autocast lowers float32 only; float64 stays float64)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64 \
            and x.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def autocast_off(x: torch.Tensor):
    """A context that switches autocast off for x's device (a no-op when it is off)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapter and router tensors stay float32 beside a half-precision (or non-float) base."""
    if not base_dtype.is_floating_point or base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


ORDINARY_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


OFFLOADING_ADVICE = (
    "keep the model on devices that hold it whole: quantize the base "
    "(BitsAndBytesConfig(load_in_4bit=True)), spread it over more GPUs, or load it without "
    "a device_map on the CPU")


def offloads_weights(module: nn.Module) -> bool:
    """True where accelerate's hook on `module` offloads its weights (cpu_offload,
    disk_offload, or a device_map that puts modules on "cpu" or "disk" beside a GPU): they
    stay on the meta device and are put back, by name, only around this module's own
    forward."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None:
        return False
    return any(getattr(each, "offload", False) for each in getattr(hook, "hooks", (hook,)))


def is_plain_linear(base: nn.Module) -> bool:
    """True for an nn.Linear whose forward is nn.Linear's, with no forward hooks and
    ordinary (not quantized, not sharded) tensors: its output is exactly
    F.linear(x, weight, bias), so the backends may compute it in their own GEMM. A forward
    set on the instance (accelerate's hooks, which put offloaded weights back around each
    call, set one) makes it a module to call."""
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward or \
            "forward" in vars(base):
        return False
    if base._forward_hooks or base._forward_pre_hooks:
        return False
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return False
    return type(base.weight) in ORDINARY_TENSOR_TYPES and \
        (base.bias is None or type(base.bias) in ORDINARY_TENSOR_TYPES)


def base_compute_dtype(base: nn.Module) -> torch.dtype | None:
    """The floating dtype the base computes in, where it says: bitsandbytes' 4-bit
    `compute_dtype`, else a floating weight's dtype (torchao's quantized tensors report the
    original one); None when it cannot be told (bitsandbytes int8)."""
    compute = getattr(base, "compute_dtype", None)
    if isinstance(compute, torch.dtype) and compute.is_floating_point:
        return compute
    weight = getattr(base, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point and \
            not getattr(weight, "bnb_quantized", False):
        return weight.dtype
    return None


class Hook:
    """Base of the modules' hooks: plain callable objects rather than closures, so that
    copy.deepcopy of a model carries hooks that point at the copied modules."""


__all__ = ["OFFLOADING_ADVICE", "ORDINARY_TENSOR_TYPES", "Hook", "autocast_off",
           "backend_function", "base_compute_dtype", "compute_dtype", "default_adapter_dtype",
           "generate_cached", "is_plain_linear", "offloads_weights", "resolve_backend",
           "triton_available"]
