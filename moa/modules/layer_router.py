"""One router for a whole decoder layer (docs/DESIGN.md section 4), router_scope "layer" or
"instance".

`LayerRouter` (attribute `moa_router` of the decoder layer) reads the output of the layer's
`input_layernorm` (a forward hook; or its input, the residual stream) and produces the
gates [B, S, E] of every expert of the layer, in this order: the experts of each adapted
module in module order, then the parallel adapter, then the prompt expert, split once per
forward into the consumers' slices. Each adapted `MoALinear` (router=None) takes its slice
through its `gate_source` (a `LayerGates`) when it is called without `gates=`; the parallel
adapter's and the prompt expert's hooks call `gates_for`. Where the query, key and value
projections read what the router reads, one GEMM computes the router's first layer and
their shrinks (`share_shrinks_with`). `RoutingContext` is what the layer routers of one
model share about the current forward (the attention mask, generate's instance-gate reuse).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from moa.config import RouterConfig
from moa.modules.aux_loss import GateCollector
from moa.modules.dispatch import (
    ORDINARY_TENSOR_TYPES,
    Hook,
    autocast_off,
    compute_dtype,
    generate_cached,
    is_plain_linear,
    resolve_backend,
)
from moa.modules.linear import MoALinear
from moa.modules.router import GroupGates, MoARouter
from moa_kernels import torch_ops
from moa_kernels.contract import SHRINK_OUTPUT, accepts


class RoutingContext:
    """What the layer-level experts of one model share about the current forward: the 2-D
    attention mask [B, S] it was given (captured by MaskPreHook on the decoder stack), inside
    MoAModel.generate whether instance gates computed from the prompt are reused, and the
    prompt experts' rotary operands."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        self.reuse_instance_gates = False
        # (cos, sin, their rotary_operands) of the current forward, for the prompt experts
        self.rotary: tuple | None = None


class MaskPreHook(Hook):
    """Forward pre-hook (with_kwargs) on a model or its decoder stack: hands the routing
    context the 2-D attention mask of each call, given by keyword or by position."""

    def __init__(self, context: RoutingContext, module: nn.Module) -> None:
        self.context = context
        parameters = list(inspect.signature(module.forward).parameters)
        self.position = parameters.index("attention_mask") \
            if "attention_mask" in parameters else None

    def __call__(self, module: nn.Module, args, kwargs) -> None:
        self.context.rotary = None
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and self.position < len(args):
            mask = args[self.position]
        self.context.attention_mask = mask if isinstance(mask, torch.Tensor) and \
            mask.dim() == 2 else None


class RecomputeMaskHook(Hook):
    """Forward pre-hook on a decoder layer's input norm under instance routing. With
    gradient checkpointing the layer runs again inside the backward pass, when a later
    forward may have replaced the context's mask: each checkpointed forward's mask is kept by
    the layer's input (the hidden states' storage, shape and device, which the recompute is
    given again, detached or not) and handed back to the recompute of that input. At most
    KEPT masks are kept (forwards never followed by a backward leave theirs)."""

    KEPT = 16

    def __init__(self, context: RoutingContext, layer: nn.Module) -> None:
        self.context, self.layer = context, layer
        self.masks: dict[tuple, torch.Tensor | None] = {}

    def __call__(self, norm: nn.Module, args) -> None:
        layer = self.layer
        if not (layer.training and getattr(layer, "gradient_checkpointing", False)) or \
                not args or not isinstance(args[0], torch.Tensor) or \
                torch.compiler.is_compiling():
            return
        hidden = args[0]
        key = (hidden.data_ptr(), tuple(hidden.shape), hidden.device)
        if torch._C._current_graph_task_id() >= 0:  # inside backward: a recompute
            if key in self.masks:
                self.context.attention_mask = self.masks.pop(key)
            return
        self.masks.pop(key, None)  # the newest forward on this storage holds it
        self.masks[key] = self.context.attention_mask
        while len(self.masks) > self.KEPT:
            del self.masks[next(iter(self.masks))]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean over the sequence of x [B, S, H] -> [B, H], counting only the tokens that the
    attention mask [B, S] marks (all of them without a mask, or with one of another shape)."""
    if mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
        return x.mean(dim=1)
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class RouterState:
    """What a layer router computed in the current forward (a plain object: storing into it
    costs none of nn.Module's attribute machinery, once per layer and token): the gates
    [..., E] with their graph, their consumers' slices (eagerly), and the shrink outputs
    its GEMM computed for the MoALinears that read its input (see
    LayerRouter.share_shrinks_with) with that input; None where absent."""

    __slots__ = ("gates", "gate_parts", "shrink_input", "shrink_outputs")

    def __init__(self) -> None:
        self.gates: torch.Tensor | None = None
        self.gate_parts: dict[tuple[int, int], torch.Tensor] | None = None
        self.shrink_input: torch.Tensor | None = None
        self.shrink_outputs: dict[int, torch.Tensor] | None = None


class LayerRouter(nn.Module):
    """One router for a whole decoder layer (docs/DESIGN.md section 4).

    Args:
        hidden_size: width of what it reads (the input norm's output, or the residual).
        expert_names: a name per gated expert, in gate order.
        config: the RouterConfig, or None for constant gates of 1.
        collector: where its gates go for the auxiliary loss, or None.
        scope: "layer" (gates per token) or "instance" (one gate vector per sequence, from
            the mean over the sequence, padding left out through `context`'s attention mask).
        groups: for a "group" router, the adapter group of each expert.
        context: the model's RoutingContext (the attention mask; generate's reuse flag).
    Attributes:
        gates: [B, S, E] ([B, 1, E] for instance scope) the gates of the current forward
            (with their graph), set by the input-norm hook; last_gates: the same, detached,
            for `router_stats`.
    """

    def __init__(self, hidden_size: int, expert_names: list[str],
                 config: RouterConfig | None, collector: GateCollector | None = None, *,
                 scope: str = "layer", groups: list[int] | None = None,
                 context: RoutingContext | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.expert_names = list(expert_names)
        self.num_experts = len(self.expert_names)
        self.scope = scope
        factory = {"device": device, "dtype": dtype}
        if config is None:
            self.router = None
        elif config.kind == "group":
            if groups is None or len(groups) != self.num_experts:
                raise ValueError("a 'group' router needs the group of each expert")
            self.router = GroupGates(hidden_size, groups, config, **factory)
        else:
            self.router = MoARouter(hidden_size, self.num_experts, config, **factory)
        self.collector = collector
        self.context = context
        self.active = True
        self.state = RouterState()
        self.prompt_gates: torch.Tensor | None = None  # instance gates kept over a generate
        # The (start, stop) gate slices of the layer's consumers, in order (split_for):
        # route() then splits the gates once, in one op, and gates_for hands out the parts.
        self.consumer_slices: tuple[tuple[int, int], ...] = ()
        # (gate start, MoALinear) of the layer's linears that read what the router reads
        # (share_shrinks_with); generate_cache: on inside MoAModel.generate (prompt_key_cache)
        self.shrink_sharers: tuple[tuple[int, MoALinear], ...] = ()
        self.shares_shrinks = False  # (what route reads: under torch.compile a bool guard,
        # not guards on every element of shrink_sharers)
        self.generate_cache: dict | None = None

    def split_for(self, slices: list[tuple[int, int]]) -> None:
        """Declare the gate slices the layer's experts read: (start, stop) pairs that tile
        0..num_experts in order."""
        edges = [start for start, _ in slices] + [slices[-1][1]] if slices else [0]
        if edges[0] != 0 or edges[-1] != self.num_experts or \
                any(stop != start for (_, stop), (start, _) in zip(slices, slices[1:])) or \
                any(stop <= start for start, stop in slices):
            raise ValueError(f"gate slices {slices} do not tile the {self.num_experts} "
                             "experts in order")
        self.consumer_slices = tuple((start, stop) for start, stop in slices)

    def share_shrinks_with(self, sharers: list[tuple[int, MoALinear]]) -> None:
        """Declare the layer's MoALinears that read exactly what the router reads (the
        attention's query, key and value projections, beside a router on the input norm's
        output), each with the start of its gate slice. One GEMM then computes the
        router's first layer and their shrinks (eagerly in grad mode, and inside
        MoAModel.generate), which they take through their gate source (`LayerGates`)."""
        self.shrink_sharers = tuple(sharers)
        self.shares_shrinks = bool(sharers)

    def _gates_sharing_shrinks(self, normed: torch.Tensor) -> torch.Tensor | None:
        """The gates, with the sharers' shrink outputs kept in `state`, from one GEMM; None
        where that does not apply (then none are kept).

        Inside generate (no grad mode) the stacked weight is made once per call (kept in
        generate_cache); in grad mode `stacked_linear` stacks the blocks once per call and
        returns the router's and each sharer's columns as separate tensors, so their
        gradients need no slicing back into one (its backward: one dx and one dW GEMM for
        the router and the three shrinks). Not under torch.compile in grad mode (the
        outputs kept in `state` would leave the graph), nor without grad mode outside
        generate."""
        state = self.state
        plan = False
        dtype = compute_dtype(normed)
        if self.generate_cache is not None and not torch.is_grad_enabled():
            plan = generate_cached(self, ("shared shrinks", dtype),
                                   lambda: self._stacked_plan(normed.device, dtype))
        elif torch.is_grad_enabled() and not torch.compiler.is_compiling():
            plan = self._sharing_plan(normed.device, dtype)
        if plan is False:
            if state.shrink_input is not None:
                state.shrink_input = state.shrink_outputs = None
            return None
        with autocast_off(normed):
            flat = normed.reshape(-1, self.hidden_size)
            if flat.dtype != dtype:
                flat = flat.to(dtype)
            if isinstance(plan[0], torch.Tensor):  # generate: the weight stacked once
                weight, bias, ops, starts, splits = plan
                outputs = F.linear(flat, weight, bias).split(splits, dim=1)
            else:
                weights, bias_pieces, ops, starts, splits = plan
                outputs = torch_ops.stacked_linear(flat, weights, bias_pieces, splits)
            blocks = len(ops.weight_parts)
            gates, _ = ops.finish(outputs[:blocks])
        state.shrink_input = normed
        state.shrink_outputs = dict(zip(starts, outputs[blocks:]))
        if gates.dtype != dtype:
            gates = gates.to(dtype)
        return gates.reshape(*normed.shape[:-1], self.num_experts)

    def _sharing_plan(self, device: torch.device, dtype: torch.dtype):
        """(weight blocks, bias pieces, router ops, the sharers' gate starts, the column
        counts of the router's first-layer blocks and of each sharer's shrink) of the
        shared GEMM,
        or False where a sharer cannot take its shrink from outside (another backend, a
        base the backends do not fuse, dropout, a sparse router)."""
        if not isinstance(self.router, MoARouter) or self.sparse:
            return False
        ops = self.router.ops(dtype)
        if not all(_materialized(w, self.hidden_size) for w in ops.weight_parts):
            return False
        weights = list(ops.weight_parts)
        bias_pieces = [b if b is not None else w.shape[0]
                       for w, b in zip(ops.weight_parts, ops.bias_parts)]
        starts, splits = [], [w.shape[0] for w in ops.weight_parts]
        for start, layer in self.shrink_sharers:
            if not layer.active or not is_plain_linear(layer.base) or \
                    not accepts(resolve_backend(layer.backend, device), SHRINK_OUTPUT) or \
                    (layer.training and isinstance(layer.dropout, nn.Dropout)) or \
                    not _materialized(layer.shrink_weight, self.hidden_size):
                return False
            layout = layer.layout
            weights.append(layer.shrink_weight)
            bias_pieces += [layout.bias_start, layer.shrink_bias] \
                if layer.shrink_bias is not None else [layout.shrink_rows]
            starts.append(start)
            splits.append(layout.shrink_rows)
        return weights, bias_pieces, ops, starts, splits

    def _stacked_plan(self, device: torch.device, dtype: torch.dtype):
        """`_sharing_plan` with the blocks stacked (for generate, which keeps it)."""
        plan = self._sharing_plan(device, dtype)
        if plan is False:
            return False
        weights, bias_pieces, ops, starts, splits = plan
        bias = None
        if any(isinstance(p, torch.Tensor) for p in bias_pieces):
            bias = torch_ops.stack_rows(bias_pieces, dtype)
        return torch_ops.stack_rows(weights, dtype), bias, ops, starts, splits

    def route(self, normed: torch.Tensor) -> torch.Tensor:
        """Gates for what the router reads, normed [..., hidden]: [..., E] per token, or
        [B, 1, E] per sequence for instance scope ([B, S, hidden] input); kept in `gates`."""
        if self.router is None:
            gates = normed.new_ones(*normed.shape[:-1], self.num_experts)
        elif self.scope == "instance":
            gates = self._instance_gates(normed)
        else:
            gates = self._gates_sharing_shrinks(normed) if self.shares_shrinks else None
            if gates is None:
                gates = self._collected_router_gates(normed)
            elif self.collector is not None:
                self.collector.add(gates)
        state = self.state
        state.gates = gates
        # Eagerly only: under torch.compile the slices fuse anyway, and the parts (views of
        # the gates that outlive the graph) would be graph outputs aliasing one another.
        slices = self.consumer_slices
        if slices and not torch.compiler.is_compiling():
            state.gate_parts = dict(zip(slices, gates.split(
                [stop - start for start, stop in slices], dim=-1)))
        return gates

    @property
    def gates(self) -> torch.Tensor | None:
        """The gates of the current forward (with their graph), or None."""
        return self.state.gates

    @gates.setter
    def gates(self, gates: torch.Tensor | None) -> None:
        self.state.gates = gates

    @property
    def gate_parts(self) -> dict[tuple[int, int], torch.Tensor] | None:
        """The gates split into the consumer slices (eagerly), or None."""
        return self.state.gate_parts

    @gate_parts.setter
    def gate_parts(self, parts: dict[tuple[int, int], torch.Tensor] | None) -> None:
        self.state.gate_parts = parts

    @property
    def last_gates(self) -> torch.Tensor | None:
        """The gates of the last forward, detached (for `router_stats`), or None."""
        gates = self.state.gates
        return gates.detach() if gates is not None and gates.requires_grad else gates

    @last_gates.setter
    def last_gates(self, gates: torch.Tensor | None) -> None:
        self.state.gates = gates

    def _collected_router_gates(self, x: torch.Tensor) -> torch.Tensor:
        """The router's gates for x [..., hidden], handed to the collector (if any); while it
        collects, a router that selects experts hands it its scores and selections too (the
        load-balancing loss reads those: moa/modules/aux_loss.py)."""
        collector = self.collector
        if collector is not None and collector.active and isinstance(self.router, MoARouter) \
                and self.router.config.is_sparse:
            gates, active, scores = self.router(x, balance=True)
            collector.add(gates, active, scores)
            return gates
        gates = self.router(x)
        if collector is not None:
            collector.add(gates)
        return gates

    def _instance_gates(self, normed: torch.Tensor) -> torch.Tensor:
        if normed.dim() != 3:
            raise ValueError(f"instance routing reads [batch, sequence, hidden] inputs, got "
                             f"shape {tuple(normed.shape)}")
        context = self.context
        reuse = context is not None and context.reuse_instance_gates
        if reuse and self.prompt_gates is not None:
            if self.prompt_gates.shape[0] != normed.shape[0]:
                raise RuntimeError(f"instance gates were computed for {self.prompt_gates.shape[0]}"
                                   f" sequences in this generate call, but a decoding step "
                                   f"has {normed.shape[0]}")
            if self.collector is not None:
                self.collector.add(self.prompt_gates)
            return self.prompt_gates
        mask = None if context is None else context.attention_mask
        gates = self._collected_router_gates(masked_mean(normed, mask)[:, None, :])
        if reuse:
            self.prompt_gates = gates
        return gates

    @property
    def sparse(self) -> bool:
        """Whether the gates are masked (threshold, adaptive, topk): the layers then skip
        the experts whose gate is zero."""
        return self.router is not None and self.router.config.is_sparse

    def gates_for(self, start: int, stop: int, x: torch.Tensor, who: str) -> torch.Tensor:
        """The gates [..., stop - start] of experts start..stop-1 for an input x [..., F]
        (instance gates [B, 1, E] broadcast over x's tokens)."""
        state = self.state
        if state.gates is None:
            raise RuntimeError(f"{who} ran before its layer's input norm: the layer router "
                               "has no gates for this forward")
        parts = None if torch.compiler.is_compiling() else state.gate_parts
        gates = parts.get((start, stop)) if parts is not None else None
        if gates is None:
            gates = state.gates[..., start:stop]
        if self.scope == "instance" and x.dim() == 3 and gates.shape[0] == x.shape[0]:
            gates = gates.expand(*x.shape[:-1], stop - start)
        if gates.shape[:-1] != x.shape[:-1]:
            raise RuntimeError(f"{who} got an input of shape {tuple(x.shape)} but its layer "
                               f"router's gates have shape {tuple(self.gates.shape)}; the "
                               "leading (token) dimensions must agree for router_scope "
                               "'layer'")
        return gates

    def input_norm_hook(self, module: nn.Module, args, output) -> None:
        """Forward hook on the layer's input norm (router_input "input_norm")."""
        if self.active:
            self.route(output[0] if isinstance(output, tuple) else output)

    def residual_hook(self, module: nn.Module, args) -> None:
        """Forward pre-hook on the layer's input norm (router_input "residual"): routes on
        the norm's input, the decoder layer's residual stream."""
        if self.active:
            self.route(args[0])

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, scope={self.scope}, experts={self.expert_names}"


def _materialized(weight: torch.Tensor, in_features: int) -> bool:
    """Whether weight is an ordinary tensor holding its rows of in_features values: the
    router reads its sharers' shrink weights without calling them, so a weight whose
    module would first gather it (DeepSpeed ZeRO-3 keeps a partitioned parameter as an
    empty tensor until its module runs) or a sharded one is not shared."""
    return type(weight) in ORDINARY_TENSOR_TYPES and weight.dim() == 2 and \
        weight.shape[1] == in_features


@contextmanager
def instance_gate_reuse(model: nn.Module, context: RoutingContext | None) -> Iterator[None]:
    """Inside (MoAModel.generate), instance routers compute their gates from the prompt on
    the first forward and reuse them at every decoding step."""
    routers = [m for m in model.modules() if isinstance(m, LayerRouter)]
    if context is None:
        yield
        return
    for router in routers:
        router.prompt_gates = None
    context.reuse_instance_gates = True
    try:
        yield
    finally:
        context.reuse_instance_gates = False
        for router in routers:
            router.prompt_gates = None


class LayerGates(Hook):
    """A MoALinear's `gate_source`: its slice start..stop-1 of the layer router's gates and
    the router's sparsity, or None while the router is switched off."""

    def __init__(self, router: LayerRouter, start: int, stop: int, who: str) -> None:
        self.router, self.start, self.stop, self.who = router, start, stop, who
        self.sparse = router.sparse  # fixed with the router's config

    def __call__(self, x: torch.Tensor
                 ) -> tuple[torch.Tensor, bool, torch.Tensor | None] | None:
        """(gates, sparse, the shrink output the router computed for x, or None)."""
        router = self.router
        if not router.active:
            return None
        state = router.state
        shrink = state.shrink_outputs.get(self.start) if state.shrink_input is x else None
        return router.gates_for(self.start, self.stop, x, self.who), self.sparse, shrink

    def last_gates(self) -> torch.Tensor | None:
        """The slice of the router's last gates (detached), or None."""
        gates = self.router.last_gates
        return None if gates is None else gates[..., self.start:self.stop]


def constant_gates_pre_hook(module: MoALinear, args, kwargs):
    """Forward pre-hook for a router-less MoALinear: every expert always on, gate 1."""
    if kwargs.get("gates") is not None or len(args) > 1:
        return None
    x = args[0] if args else kwargs["x"]
    return args, {**kwargs, "gates": x.new_ones(*x.shape[:-1], module.num_experts)}


__all__ = ["LayerGates", "LayerRouter", "MaskPreHook", "RecomputeMaskHook", "RouterState",
           "RoutingContext",
           "constant_gates_pre_hook", "instance_gate_reuse", "masked_mean"]
