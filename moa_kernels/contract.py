"""The backend contract and its registry.

Every backend is a module with one entry point of the same name and signature:

    moa_linear(x [T, in], *, base_output=None | base_weight, base_bias,
               layout, shrink_weight, shrink_bias, expand_weight, expand_bias,
               router=None, gates=None, adapter_input=None, sparse=False)
        -> (y [T, out], applied gates [T, E]), both in x's dtype

- the base: `base_output` [T, out] is what the frozen module returned for x (any base:
  quantized, hooked, sharded; the backend adds only the mixture), or `base_weight` [out, in]
  and `base_bias` [out] (a plain linear: the backend may fuse x W^T into its shrink GEMM);
  exactly one of the two is given.
- the stacked expert tensors of `layout` (moa_kernels/layout.py), in x's dtype.
- `router` (a RouterOps) or `gates` [T, E] given from outside; `adapter_input` is what the
  experts read (x after dropout) or None; `sparse` skips the (token, expert) pairs the
  router marks inactive (or, for gates from outside, the zero gates): a skipped pair adds
  exactly nothing and its gate gets no gradient.

Backends are looked up here by name, and imported on first use (triton may be absent).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

import torch

BACKEND_MODULES = {
    "reference": "moa_kernels.reference",  # per-expert loop: the oracle
    "torch": "moa_kernels.torch_ops",  # fused PyTorch, any device
    "triton": "moa_kernels.triton",  # fused Triton kernels (CUDA or the interpreter)
}


def get_backend(name: str) -> Callable:
    """The `moa_linear` entry point of backend `name` (one of BACKEND_MODULES)."""
    if name not in BACKEND_MODULES:
        raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(BACKEND_MODULES)}")
    if name == "triton":
        return _triton_moa_linear
    return importlib.import_module(BACKEND_MODULES[name]).moa_linear


def check_triton_input(x: torch.Tensor) -> None:
    """Raise a clear error where the triton backend cannot run x. Called before triton is
    first imported: triton picks compiled or interpreted kernels at import."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' runs on CUDA tensors, or on the CPU under the "
                         f"Triton interpreter (TRITON_INTERPRET=1 set before triton is "
                         f"imported); got a {x.device.type} tensor. Use backend 'torch' or "
                         f"'auto' here")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"backend 'triton' supports float32, float16 and bfloat16 inputs, "
                         f"got {x.dtype}; use backend 'torch' for other dtypes")


def _triton_moa_linear(x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    check_triton_input(x)
    return importlib.import_module(BACKEND_MODULES["triton"]).moa_linear(x, **kwargs)
