"""The backends of the registry (moa_kernels/contract.py) by name: their entry points
(`moa_linear_of`, `get_backend`), whether one is installed (`available`), and which one runs
(`select_backend`: an explicit name, MOA_BACKEND, or auto).

Compile-safe: torch.compile traces a whole model with fullgraph=True, and with it these
lookups; an importlib call would break its graph, an import statement does not. So reference
and torch_ops are imported here, and triton by an import statement on first use, after its
input check (triton picks compiled or interpreted kernels when it is imported).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

import torch

from moa_kernels import reference, torch_ops
from moa_kernels.contract import (  # noqa: F401  (re-exported: the old path's names)
    AUTO_ORDER,
    BACKEND_MODULES,
    BACKENDS,
    accepts,
    backend_info,
    check_backend_input,
    check_choice,
    check_triton_input,
)


def _import_triton() -> ModuleType:
    import moa_kernels.triton as module  # an import statement: torch.compile traces it

    return module


# How each backend's module (BackendInfo.module) is reached.
_MODULE_LOADERS: dict[str, Callable[[], ModuleType]] = {
    reference.__name__: lambda: reference,
    torch_ops.__name__: lambda: torch_ops,
    "moa_kernels.triton": _import_triton,
}


def moa_linear_of(name: str, x: torch.Tensor) -> Callable:
    """The `moa_linear` entry point of backend `name`, checked to run x (its devices and
    dtypes, `check_backend_input`) before its module is first imported."""
    check_backend_input(name, x)
    return _MODULE_LOADERS[BACKENDS[name].module]().moa_linear


def get_backend(name: str) -> Callable:
    """The `moa_linear` entry point of backend `name`; for a backend with device or dtype
    limits, a function that checks x first (the module is imported on its first call)."""
    info = backend_info(name)
    if info.devices is None and info.dtypes is None:
        return _MODULE_LOADERS[info.module]().moa_linear

    def checked_moa_linear(x: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return moa_linear_of(name, x)(x, **kwargs)

    return checked_moa_linear


def available(name: str) -> bool:
    """True when backend `name` can be imported (triton installed, for triton)."""
    try:
        _MODULE_LOADERS[backend_info(name).module]()
    except ImportError:
        return False
    return True


def select_backend(requested: str, device: torch.device) -> str:
    """The backend to run: an explicit name wins, then MOA_BACKEND, then auto: the first of
    AUTO_ORDER that auto may pick, runs on `device` without an interpreter, and is
    installed."""
    check_choice(requested)
    if requested == "auto":
        requested = check_choice(os.environ.get("MOA_BACKEND", "auto") or "auto",
                                 "MOA_BACKEND")
    if requested != "auto":
        return requested
    for name in AUTO_ORDER:
        info = BACKENDS[name]
        if info.auto and info.runs_on(device, interpreted=False) and available(name):
            return name
    raise ValueError(f"no backend that auto may pick runs on {device.type}")


__all__ = ["BACKEND_MODULES", "available", "check_triton_input", "get_backend",
           "moa_linear_of", "select_backend"]
