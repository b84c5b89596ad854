"""Model-level experts of the paper topology (docs/DESIGN.md section 4) and their hooks.

With `router_scope="layer"` each decoder layer gets:

- `LayerRouter` (attribute `moa_router` of the layer): reads the output of the layer's
  `input_layernorm` (a forward hook) and produces the gates [B, S, E] of every expert of the
  layer, in this order: the experts of each adapted module in module order, then the
  parallel adapter, then the prompt expert, split once per forward into the consumers'
  slices. Each adapted `MoALinear` (router=None) takes its slice through its `gate_source`
  (a `LayerGates`) when it is called without `gates=`.
- `ParallelAdapter` (attribute `moa_parallel_adapter` of the layer): beside the MLP; a
  forward hook adds g * (W_up act(W_down x + b_down) + b_up) to the MLP output, x being the
  MLP input (the post-attention-norm output).
- `PromptExpert` (attribute `moa_prompt` of the attention module, Llama, Mistral, Qwen2 and
  Qwen3 families): P [L, hidden] learned vectors; K_p = k_proj(P), V_p = v_proj(P) with the
  frozen projections (no rotary); per head h, o_p = gate_h * softmax(q K_p^T / sqrt(D)) V_p
  with q the attention's post-rotary query; g * o_p is added to the o_proj input.

The prompt expert needs the post-rotary query, which the attention module never exposes. It
is rebuilt from what the module does expose, with three hooks: a pre-hook on the attention
module keeps `position_embeddings` (cos, sin); a forward hook on `q_norm` (Qwen3) or
`q_proj` (the others) keeps the query before rotary, the q_proj LoRA included; a pre-hook on
`o_proj` rotates it (the family's rotate-half rotary on the query alone, `rotate_half_query`,
or the family's own `apply_rotary_pos_emb`) and adds the prompt output.
Nothing of the attention forward is copied, so a new attention backend or cache type does
not change the wiring.

Every hook stands down when its module's `active` flag is off (`MoAModel.disable_adapters`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

from moa.config import RouterConfig
from moa.families import GENERIC, ModelFamily, rotary_function
from moa.layers import (
    ORDINARY_TENSOR_TYPES,
    MoALinear,
    MoARouter,
    autocast_off,
    compute_dtype,
    generate_cached,
    is_plain_linear,
    resolve_backend,
)
from moa_kernels import torch_ops
from moa_kernels.layer_experts import (
    gated_adapter,
    prompt_attention,
    prompt_attention_recipe,
    prompt_expert,
)
from moa_kernels.reference import ACTIVATION_FUNCTIONS
from moa_kernels.torch_ops import InputRecipe, host_reads_are_free


class GateCollector:
    """Collects the applied gates [T, E] (with their graph) of every router call while
    `active`, for the auxiliary load-balancing loss. With a `token_mask` [B, S] (the
    attention mask of the call), a router call over those same B x S tokens (as [B, S, E]
    or flattened to [B * S, E]) keeps only the tokens the mask marks: padding does not count
    towards the balance. Calls over other tokens (an encoder-decoder's decoder, say) count
    every token. The masked tokens are left out on the CPU; elsewhere (where selecting rows
    by a mask would synchronise the host with the device) their gates are zeroed instead,
    which `load_balancing_loss` counts exactly as no token."""

    def __init__(self) -> None:
        self.active = False
        self.gates: list[torch.Tensor] = []
        self.token_mask: torch.Tensor | None = None

    def add(self, gates: torch.Tensor) -> None:
        if not self.active:
            return
        flat = gates.reshape(-1, gates.shape[-1])
        mask = self.token_mask
        if mask is not None and (tuple(gates.shape[:-1]) == tuple(mask.shape)
                                 or (gates.dim() == 2 and flat.shape[0] == mask.numel())):
            keep = mask.reshape(-1).bool()
            if host_reads_are_free(flat.device):
                flat = flat[keep]
            else:  # a boolean selection syncs: zero gates, which the loss counts as no token
                flat = torch.where(keep[:, None], flat, 0.0)
        self.gates.append(flat)


def load_balancing_loss(gates: torch.Tensor) -> torch.Tensor:
    """Switch-style load-balancing loss of one router call, E * sum_e f_e * P_e.

    Args:
        gates: [T, E] the applied gates (with grad).
    Returns:
        a scalar: P_e is the mean over tokens of the token's gates normalised to sum 1
        (tokens whose gates are all zero count as zero), f_e the fraction of those tokens
        whose largest gate is expert e (no gradient). It is 1 for a uniform router.
    """
    gates = gates.float()
    num_experts = gates.shape[-1]
    total = gates.sum(dim=-1, keepdim=True)
    routed = (total > 0).squeeze(-1)
    shares = gates / torch.where(total > 0, total, torch.ones_like(total))
    count = routed.sum().clamp_min(1)
    mean_share = shares.sum(dim=0) / count
    # one-hot of the largest gate by a comparison: F.one_hot reads its input's range on the
    # host (a sync) on some devices
    experts = torch.arange(num_experts, device=gates.device)
    top = (gates.argmax(dim=-1, keepdim=True) == experts).float() * routed[:, None]
    fraction = (top.sum(dim=0) / count).detach()
    return num_experts * (fraction * mean_share).sum()


# ---------------------------------------------------------------------------------------
# the layer router
# ---------------------------------------------------------------------------------------

class RoutingContext:
    """What the layer-level experts of one model share about the current forward: the 2-D
    attention mask [B, S] it was given (captured by a pre-hook on the model), inside
    MoAModel.generate whether instance gates computed from the prompt are reused, and the
    prompt experts' rotary operands."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        self.reuse_instance_gates = False
        # (cos, sin, their rotary_operands) of the current forward, for the prompt experts
        self.rotary: tuple | None = None

    def model_pre_hook(self, module: nn.Module, args, kwargs) -> None:
        self.rotary = None
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 \
            else None


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean over the sequence of x [B, S, H] -> [B, H], counting only the tokens that the
    attention mask [B, S] marks (all of them without a mask, or with one of another shape)."""
    if mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
        return x.mean(dim=1)
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class GroupGates(nn.Module):
    """UniPELT-style gates: one sigmoid gate per adapter group, g_e = sigmoid(w_k . x + b_k)
    for every expert e of group k (router kind "group").

    weight [K, in] (nn.Linear's default init), bias [K] (zeros): one Linear(in, 1) per group.
    """

    def __init__(self, in_features: int, groups: list[int], config: RouterConfig, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        order = sorted(set(groups))
        self.config, self.in_features, self.num_groups = config, in_features, len(order)
        self.weight = nn.Parameter(torch.empty(len(order), in_features, device=device,
                                               dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(len(order), device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("group_index", torch.tensor([order.index(g) for g in groups],
                                                         device=device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gates [..., E] for x [..., in], in x's compute dtype."""
        dtype = compute_dtype(x)
        with autocast_off(x):
            logits = F.linear(x.to(dtype), self.weight.to(dtype), self.bias.to(dtype))
            return torch.sigmoid(logits).index_select(-1, self.group_index)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, groups={self.num_groups}"


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
            flat = normed.reshape(-1, self.hidden_size).to(dtype)
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
        return gates.to(dtype).reshape(*normed.shape[:-1], self.num_experts)

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
                    resolve_backend(layer.backend, device) != "torch" or \
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
                gates = self.router(normed)
        if self.router is not None and self.collector is not None:
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
            return self.prompt_gates
        mask = None if context is None else context.attention_mask
        gates = self.router(masked_mean(normed, mask)[:, None, :])
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


class _Hook:
    """Base of the hooks below: plain callable objects rather than closures, so that
    copy.deepcopy of a model carries hooks that point at the copied modules."""


class LayerGates(_Hook):
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


class CollectingHook(_Hook):
    """Forward pre-hook for a MoALinear with its own router: while the collector is active,
    route here (keeping the gates' graph for the auxiliary loss) and pass the gates on."""

    def __init__(self, collector: GateCollector) -> None:
        self.collector = collector

    def __call__(self, module: MoALinear, args, kwargs):
        # Route here on every call, collecting or not, so that a checkpoint's recompute
        # takes the same path as the forward it replays.
        if not module.active or kwargs.get("gates") is not None or len(args) > 1:
            return None
        x = args[0] if args else kwargs["x"]
        gates = module.route(x)
        self.collector.add(gates)
        return args, {**kwargs, "gates": gates, "sparse": module.router.config.is_sparse}


def collecting_pre_hook(collector: GateCollector) -> Callable:
    """A forward pre-hook (with_kwargs) for a MoALinear with its own router: see
    CollectingHook."""
    return CollectingHook(collector)


# ---------------------------------------------------------------------------------------
# the parallel adapter
# ---------------------------------------------------------------------------------------

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
            hidden = ACTIVATION_FUNCTIONS[self.activation](hidden)
            return F.linear(hidden, self.up_weight.to(dtype), self.up_bias.to(dtype))

    def add_to(self, out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor,
               input_recipe: InputRecipe | None = None) -> torch.Tensor:
        """out + gate * delta(x) as a new tensor of out's dtype (out [..., out_features],
        x [..., in_features], gate [..., 1]): one fused op (moa_kernels/layer_experts.py)
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
            x = self.dropout(x.to(dtype))
            return gated_adapter(out, x, gate.to(dtype), *weights, self.activation,
                                 input_recipe)

    def mlp_hook(self, router: LayerRouter, index: int, who: str) -> Callable:
        """A forward hook (with_kwargs) on the MLP adding g_index * delta(mlp input)."""
        return ParallelAdapterHook(self, router, index, who)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"size={self.size}, activation={self.activation}")


# ---------------------------------------------------------------------------------------
# the prompt expert
# ---------------------------------------------------------------------------------------

def _frozen(linear: nn.Module) -> nn.Module:
    return linear.base if isinstance(linear, MoALinear) else linear


def frozen_projection(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base(x) in x's dtype for a frozen projection: a plain nn.Linear's weights are cast to
    x's dtype; any other base (quantized, hooked) is called as a module."""
    if is_plain_linear(base):
        return F.linear(x, base.weight.to(x.dtype),
                        None if base.bias is None else base.bias.to(x.dtype))
    return base(x).to(x.dtype)


class CapturedAttentionInputs:
    """The pre-rotary query and the position embeddings (cos, sin) of the attention call
    in progress, as the prompt expert's hooks capture them."""

    __slots__ = ("query", "position_embeddings")

    def __init__(self) -> None:
        self.query: torch.Tensor | None = None
        self.position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None


class PromptExpert(nn.Module):
    """Prompt tuning as an attention expert (docs/DESIGN.md section 4).

    prompt [L, hidden] init N(0, 1); gate [num_heads] init 0 (so it adds nothing at first).
    The query is taken after the rotary embedding and the prompt keys have none, so its
    output depends on absolute positions: with left padding pass position_ids that skip
    the padding (generate does).
    """

    def __init__(self, attention: nn.Module, length: int, hidden_size: int, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.length, self.hidden_size = length, hidden_size
        self.head_dim = attention.head_dim
        self.num_heads = attention.config.num_attention_heads
        self.num_kv_heads = attention.config.num_key_value_heads
        self.prompt = nn.Parameter(torch.empty(length, hidden_size, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.zeros(self.num_heads, device=device, dtype=dtype))
        if self.prompt.device.type != "meta":
            nn.init.normal_(self.prompt)
        self.active = True
        self.cache_keys_values = False  # on only inside MoAModel.generate (prompt_key_cache)
        # (dtype, keys, values, {batch: the two expanded}) while cache_keys_values
        self._keys_values = None
        # what the hooks capture of the current attention call (a plain object: storing
        # into it costs no nn.Module attribute machinery, twice per layer and token)
        self.captured = CapturedAttentionInputs()

    def keys_and_gated_values(self, k_proj: nn.Module, v_proj: nn.Module,
                              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt keys times head_dim^-0.5 [H, L, D] and values times the per-head gate
        [H, L, D], KV heads repeated for grouped-query attention (query head h reads KV
        head h // groups).

        They depend only on the prompt, the gate and the frozen projections, so within one
        `generate` call without grad mode (see prompt_key_cache) they are computed once."""
        caching = self.cache_keys_values and not torch.is_grad_enabled()
        cached = self._keys_values
        if caching and cached is not None and cached[0] == dtype:
            return cached[1], cached[2]
        if torch.compiler.is_compiling():
            caching = False  # read a cache filled eagerly, write none inside a graph
        prompt = self.prompt.to(dtype)
        keys, values = frozen_projection(k_proj, prompt), frozen_projection(v_proj, prompt)
        groups = self.num_heads // self.num_kv_heads
        keys = keys.view(self.length, self.num_kv_heads, self.head_dim).transpose(0, 1)
        values = values.view(self.length, self.num_kv_heads, self.head_dim).transpose(0, 1)
        keys = keys.repeat_interleave(groups, dim=0) * self.head_dim ** -0.5  # [H, L, D]
        values = values.repeat_interleave(groups, dim=0) * self.gate.to(dtype)[:, None, None]
        if caching:
            self._keys_values = (dtype, keys, values, {})
        return keys, values

    def _batched_keys_values(self, keys, values, batch: int):
        """keys and values expanded to [B, H, L, D]; the views are kept with the cached
        keys while decoding (one expand per generate call, not per token)."""
        cached = self._keys_values
        expanded = cached[3] if cached is not None and cached[1] is keys else None
        if expanded is not None and batch in expanded:
            return expanded[batch]
        pair = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
        if expanded is not None and not torch.compiler.is_compiling():
            expanded[batch] = pair
        return pair

    def add_output(self, x: torch.Tensor, query: torch.Tensor, gate: torch.Tensor,
                   k_proj: nn.Module, v_proj: nn.Module, *, with_recipe: bool = False):
        """x + gate * o_p as a new tensor of x's dtype, for the post-rotary query
        [B, H, S, D], x [B, S, H * D] (the o_proj input) and the router's gate [B, S, 1]:
        one fused op (moa_kernels/layer_experts.py) that saves the query, the prompt keys,
        values and the gate, not o_p, for the backward. Computes in the query's dtype
        (autocast's, when autocast is on). with_recipe: return (output, the InputRecipe
        that recomputes it)."""
        dtype = compute_dtype(query)
        with autocast_off(query):
            if torch.is_grad_enabled() and is_plain_linear(k_proj) and is_plain_linear(v_proj):
                # training: one op for the keys, values and the attention (their graph
                # would be a dozen small ops and their gradients as many)
                query, gate = query.to(dtype), gate.to(dtype)
                y, keys, gated_values = prompt_expert(
                    x, query, gate, self.prompt, self.gate, k_proj.weight, k_proj.bias,
                    v_proj.weight, v_proj.bias, self.num_kv_heads)
                operands = (x, query, keys, gated_values, gate)
            else:
                keys, gated_values = self.keys_and_gated_values(k_proj, v_proj, dtype)
                if not torch.is_grad_enabled():
                    keys, gated_values = self._batched_keys_values(keys, gated_values,
                                                                   query.shape[0])
                operands = (x, query.to(dtype), keys, gated_values, gate.to(dtype))
                y = prompt_attention(*operands)
            return (y, prompt_attention_recipe(*operands)) if with_recipe else y

    def output(self, query: torch.Tensor, k_proj: nn.Module, v_proj: nn.Module) -> torch.Tensor:
        """o_p [B, S, H * D] for the post-rotary query [B, H, S, D] (before g_prompt)."""
        batch, heads, tokens, head_dim = query.shape
        zeros = query.new_zeros(batch, tokens, heads * head_dim)
        return self.add_output(zeros, query, query.new_ones(batch, tokens, 1), k_proj, v_proj)

    # ---- hooks ---------------------------------------------------------------------------

    def attention_pre_hook(self, module: nn.Module, args, kwargs) -> None:
        if self.active:
            self.captured.position_embeddings = kwargs.get(
                "position_embeddings", args[1] if len(args) > 1 else None)

    def query_hook(self, module: nn.Module, args, output) -> None:
        if self.active:
            self.captured.query = output

    def extra_repr(self) -> str:
        return f"length={self.length}, hidden_size={self.hidden_size}, heads={self.num_heads}"


class ParallelAdapterHook(_Hook):
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


class NormRecordHook(_Hook):
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


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (checkpointing, offloading) are on; True where this torch
    cannot say."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


# How many autograd nodes back from the attention output its attention node is looked for
# (view, copy, transpose: the reshapes between an attention kernel and o_proj).
ATTENTION_NODE_DEPTH = 4
# How many autograd nodes back from the attention's query the captured pre-rotary query is
# looked for (the rotary's add and multiply, the head transpose and view: 4 for Llama).
ROTARY_NODE_DEPTH = 6


def attention_saved_query(attention_output: torch.Tensor, captured_query: torch.Tensor,
                          shape: torch.Size) -> torch.Tensor | None:
    """The post-rotary query [B, H, S, D] (`shape`) the attention kernel saved for its own
    backward, where its metadata show it is the query the prompt expert would rebuild from
    `captured_query` (the q_proj or q_norm output before the rotary): else None.

    Saving that tensor rather than a rebuilt copy costs the prompt expert's backward nothing
    (the kernel keeps it until its own backward, which runs later), and the expert need not
    rebuild the query at all. Looked for only in grad mode, eagerly, with no saved-tensor
    hooks active (reading a saved tensor under checkpointing or offloading hooks would
    unpack it), a few nodes up the graph of the attention output (o_proj's input): a node
    that saved a `query` (the fused attention kernels do; eager attention saves none under
    that name). It is taken when it is the output of an add (the rotary's last op, q cos +
    rotate_half(q) sin) computed, within ROTARY_NODE_DEPTH autograd nodes, from this very
    captured query, with the expected shape: the family's rotary on the captured query,
    which is what the expert rebuilds. Nothing is read of its values (a comparison would
    synchronise the host with an accelerator at every layer); a query changed between the
    rotary and the kernel (scaled, cast, copied) has another last op and is not taken."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or \
            attention_output.grad_fn is None or captured_query.grad_fn is None or \
            saved_tensor_hooks_active():
        return None
    nodes, seen = [attention_output.grad_fn], set()
    for _ in range(ATTENTION_NODE_DEPTH):
        following = []
        for node in nodes:
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if hasattr(node, "_saved_query"):
                saved = node._saved_query
                if saved.shape == shape and type(saved.grad_fn).__name__ == "AddBackward0" \
                        and _reaches(saved.grad_fn, captured_query.grad_fn, ROTARY_NODE_DEPTH):
                    return saved
                return None
            following += [next_node for next_node, _ in node.next_functions]
        nodes = following
    return None


def _reaches(start, target, depth: int) -> bool:
    """Whether autograd node `target` is `start` or among its inputs' nodes within `depth`
    steps back."""
    nodes, seen = [start], set()
    for _ in range(depth + 1):
        following = []
        for node in nodes:
            if node is target:
                return True
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            following += [next_node for next_node, _ in node.next_functions]
        nodes = following
    return False


def rotate_half_query(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      operands: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> torch.Tensor:
    """query [B, H, S, D] under transformers' rotate-half rotary embedding, q cos +
    rotate_half(q) sin for cos and sin [B, S, D], bitwise equal to it: rotate_half(q) =
    cat(-q2, q1) is roll(q, D / 2) times -1 on the first half of D and +1 on the second,
    and that sign is folded into sin (sign flips and a roll are exact). So the query alone
    takes 4 ops (the family's function with an empty key takes 18). operands: the
    `rotary_operands(cos, sin)`, shared by every layer of one forward, or None."""
    cos4, signed_sin4 = rotary_operands(cos, sin) if operands is None else operands
    return query * cos4 + query.roll(query.shape[-1] // 2, -1) * signed_sin4


def rotary_operands(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos [B, 1, S, D], sin [B, 1, S, D] times -1 on the first half of D), for
    rotate_half_query."""
    head_dim = sin.shape[-1]
    signs = torch.ones(head_dim, dtype=sin.dtype, device=sin.device)
    signs[:head_dim // 2].fill_(-1.0)  # (a fill: an item assignment copies a host scalar)
    return cos.unsqueeze(1), sin.unsqueeze(1) * signs


class PromptOutputHook(_Hook):
    """Forward pre-hook (with_kwargs) on o_proj: rebuilds the post-rotary query from what the
    prompt expert captured and adds g_index * o_p to the o_proj input [B, S, H * D]."""

    def __init__(self, prompt: PromptExpert, attention: nn.Module, router: LayerRouter,
                 index: int, who: str, family: ModelFamily = GENERIC) -> None:
        self.prompt, self.attention, self.router = prompt, attention, router
        self.index, self.who, self.family = index, who, family
        self.rotary = rotary_function(family, attention)  # looked up once

    def _rotary_operands(self, cos: torch.Tensor, sin: torch.Tensor):
        """rotary_operands(cos, sin), computed once per forward for all layers (kept in the
        model's RoutingContext, eagerly: under torch.compile they are fused anyway)."""
        context = self.router.context
        if context is None or torch.compiler.is_compiling():
            return rotary_operands(cos, sin)
        kept = context.rotary
        if kept is None or kept[0] is not cos or kept[1] is not sin:
            kept = context.rotary = (cos, sin, rotary_operands(cos, sin))
        return kept[2]

    def __call__(self, module: nn.Module, args, kwargs):
        prompt, attention = self.prompt, self.attention
        if not prompt.active:
            return None
        captured = prompt.captured
        query, position_embeddings = captured.query, captured.position_embeddings
        captured.query = captured.position_embeddings = None
        if query is None or position_embeddings is None:
            raise RuntimeError(f"{self.who}: the prompt expert did not see this forward's "
                               "query and position embeddings")
        key = None if args else list(kwargs)[0]  # o_proj's input, by any keyword name
        x = args[0] if args else kwargs[key]
        batch, tokens = x.shape[:2]
        pre_rotary = query.reshape(batch, tokens, -1, prompt.head_dim).transpose(1, 2)
        query = attention_saved_query(x, query, pre_rotary.shape)
        if query is None:  # rebuilt: the family's rotary on the captured query
            cos, sin = position_embeddings
            if self.family.rotate_half:
                query = rotate_half_query(pre_rotary, cos, sin, self._rotary_operands(cos, sin))
            else:  # the family's rotary rotates a key too: give it none (zero heads)
                query, _ = self.rotary(pre_rotary, pre_rotary[:, :0], cos, sin)
        gate = self.router.gates_for(self.index, self.index + 1, x, self.who)
        # o_proj's shrink needs its input for d A: it recomputes it (module.next_input_recipe)
        # from what the attention and this expert save anyway.
        recompute = isinstance(module, MoALinear) and torch.is_grad_enabled() and \
            not torch.compiler.is_compiling()
        x = prompt.add_output(x, query, gate, _frozen(getattr(attention, self.family.key)),
                              _frozen(getattr(attention, self.family.value)),
                              with_recipe=recompute)
        if recompute:
            x, recipe = x
            module.next_input_recipe = (x, recipe)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, key: x}


@contextmanager
def prompt_key_cache(model: nn.Module) -> Iterator[None]:
    """Inside (MoAModel.generate), what is fixed over the call is computed once and reused
    while grad mode is off (the weights cannot change during one `generate`): every prompt
    expert's keys and values, and every MoA module's casts and concatenations of its weights
    (`generate_cache`, see moa.layers.generate_cached). Everything is dropped on exit."""
    prompts = [m for m in model.modules() if isinstance(m, PromptExpert)]
    cached = [m for m in model.modules()
              if isinstance(m, (MoALinear, MoARouter, ParallelAdapter, LayerRouter))]
    for prompt in prompts:
        prompt.cache_keys_values = True
    for module in cached:
        module.generate_cache = {}
    try:
        yield
    finally:
        for prompt in prompts:
            prompt.cache_keys_values = False
            prompt._keys_values = None
        for module in cached:
            module.generate_cache = None
            if isinstance(module, LayerRouter):
                module.state.shrink_input = module.state.shrink_outputs = None


def attach_prompt(attention: nn.Module, prompt: PromptExpert, router: LayerRouter,
                  index: int, name: str, family: ModelFamily = GENERIC) -> list:
    """Register the prompt expert's three hooks (where `family` says the attention keeps
    its query, query norm and output projection); returns their handles."""
    query_module = getattr(attention, family.query_norm or family.query)
    return [
        attention.register_forward_pre_hook(prompt.attention_pre_hook, with_kwargs=True),
        query_module.register_forward_hook(prompt.query_hook),
        getattr(attention, family.output).register_forward_pre_hook(
            PromptOutputHook(prompt, attention, router, index, f"prompt expert of {name}",
                             family), with_kwargs=True),
    ]


__all__ = ["GateCollector", "GroupGates", "LayerGates", "LayerRouter", "NormRecordHook",
           "ParallelAdapter", "PromptExpert", "RoutingContext", "instance_gate_reuse",
           "is_pure_norm", "load_balancing_loss", "masked_mean", "prompt_key_cache",
           "rotary_operands", "rotate_half_query"]
