"""How the fused ops' autograd Functions run, and what they may save instead of their
input: shared by every fused op (the torch backend's steps in torch_ops.py,
torch_base_shrink.py, torch_gated_expand.py and torch_sparse_experts.py; gated_adapter.py;
prompt_attention.py).

`apply_function(Function, *args)`: Function.apply under autograd; its forward alone when
grad mode is off (decoding: no autograd bookkeeping per call); under torch.compile its
`traced` twin, the same math in plain differentiable ops, so that AOTAutograd derives the
backward and the compiler fuses across it and picks what to save.
`InputRecipe(function, tensors)`: x as function(*tensors), bitwise, saved instead of x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class InputRecipe:
    """x as `function(*tensors)`, bitwise (the same ops on the same tensors): what a fused
    op saves for its backward instead of x when the tensors are kept alive by others anyway
    (docs/DESIGN.md, "Saved tensors"). They are saved with save_for_backward, so an in-place
    change of one before the backward is an error, as it would be for x itself."""

    function: Callable[..., torch.Tensor]
    tensors: tuple[torch.Tensor, ...]



class _NoGradContext:
    """Stands in for an autograd ctx when nothing will be differentiated."""

    def save_for_backward(self, *tensors) -> None:
        pass

    def mark_non_differentiable(self, *tensors) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def apply_function(function: type[torch.autograd.Function], *args):
    """function.apply(*args), or its forward alone when grad mode is off: decoding runs a
    handful of tokens per call, where autograd's per-call bookkeeping is a real cost.
    Under torch.compile, the Function's `traced` twin: the same math in plain differentiable
    ops, so that AOTAutograd derives the backward and the compiler fuses across it and picks
    what to save (a hand-written backward would be traced as it is: in-place accumulations
    and pass-through gradients become copies)."""
    if torch.compiler.is_compiling():
        return function.traced(*args)
    if torch.is_grad_enabled():
        return function.apply(*args)
    return function.forward(_NoGradContext(), *args)
