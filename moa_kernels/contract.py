"""The backend contract, the registry of the backends that meet it, and the checks they share.

Every backend is a module with one entry point of the same name and signature:

    moa_linear(x [T, in], *, base_output=None | base_weight, base_bias,
               layout, shrink_weight, shrink_bias, expand_weight, expand_bias,
               router=None, gates=None, adapter_input=None, sparse=False, **accepted)
        -> (y [T, out], applied gates [T, E]), both in x's dtype

- the base: `base_output` [T, out] is what the frozen module returned for x (any base:
  quantized, hooked, sharded; the backend adds only the mixture), or `base_weight` [out, in]
  and `base_bias` [out] (a plain linear: the backend may fuse x W^T into its shrink GEMM);
  exactly one of the two is given (`check_base_operands`).
- the stacked expert tensors of `layout` (moa_kernels/layout.py), in x's dtype (or in
  another, where the backend accepts STACKED_ANY_DTYPE).
- `router` (a RouterOps) or `gates` [T, E] given from outside (`check_gate_source`,
  `check_gates`); `adapter_input` is what the experts read (x after dropout) or None;
  `sparse` skips the (token, expert) pairs the router marks inactive (or, for gates from
  outside, the zero gates): a skipped pair adds exactly nothing and its gate gets no
  gradient.
- `accepted`: the optional inputs beyond the contract that the backend's BackendInfo lists
  in `accepts` (OPTIONS says what each is); a caller passes one only where `accepts` says so.

BACKENDS holds what each backend is: its module, the devices and dtypes it runs, the options
it accepts, whether auto may pick it. Callers ask it (`backend_info`, `accepts`,
`check_backend_input`) and never compare backend names. Its entry points are looked up by
moa_kernels/backends.py (which imports the backends; this module is below them, since every
backend calls the checks here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# The optional inputs a backend may accept beyond the contract.
INPUT_RECIPE = "input_recipe"  # how x is recomputed, saved instead of x (torch_ops.InputRecipe)
SHRINK_OUTPUT = "shrink_output"  # x's shrink GEMM [T, R] computed outside (a layer router's)
# stacked expert tensors in another dtype than x's (cast while packing, cached per version of
# the parameters: the caller then passes the parameters themselves, not casts of them)
STACKED_ANY_DTYPE = "stacked_any_dtype"
OPTIONS = (INPUT_RECIPE, SHRINK_OUTPUT, STACKED_ANY_DTYPE)

TRITON_INTERPRETER = "TRITON_INTERPRET"  # "1" before triton is imported: kernels on the CPU
_DEVICE_WORDS = {"cuda": "CUDA", "cpu": "the CPU"}


@dataclass(frozen=True)
class BackendInfo:
    """What one backend is.

    name: its name (MoALinear's `backend=`). module: the module whose `moa_linear` is its
    entry point. devices: the device types it runs on, None for any. interpreted_devices:
    device types it runs on under the Triton interpreter (TRITON_INTERPRET=1 set before
    triton is imported). dtypes: the input dtypes it runs, None for any floating dtype.
    accepts: the OPTIONS it takes beyond the contract. oracle: the per-expert loop the others
    are checked against (its router gates are the router's `reference_gates`). auto: whether
    auto may pick it (on a device it runs on without an interpreter).
    """

    name: str
    module: str
    devices: frozenset[str] | None = None
    interpreted_devices: frozenset[str] = frozenset()
    dtypes: tuple[torch.dtype, ...] | None = None
    accepts: frozenset[str] = frozenset()
    oracle: bool = False
    auto: bool = False

    def runs_on(self, device: torch.device, *, interpreted: bool | None = None) -> bool:
        """Whether it runs on `device`; under the interpreter where `interpreted` (default:
        TRITON_INTERPRET=1 is set) and the device is one of interpreted_devices."""
        if self.devices is None or device.type in self.devices:
            return True
        if interpreted is None:
            interpreted = os.environ.get(TRITON_INTERPRETER) == "1"
        return interpreted and device.type in self.interpreted_devices


BACKENDS: dict[str, BackendInfo] = {info.name: info for info in (
    BackendInfo("reference", "moa_kernels.reference", oracle=True),
    BackendInfo("torch", "moa_kernels.torch_ops", accepts=frozenset({INPUT_RECIPE,
                                                                     SHRINK_OUTPUT}),
                auto=True),
    # auto picks triton on CUDA only once benchmarks/gpu_suite.sh has passed on real hardware
    # with its figures in benchmarks/RESULTS.md; until then the triton backend has never run
    # on a GPU (only the interpreter and sm_90 builds have checked it), so auto takes torch.
    BackendInfo("triton", "moa_kernels.triton", devices=frozenset({"cuda"}),
                interpreted_devices=frozenset({"cpu"}),
                dtypes=(torch.float32, torch.float16, torch.bfloat16),
                accepts=frozenset({STACKED_ANY_DTYPE}), auto=False),
)}
# What auto tries, in order: the first that may be picked (`auto`), runs on the device
# without an interpreter, and is installed.
AUTO_ORDER = ("triton", "torch")
# The names MoALinear, MoAConfig and the CLI take: "auto" and every backend.
BACKEND_CHOICES = ("auto", *BACKENDS)
BACKEND_MODULES = {name: info.module for name, info in BACKENDS.items()}  # (older name)


def backend_info(name: str) -> BackendInfo:
    """The registry's entry for backend `name`; a ValueError listing the backends for any
    other name."""
    info = BACKENDS.get(name)
    if info is None:
        raise ValueError(f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}")
    return info


def accepts(name: str, option: str) -> bool:
    """Whether backend `name` takes `option` (one of OPTIONS) beyond the contract."""
    if option not in OPTIONS:
        raise ValueError(f"unknown backend option {option!r}; allowed: {', '.join(OPTIONS)}")
    return option in backend_info(name).accepts


def check_choice(name: str, what: str = "backend") -> str:
    """`name` where it is one of BACKEND_CHOICES; else a ValueError naming `what` (e.g.
    "MOA_BACKEND") and the allowed names."""
    if name not in BACKEND_CHOICES:
        raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(BACKEND_CHOICES)}")
    return name


# ---- the entry checks every backend's moa_linear makes ------------------------------------

def check_backend_input(name: str, x: torch.Tensor) -> None:
    """Raise a clear error where backend `name` cannot run x (its devices and dtypes). The
    lookup calls it before a backend is first imported (triton picks compiled or interpreted
    kernels at import); each backend's moa_linear calls it again."""
    info = backend_info(name)
    if not info.runs_on(x.device):
        raise ValueError(f"backend {name!r} runs on {_devices_text(info)}; got a "
                         f"{x.device.type} tensor. Use backend {_fallback(info)!r} or 'auto' "
                         "here")
    if info.dtypes is not None and x.dtype not in info.dtypes:
        names = [str(dtype).removeprefix("torch.") for dtype in info.dtypes]
        listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
        raise ValueError(f"backend {name!r} supports {listed} inputs, got {x.dtype}; use "
                         f"backend {_fallback(info)!r} for other dtypes")


def check_triton_input(x: torch.Tensor) -> None:
    """check_backend_input for the triton backend (the name its entry point calls)."""
    check_backend_input("triton", x)


def check_base_operands(x: torch.Tensor, base_output: torch.Tensor | None,
                        base_weight: torch.Tensor | None) -> None:
    """Exactly one of base_output [T, out] (whose leading dims are x's) and base_weight."""
    if (base_output is None) == (base_weight is None):
        raise ValueError("give exactly one of base_output (any base) and base_weight (a "
                         "plain linear base)")
    if base_output is not None and base_output.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"base_output has shape {tuple(base_output.shape)}, x has "
                         f"{tuple(x.shape)}: their leading dimensions must agree")


def check_gate_source(router, gates: torch.Tensor | None) -> None:
    """A router or gates: the mixture needs one of them."""
    if router is None and gates is None:
        raise ValueError("moa_linear needs a router or gates")


def check_gates(gates: torch.Tensor | None, x: torch.Tensor, num_experts: int) -> None:
    """Gates [T, E] for x [T, in] and E experts (given, or the router's)."""
    if gates is None or gates.shape != (x.shape[0], num_experts):
        shape = None if gates is None else tuple(gates.shape)
        raise ValueError(f"gates must have shape {(x.shape[0], num_experts)}, got {shape}")


def _devices_text(info: BackendInfo) -> str:
    text = " or ".join(_DEVICE_WORDS.get(d, d) for d in sorted(info.devices)) + " tensors"
    if info.interpreted_devices:
        interpreted = " or ".join(_DEVICE_WORDS.get(d, d)
                                  for d in sorted(info.interpreted_devices))
        text += (f", or on {interpreted} under the Triton interpreter ({TRITON_INTERPRETER}=1 "
                 "set before triton is imported)")
    return text


def _fallback(info: BackendInfo) -> str:
    """The backend to suggest instead of `info`: the first fused one that runs anywhere."""
    return next(other.name for other in BACKENDS.values()
                if not other.oracle and other.devices is None and other.dtypes is None)


__all__ = ["AUTO_ORDER", "BACKENDS", "BACKEND_CHOICES", "BACKEND_MODULES", "INPUT_RECIPE",
           "OPTIONS", "SHRINK_OUTPUT", "STACKED_ANY_DTYPE", "TRITON_INTERPRETER",
           "BackendInfo", "accepts", "backend_info", "check_backend_input", "check_base_operands",
           "check_choice", "check_gate_source", "check_gates", "check_triton_input"]
