"""The adapter activations: the one table that every backend, both Triton plans and the
saved expert signature read.

    Activation(name, code, function, derivative)
      name        what configs and expert strings say ("adapter:16:gelu")
      code        the int the Triton kernels switch on and moa's expert_signature saves in
                  every adapter file: a code never changes (saved adapters must load)
      function    act(h) for a tensor h of any shape, in h's dtype
      derivative  (grad, h) -> grad * act'(h), d loss / d h from grad = d loss / d act(h),
                  as one op: autograd's own backward kernel (the exact erf GELU; relu's
                  derivative is 0 at 0, as torch's)

ACTIVATIONS lists them in the order users see them (silu, the default, first);
`activation_by_name(name)` and `activation_by_code(code)` look one up and raise a ValueError naming
the allowed ones for anything else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    """One adapter activation (see the module docstring)."""

    name: str
    code: int
    function: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _identity(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def _identity_derivative(grad: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return grad


def _gelu_derivative(grad: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward.default(grad, hidden)


def _relu_derivative(grad: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.threshold_backward.default(grad, hidden, 0)


ACTIVATIONS: tuple[Activation, ...] = (
    Activation("silu", 1, F.silu, torch.ops.aten.silu_backward.default),
    Activation("gelu", 2, F.gelu, _gelu_derivative),
    Activation("relu", 3, F.relu, _relu_derivative),
    Activation("identity", 0, _identity, _identity_derivative),
)
ACTIVATION_NAMES: tuple[str, ...] = tuple(a.name for a in ACTIVATIONS)
_BY_NAME = {a.name: a for a in ACTIVATIONS}
_BY_CODE = {a.code: a for a in ACTIVATIONS}
IDENTITY = _BY_NAME["identity"]
SILU = _BY_NAME["silu"]
GELU = _BY_NAME["gelu"]
RELU = _BY_NAME["relu"]


def activation_by_name(name: str) -> Activation:
    """The activation called `name`; ValueError naming the allowed ones otherwise."""
    found = _BY_NAME.get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATION_NAMES)}")
    return found


def activation_by_code(code: int) -> Activation:
    """The activation whose kernel / signature code is `code`; ValueError naming the
    allowed codes otherwise."""
    found = _BY_CODE.get(code) if isinstance(code, int) and not isinstance(code, bool) \
        else None
    if found is None:
        allowed = ", ".join(f"{a.code} ({a.name})" for a in sorted(ACTIVATIONS,
                                                                     key=lambda a: a.code))
        raise ValueError(f"unknown activation code {code!r}; allowed: {allowed}")
    return found
