"""The parallel adapter (docs/DESIGN.md section 4): delta(x) = W_up act(W_down x + b_down)
+ b_up beside a decoder layer's MLP, gated by the layer router.

`ParallelAdapter` (attribute `moa_parallel_adapter` of the decoder layer) holds the
weights; `ParallelAdapterHook`, a forward hook on the MLP, adds g * delta(mlp input) to the
MLP output through one fused op (moa_kernels/gated_adapter.py). `NormRecordHook`, on the
norm that feeds the MLP, records that norm's call so that the op saves the norm's input
(kept anyway) instead of the adapter input and recomputes the latter in the backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

from moa.modules.dispatch import Hook, autocast_off, compute_dtype, generate_cached
from moa.modules.layer_router import LayerRouter
from moa_kernels.activations import activation_by_name
from moa_kernels.gated_adapter import gated_adapter
from moa_kernels.torch_ops import InputRecipe


class ParallelAdapter(nn.Module):
    """delta(x) = W_up act(W_down x + b_down) + b_up beside a module (the MLP). In sparse
    modes it still runs on every token, its gate zeroing the inactive ones (it is small).

    down_weight [size, in], down_bias [size], up_weight [out, size], up_bias [out]; weights
    xavier-uniform with gain 1e-4, biases zero (docs/DESIGN.md section 2).
    """

    def __init__(self, in_features: int, out_features: int, size: int,
                 activation: str = "silu", dropout: float = 0.0, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.size = in_features, out_features, size
        self.activation = activation
        self.down_weight = nn.Parameter(torch.empty(size, in_features, **factory))
        self.down_bias = nn.Parameter(torch.zeros(size, **factory))
        self.up_weight = nn.Parameter(torch.empty(out_features, size, **factory))
        self.up_bias = nn.Parameter(torch.zeros(out_features, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = True
        # (norm, input, output, their versions) of the norm call before the MLP
        # (NormRecordHook): the backward recomputes the adapter input from the norm's input,
        # which the norm saves anyway, rather than saving the adapter input itself
        self.norm_record: tuple | None = None
        if self.down_weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.down_weight, gain=1e-4)
        nn.init.xavier_uniform_(self.up_weight, gain=1e-4)
        self.down_bias.zero_()
        self.up_bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """delta [..., out] for x [..., in], in x's compute dtype (autocast's if on)."""
        dtype = compute_dtype(x)
        with autocast_off(x):
            x = self.dropout(x.to(dtype))
            hidden = F.linear(x, self.down_weight.to(dtype), self.down_bias.to(dtype))
            hidden = activation_by_name(self.activation).function(hidden)
            return F.linear(hidden, self.up_weight.to(dtype), self.up_bias.to(dtype))

    def add_to(self, out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor,
               input_recipe: InputRecipe | None = None) -> torch.Tensor:
        """out + gate * delta(x) as a new tensor of out's dtype (out [..., out_features],
        x [..., in_features], gate [..., 1]): one fused op (moa_kernels/gated_adapter.py)
        that saves x (or, with input_recipe, what recomputes x bitwise) and the bottleneck,
        not delta, for the backward. The recipe is used only where x enters the op as given
        (no dropout, no cast)."""
        dtype = compute_dtype(x)
        weights = generate_cached(self, ("weights", dtype), lambda: tuple(
            w.to(dtype) for w in (self.down_weight, self.down_bias, self.up_weight,
                                  self.up_bias)))
        if x.dtype != dtype or (self.training and isinstance(self.dropout, nn.Dropout)):
            input_recipe = None
        with autocast_off(x):
            if x.dtype != dtype:
                x = x.to(dtype)
            if gate.dtype != dtype:
                gate = gate.to(dtype)
            return gated_adapter(out, self.dropout(x), gate, *weights, self.activation,
                                 input_recipe)

    def mlp_hook(self, router: LayerRouter, index: int, who: str) -> Callable:
        """A forward hook (with_kwargs) on the MLP adding g_index * delta(mlp input)."""
        return ParallelAdapterHook(self, router, index, who)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"size={self.size}, activation={self.activation}")



class ParallelAdapterHook(Hook):
    """Forward hook (with_kwargs) on the MLP: output + g_index * adapter(mlp input)."""

    def __init__(self, adapter: ParallelAdapter, router: LayerRouter, index: int,
                 who: str) -> None:
        self.adapter, self.router, self.index, self.who = adapter, router, index, who

    def __call__(self, module: nn.Module, args, kwargs, output):
        record = self.adapter.norm_record
        if record is not None:  # (no write otherwise: a decoding step stores nothing here)
            self.adapter.norm_record = None
        if not self.adapter.active:
            return None
        x = args[0] if args else kwargs[list(kwargs)[0]]  # the MLP input, by any name
        gate = self.router.gates_for(self.index, self.index + 1, x, self.who)
        recipe = None
        if record is not None and record[2] is x and \
                (record[1]._version, x._version) == record[3]:
            recipe = InputRecipe(record[0].forward, (record[1],))
        return self.adapter.add_to(output, x, gate, recipe)


NORM_CLASS_SUFFIXES = ("RMSNorm", "LayerNorm")


def is_pure_norm(module: nn.Module) -> bool:
    """A layer or RMS norm: its output is a function of its input and weights alone."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or \
        type(module).__name__.endswith(NORM_CLASS_SUFFIXES)


class NormRecordHook(Hook):
    """Forward hook (with_kwargs) on a norm that may feed the MLP: keeps (norm, input,
    output, their versions) in the parallel adapter's `norm_record`, where the output is
    norm.forward(input) exactly: in grad mode, eagerly, one positional input, and no other
    hook on the norm or global hook that could have changed it. The adapter's MLP hook takes
    the record when the MLP input is that output (identity) and neither was changed in place
    since (versions), and clears it in any case."""

    def __init__(self, adapter: ParallelAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, args, kwargs, output) -> None:
        if self.adapter.norm_record is not None:
            self.adapter.norm_record = None
        if not torch.is_grad_enabled() or torch.compiler.is_compiling() or kwargs or \
                len(args) != 1 or not isinstance(output, torch.Tensor):
            return
        if len(module._forward_hooks) != 1 or module._forward_pre_hooks or \
                module_globals._global_forward_hooks or \
                module_globals._global_forward_pre_hooks:
            return
        self.adapter.norm_record = (module, args[0], output,
                                    (args[0]._version, output._version))


__all__ = ["NormRecordHook", "ParallelAdapter", "ParallelAdapterHook", "is_pure_norm"]
