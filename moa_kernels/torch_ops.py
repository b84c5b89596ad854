"""Fused pure-PyTorch MoA linear: runs on any device, CPU included.

Plan (T tokens, R stacked shrink rows, C expand columns, F router first-layer width):

The base output is either given (`base_output`: any frozen module, called by the layer) or
computed here from a plain linear's weights (`base_weight`), the fast path of step 1.

Dense (soft mode, or gates given):
  1. `_BaseAndShrink`: y = base(x) and h = x @ [A_stack; W_router1]^T + bias: two GEMMs that
     share the saved x (or, given an `InputRecipe`, the tensors x is recomputed from);
     backward accumulates dx = dy W_base + dh W_shrink in place. With a given base output,
     h = F.linear(x, [A_stack; W_router1]) under plain autograd.
  2. The router finishes from h[:, R:] ([T, F] tensors only; the SwiGLU head saves only
     that view of h, whose storage step 3 keeps anyway).
  3. `_GatedExpand`: u = act(h[:, :R]) * g * scaling per column, then one GEMM
     y + [u, g_adapters] @ [B_stack, up_biases]^T with y as its addend (out of place: no
     tensor another op returned is modified, so autograd, torch.compile and tensor
     subclasses see plain functional ops). Backward recomputes the activations (their
     derivatives by autograd's own backward kernels, one op each: no nested autograd call)
     from the saved h ([T, R]), so nothing of size [T, out] or [T, E, out] is stored; the
     per-expert gate gradients are one small GEMM with the layout's gate map (no scatter).
Sparse (threshold, adaptive, topk):
  1. as above, with the router rows only.
  2. the gates give a `RoutingPlan` (pairs sorted by expert; one host sync, here only).
  3. `_SparseExperts`: per expert, gather its active rows of x into a reused workspace, run
     its shrink and expand, and add the result into a copy of y with index_add (sequential, so
     deterministic, on CPU; on CUDA it is deterministic only under
     torch.use_deterministic_algorithms(True) -- CUDA's default backend is triton, whose
     combine is deterministic). Backward re-gathers x instead of saving the gathered rows, and
     hands its dx pieces to `_BaseAndShrink`, which adds them into the dx it allocates.
  When more than DENSE_ABOVE_ACTIVE_FRACTION of the pairs are active, step 3 is the dense
  `_GatedExpand` with the skipped pairs' hidden zeroed and their gates masked instead (the
  same math, cheaper on CPU); on fewer than SPARSE_PLAN_MIN_TOKENS tokens (decoding) so is
  the whole call, with the shrink fused as in soft mode, and on any device but the CPU
  (`host_reads_are_free`): there the plan's host reads would synchronise the host with the
  device at every call, so an accelerator always takes the masked dense path.
torch.compile: every step traces with fullgraph=True. Each autograd Function has a
`traced` twin, the same math in plain differentiable ops (gathers as GEMMs with the
layout's maps, or slices), which `apply_function` runs under compile: AOTAutograd derives the
backward and inductor fuses across it and picks what to save. The sparse modes take the
dense, masked step 3 under compile: the routing plan's sizes depend on the data (nonzero,
counts read on the host), the masked dense path has static shapes and is the same math.
Without grad mode the autograd Functions' forwards run directly (`apply_function`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from moa_kernels.activations import activation_by_name
from moa_kernels.fusable import fusable_addmm
from moa_kernels.layout import ExpertLayout
from moa_kernels.routing import RouterOps, RoutingPlan

# Sparse modes fall back to the dense path when more than this fraction of the (token,
# expert) pairs is active. On CPU a gathered row costs more memory traffic than the low-rank
# work it saves, so sparse execution pays off only for clearly sparse routing (AdaMoLE's
# adaptive thresholds often leave most pairs active). Retune with benchmarks/layer_ratios.py.
DENSE_ABOVE_ACTIVE_FRACTION = 0.5
# Sparse modes on fewer tokens than this (decoding, small batches) take the dense masked
# path outright: building a routing plan (nonzero, a sort, counts read on the host) and
# gathering rows costs more than the low-rank work it would skip. Measured crossover in
# benchmarks/RESULTS.md ("Sparse modes on few tokens").
SPARSE_PLAN_MIN_TOKENS = 256


# Set (by `accelerator_decisions`) to make the CPU take the decisions made for an
# accelerator, so that tests on the CPU run the paths a GPU runs.
_ACCELERATOR_DECISIONS_ON_CPU = False


def host_reads_are_free(device: torch.device) -> bool:
    """Whether reading data of `device` on the host (a routing plan's `nonzero` and counts,
    a boolean mask's selection) costs nothing beyond its own work: on the CPU only. On an
    accelerator such a read waits for every kernel queued before it (a host-device
    synchronisation) and stalls the queue behind it, so the paths that read data on the
    host are CPU decisions; an accelerator takes their sync-free twins (the same math)."""
    return device.type == "cpu" and not _ACCELERATOR_DECISIONS_ON_CPU


@contextmanager
def accelerator_decisions() -> Iterator[None]:
    """Inside, `host_reads_are_free` is False on the CPU too: the CPU takes the paths an
    accelerator takes (tests check on the CPU that they hold no host-device sync)."""
    global _ACCELERATOR_DECISIONS_ON_CPU
    previous, _ACCELERATOR_DECISIONS_ON_CPU = _ACCELERATOR_DECISIONS_ON_CPU, True
    try:
        yield
    finally:
        _ACCELERATOR_DECISIONS_ON_CPU = previous


@dataclass(frozen=True)
class InputRecipe:
    """x as `function(*tensors)`, bitwise (the same ops on the same tensors): what a fused
    op saves for its backward instead of x when the tensors are kept alive by others anyway
    (docs/DESIGN.md, "Saved tensors"). They are saved with save_for_backward, so an in-place
    change of one before the backward is an error, as it would be for x itself."""

    function: Callable[..., torch.Tensor]
    tensors: tuple[torch.Tensor, ...]


def moa_linear(
    x: torch.Tensor,
    *,
    base_output: torch.Tensor | None = None,
    base_weight: torch.Tensor | None = None,
    base_bias: torch.Tensor | None = None,
    layout: ExpertLayout,
    shrink_weight: torch.Tensor,
    shrink_bias: torch.Tensor,
    expand_weight: torch.Tensor,
    expand_bias: torch.Tensor,
    router: RouterOps | None = None,
    gates: torch.Tensor | None = None,
    adapter_input: torch.Tensor | None = None,
    sparse: bool = False,
    input_recipe: InputRecipe | None = None,
    shrink_output: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = base + sum_e g_e delta_e(adapter_input) for 2-D x (the backend contract of
    moa_kernels/contract.py).

    Args:
        x: [T, in]. adapter_input: [T, in] what the experts read (x after dropout), or None.
        base_output: [T, out] the base module's output for x (any base); or base_weight
            [out, in] and base_bias [out] of a plain linear, whose GEMM then shares x with
            the shrink GEMM (`_BaseAndShrink`).
        shrink_weight [R, in], shrink_bias [R - layout.bias_start], expand_weight [out, C],
        expand_bias [N_ad, out]: the stacked expert tensors, in x's dtype.
        router: the router's first layer and finisher; or None with `gates` [T, E] given.
        sparse: skip inactive (token, expert) pairs (the router's `active` mask).
        input_recipe: how x is recomputed (x's shape or any of the same numel), so that
            `_BaseAndShrink` saves the recipe's tensors instead of x (this backend only).
        shrink_output: [T, R] x @ shrink_weight^T + the full shrink bias, computed outside
            (a layer router's GEMM over the same input, moa.modules.layer_router's
            LayerRouter), for gates given, dense, without dropout: the shrink GEMM is then
            skipped (this backend only).
    Returns:
        y [T, out] and the applied gates [T, E].
    """
    if (base_output is None) == (base_weight is None):
        raise ValueError("give exactly one of base_output (any base) and base_weight (a "
                         "plain linear base)")
    # Under torch.compile the sparse modes run the dense path with the skipped pairs masked
    # (the same math, static shapes): a routing plan's sizes depend on the data. So do they
    # on few tokens (SPARSE_PLAN_MIN_TOKENS), and off the CPU, where building the plan
    # (nonzero, counts read on the host) would synchronise the host with the device.
    planned = sparse and not torch.compiler.is_compiling() and \
        x.shape[0] >= SPARSE_PLAN_MIN_TOKENS and host_reads_are_free(x.device)
    if shrink_output is not None and (router is not None or adapter_input is not None or
                                      sparse or base_output is not None):
        raise ValueError("shrink_output is for dense mixtures with gates given, no dropout "
                         "and a plain linear base")
    expert_rows = 0 if planned or shrink_output is not None else layout.shrink_rows
    fused_input = adapter_input is None
    # One GEMM over x for the expert rows and the router's first layer, stacked once
    # (cached per parameter version, `stack_rows`), its output split back into the two.
    weights, bias_pieces, splits = [], [], []
    if fused_input and expert_rows:
        weights.append(shrink_weight)
        bias_pieces += [layout.bias_start, shrink_bias] if shrink_bias.numel() else \
            [layout.shrink_rows]
        splits.append(layout.shrink_rows)
    if router is not None:  # each router block's columns apart (`RouterOps.finish`)
        weights += router.weight_parts
        bias_pieces += [b if b is not None else w.shape[0]
                        for w, b in zip(router.weight_parts, router.bias_parts)]
        splits += [w.shape[0] for w in router.weight_parts]
    fused_base = base_output is None
    # Sparse experts hand their share of dx to _BaseAndShrink, which adds it into the dx it
    # allocates anyway (saves a [T, in] buffer and an add pass). Not with dropout: then
    # the experts' dx must flow back through the dropout.
    link = _InputGradLink() if planned and fused_input and router is not None and fused_base \
        else None
    outputs = ()
    if not fused_base:
        y = base_output
        if weights:
            outputs = stacked_linear(x, weights, bias_pieces, splits)
    elif weights:
        y, *outputs = apply_function(_BaseAndShrink, x, base_weight, base_bias, link,
                                     input_recipe, tuple(splits), len(weights), *weights,
                                     *bias_pieces)
    else:
        y = F.linear(x, base_weight, base_bias)
    router_h = outputs[-len(router.weight_parts):] if router is not None else None

    hidden = None
    if not planned:
        if shrink_output is not None:
            hidden = shrink_output
        elif fused_input:
            hidden = outputs[0]  # the shrink rows
        else:
            hidden = F.linear(adapter_input, shrink_weight, layout.full_shrink_bias(shrink_bias))
    active = None
    if router is not None:
        gates, active = router.finish(router_h)
    if gates is None or gates.shape != (x.shape[0], layout.num_experts):
        shape = None if gates is None else tuple(gates.shape)
        raise ValueError(f"gates must have shape {(x.shape[0], layout.num_experts)}, "
                         f"got {shape}")
    gates = gates.to(x.dtype)

    if not sparse:
        y = apply_function(_GatedExpand, y, hidden, gates, expand_weight, expand_bias, layout, None)
        return y, gates
    if active is None:
        active = gates != 0
    if not planned:
        y = _masked_expand(y, hidden, gates, active, router is not None, expand_weight,
                           expand_bias, layout)
        return y, gates
    plan = RoutingPlan.from_active(active)
    expert_input = x if adapter_input is None else adapter_input
    if plan.num_pairs > DENSE_ABOVE_ACTIVE_FRACTION * active.numel():
        # Mostly active: the dense path with the skipped pairs masked out is the same math
        # and cheaper.
        hidden = F.linear(expert_input, shrink_weight, layout.full_shrink_bias(shrink_bias))
        y = _masked_expand(y, hidden, gates, active, router is not None, expand_weight,
                           expand_bias, layout)
        return y, gates
    y = apply_function(_SparseExperts, y, expert_input, shrink_weight, shrink_bias,
                       expand_weight, expand_bias, gates, plan, layout, link)
    return y, gates


def _masked_expand(y, hidden, gates, active, own_router: bool, expand_weight, expand_bias,
                   layout: ExpertLayout) -> torch.Tensor:
    """The dense expand of a sparse mode, the skipped pairs masked: eagerly inside
    `_GatedExpand` (u and every gradient of a skipped pair selected to exactly 0: no mask
    of hidden, no product of the gates with the mask); under torch.compile with the hidden
    rows of skipped pairs zeroed and outside gates multiplied by the mask (plain ops whose
    autograd backward gives those pairs no gradient)."""
    if torch.compiler.is_compiling():
        masked = gates if own_router else gates * active
        return apply_function(_GatedExpand, y, _masked_hidden(hidden, active, layout), masked,
                              expand_weight, expand_bias, layout, None)
    return apply_function(_GatedExpand, y, hidden, gates, expand_weight, expand_bias, layout,
                          active)


def _masked_hidden(hidden: torch.Tensor, active: torch.Tensor,
                   layout: ExpertLayout) -> torch.Tensor:
    """hidden [T, R] with the rows of skipped pairs zeroed, for the dense path of a sparse
    mode. Zeroed, not multiplied by the zero gate (0 * inf would reach tokens not routed to
    the expert), so act(0) = 0 adds nothing and the gate gets no gradient from the expert;
    the adapters' gated up-bias is masked through the gates (the router's own mask does
    that; outside gates are multiplied by the mask)."""
    # [T, E] @ [E, R]: a shrink row is kept while an expert reading it is active.
    row_active = active.to(torch.float32) @ layout.index_tensors(hidden.device)["row_owner"]
    return torch.where(row_active > 0, hidden, torch.zeros_like(hidden))


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


# ---------------------------------------------------------------------------------------
# activations of the adapter bottlenecks
# ---------------------------------------------------------------------------------------

def _activate(hidden: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """act(hidden) per activation segment; hidden itself when every segment is identity."""
    if not layout.activation_segments:
        return hidden
    pieces, start = [], 0
    for segment in layout.activation_segments:
        pieces.append(hidden[:, start:segment.start])
        pieces.append(activation_by_name(segment.activation).function(
            hidden[:, segment.start:segment.stop]))
        start = segment.stop
    pieces.append(hidden[:, start:])
    return torch.cat(pieces, dim=1)


def _activation_backward(hidden: torch.Tensor, grad: torch.Tensor,
                         layout: ExpertLayout) -> torch.Tensor:
    """d loss / d hidden from d loss / d act(hidden) [T, R] (modified in place), the
    activations' derivatives recomputed from hidden."""
    for segment in layout.activation_segments:
        rows = slice(segment.start, segment.stop)
        grad[:, rows] = activation_by_name(segment.activation).derivative(
            grad[:, rows], hidden[:, rows])
    return grad


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a[t, j] b[t, j] per row t, [T], for a, b [T, K]: one batched GEMM of T
    [1, K] x [K, 1] products (a product and a sum would be two passes)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


# ---------------------------------------------------------------------------------------
# dense path
# ---------------------------------------------------------------------------------------

# Blocks of zeros standing in for absent biases in a stacked bias, per (rows, dtype,
# device): constants, never written (a cat copies them).
_ZEROS: dict[tuple, torch.Tensor] = {}


def _zeros(rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (rows, dtype, device)
    zeros = None if torch.compiler.is_compiling() else _ZEROS.get(key)
    if zeros is None:
        zeros = torch.zeros(rows, dtype=dtype, device=device)
        if not torch.compiler.is_compiling():
            _ZEROS[key] = zeros
    return zeros


def stack_rows(pieces, dtype: torch.dtype) -> torch.Tensor:
    """The pieces stacked along rows in `dtype` (one cat; a single piece already in dtype
    as it is): tensors [r_i, ...] (cast) and, for a 1-D stack, counts of zero rows (absent
    biases). No graph: for autograd Functions' forwards, whose backward splits the gradient
    (`split_rows`) and reuses the stack saved by the forward, and for no-grad calls.

    Made once per call, not kept across calls by parameter version: the version counter
    does not see every change of a parameter (`tensor.data` writes, as DeepSpeed's
    optimizers make them; FSDP2's all-gather into the unsharded parameters preserves their
    versions), and a stale stack would train silently wrong."""
    tensors = [p for p in pieces if isinstance(p, torch.Tensor)]
    if len(pieces) == 1 and tensors and tensors[0].dtype == dtype:
        return tensors[0]
    device = tensors[0].device
    return torch.cat([p.to(dtype) if isinstance(p, torch.Tensor) else _zeros(p, dtype, device)
                      for p in pieces])


def _piece_layout(pieces) -> tuple[tuple[int, torch.dtype | None], ...]:
    """(rows, dtype) of each piece, dtype None for a count of zero rows."""
    return tuple((p.shape[0], p.dtype) if isinstance(p, torch.Tensor) else (p, None)
                 for p in pieces)


def split_rows(grad: torch.Tensor, layout, needs) -> list[torch.Tensor | None]:
    """The rows of grad [S, ...] of each piece (`_piece_layout`) that is a tensor whose
    `needs` entry is true, in its dtype (views where the dtype matches); None elsewhere."""
    result, start = [], 0
    for (rows, dtype), wanted in zip(layout, needs):
        result.append(grad[start:start + rows].to(dtype) if dtype is not None and wanted
                      else None)
        start += rows
    return result


def _has_bias(pieces) -> bool:
    return any(isinstance(p, torch.Tensor) for p in pieces)


def _grad_of_outputs(grads, splits, tokens: int, like: torch.Tensor) -> torch.Tensor:
    """The gradient [T, S] of the whole GEMM output from its split outputs' (zeros, like
    `like`, for None)."""
    if len(grads) == 1 and grads[0] is not None:
        return grads[0]
    return torch.cat([g if g is not None else like.new_zeros(tokens, size)
                      for g, size in zip(grads, splits)], dim=1)


def stacked_linear(x: torch.Tensor, weights, bias_pieces, splits) -> tuple[torch.Tensor, ...]:
    """x @ [W_1; ...; W_n]^T + b as one GEMM over the stacked blocks, its output [T, S]
    returned as separate tensors of `splits` columns each (so their gradients need no
    slicing back into one).

    Args:
        x: [T, in]; weights: the blocks W_i [r_i, in] (parameters, any float dtype: stacked
            in x's dtype, `stack_rows`); bias_pieces: the bias over the same S rows, as
            tensors and counts of zero rows; splits: column counts summing to S.
    Returns:
        a tuple of [T, split] tensors in x's dtype.
    """
    return apply_function(_StackedLinear, x, tuple(splits), len(weights), *weights, *bias_pieces)


class _StackedLinear(torch.autograd.Function):
    """(x [T, in], splits, n, W_1 .. W_n, bias pieces) -> the splits of x W^T + b; saves x
    and the stacked W (backward: dx = dh W, dW = dh^T x split into the blocks, db = the
    column sums of dh)."""

    @staticmethod
    def traced(x, splits, count, *pieces):
        weights, bias_pieces = pieces[:count], pieces[count:]
        weight = torch.cat([w.to(x.dtype) for w in weights])
        bias = None
        if _has_bias(bias_pieces):
            bias = torch.cat([p.to(x.dtype) if isinstance(p, torch.Tensor) else
                              x.new_zeros(p) for p in bias_pieces])
        return F.linear(x, weight, bias).split(list(splits), dim=1)

    @staticmethod
    def forward(ctx, x, splits, count, *pieces):
        weights, bias_pieces = pieces[:count], pieces[count:]
        weight = stack_rows(weights, x.dtype)
        bias = stack_rows(bias_pieces, x.dtype) if _has_bias(bias_pieces) else None
        ctx.save_for_backward(x, weight)
        ctx.splits, ctx.count, ctx.piece_layout = splits, count, _piece_layout(pieces)
        ctx.set_materialize_grads(False)  # an unused split's gradient: zeros only if needed
        return F.linear(x, weight, bias).split(list(splits), dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        if all(g is None for g in grads):  # (grads are not materialised: nothing used)
            return (None,) * (3 + len(ctx.piece_layout))
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_h = _grad_of_outputs(grads, ctx.splits, x.shape[0], x)
        grad_x = grad_h @ weight if needs[0] else None
        return (grad_x, None, None, *_piece_grads(ctx, grad_h, x, needs[3:]))


def _piece_grads(ctx, grad_h, x, needs) -> list:
    """The gradients of the weight blocks, then of the bias pieces, from dh [T, S]."""
    count, layout = ctx.count, ctx.piece_layout
    grads = [None] * len(layout)
    if x is not None and any(needs[:count]):
        grads[:count] = split_rows(grad_h.t() @ x, layout[:count], needs[:count])
    if any(needs[count:]):
        grads[count:] = split_rows(grad_h.sum(0), layout[count:], needs[count:])
    return grads


class _InputGradLink:
    """Carries the sparse experts' input-gradient pieces from `_SparseExperts.backward` to
    `_BaseAndShrink.backward` (which autograd always runs later: its outputs feed the
    experts). pieces: (token_index [n], grad_hidden [n, r], shrink rows [r, in]) per expert.
    """

    def __init__(self) -> None:
        self.pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add_into(self, grad_x: torch.Tensor) -> None:
        if self.pieces:
            workspace = grad_x.new_empty(max(t.numel() for t, _, _ in self.pieces),
                                         grad_x.shape[1])
            for tokens, grad_hidden, down in self.pieces:
                rows = torch.mm(grad_hidden, down, out=workspace[:tokens.numel()])
                grad_x.index_add_(0, tokens, rows)
        self.pieces = []


class _BaseAndShrink(torch.autograd.Function):
    """(x [T, in]) -> (base(x) [T, out], the splits of x @ W^T + b [T, S]), W and b the
    stacked blocks (`stacked_linear`'s arguments: splits, count, weight blocks, bias pieces).

    Saves x, or with an `InputRecipe` its tensors (x is then recomputed in the backward, and
    only where a weight gradient needs it: dx needs no x), and the stacked W."""

    @staticmethod
    def traced(x, base_weight, base_bias, link, recipe, splits, count, *pieces):
        return (F.linear(x, base_weight, base_bias),
                *_StackedLinear.traced(x, splits, count, *pieces))

    @staticmethod
    def forward(ctx, x, base_weight, base_bias, link, recipe, splits, count, *pieces):
        weights, bias_pieces = pieces[:count], pieces[count:]
        weight = stack_rows(weights, x.dtype)
        bias = stack_rows(bias_pieces, x.dtype) if _has_bias(bias_pieces) else None
        if recipe is None:
            ctx.save_for_backward(x, base_weight, weight)
        else:
            ctx.save_for_backward(None, base_weight, weight, *recipe.tensors)
            ctx.recompute, ctx.x_shape = recipe.function, x.shape
        ctx.link, ctx.splits, ctx.count = link, splits, count
        ctx.piece_layout = _piece_layout(pieces)
        ctx.set_materialize_grads(False)
        ctx.has_base_bias = base_bias is not None
        return (F.linear(x, base_weight, base_bias),
                *F.linear(x, weight, bias).split(list(splits), dim=1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *grads_h):
        if grad_y is None and all(g is None for g in grads_h):
            return (None,) * (7 + len(ctx.piece_layout))
        x, base_weight, weight, *recipe_tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if x is None and (needs[1] or any(needs[7:7 + ctx.count])):
            x = ctx.recompute(*recipe_tensors).reshape(ctx.x_shape)
        grad_x = grad_base_weight = grad_base_bias = None
        tokens = grad_y.shape[0] if grad_y is not None else \
            next(g.shape[0] for g in grads_h if g is not None)
        grad_h = _grad_of_outputs(grads_h, ctx.splits, tokens, weight)
        if needs[0]:
            # The big GEMM allocates dx; the skinny one accumulates into it in place.
            if grad_y is not None:
                grad_x = grad_y @ base_weight
                grad_x.addmm_(grad_h, weight)
            else:
                grad_x = grad_h @ weight
            if ctx.link is not None:
                ctx.link.add_into(grad_x)
        if grad_y is not None and needs[1]:
            grad_base_weight = grad_y.t() @ x
        if grad_y is not None and needs[2] and ctx.has_base_bias:
            grad_base_bias = grad_y.sum(0)
        return (grad_x, grad_base_weight, grad_base_bias, None, None, None, None,
                *_piece_grads(ctx, grad_h, x, needs[7:]))


def _columns_of(activated: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """[T, R] -> [T, C]: the shrink row each expand column reads (column_source), as slices
    and repeats per column block (their autograd backward is a sum, not a scatter)."""
    pieces = [activated[:, start:stop] if heads == 1 else
              activated[:, start:stop].repeat(1, heads)
              for start, stop, heads in layout.column_blocks]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _rows_of(grad_columns: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """[T, C] -> [T, R]: per shrink row, the sum of the columns that read it (the adjoint
    of `_columns_of`; hydra heads summed in head order)."""
    pieces, column = [], 0
    for start, stop, heads in layout.column_blocks:
        width = (stop - start) * heads
        block = grad_columns[:, column:column + width]
        pieces.append(block if heads == 1 else
                      block.reshape(block.shape[0], heads, stop - start).sum(1))
        column += width
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A cached 0-dim zero of like's dtype and device (never written), for torch.where."""
    key = ((), like.dtype, like.device)
    zero = None if torch.compiler.is_compiling() else _ZEROS.get(key)
    if zero is None:
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        if not torch.compiler.is_compiling():
            _ZEROS[key] = zero
    return zero


def _active_columns(active: torch.Tensor, layout: ExpertLayout, index) -> torch.Tensor:
    """Which expand columns run, [T, C] bool ([T, 1] for one expert: it broadcasts), from
    active [T, E]."""
    return active if layout.num_experts == 1 else \
        active.index_select(1, index["column_expert"])


def _expand_operands(hidden, gates, layout, traced=False, active=None):
    """u [T, C] (the gated, scaled expert activations; exactly 0 on the columns of pairs
    that `active` [T, E] skips, when given), the adapters' gates [T, N_ad] (None without
    adapters: they multiply the up-biases), and the parts the backward needs. traced: the
    gathers as small GEMMs with the layout's maps and as slices and repeats of the shared
    rows (their autograd backward is a GEMM or a sum, not a scatter)."""
    index = layout.index_tensors(hidden.device)
    activated = _activate(hidden, layout)
    columns = activated
    if layout.has_shared_shrink:
        columns = _columns_of(activated, layout) if traced else \
            activated.index_select(1, index["column_source"])
    columns_count = layout.expand_columns
    if layout.num_experts == 1:  # [T, 1] broadcasts over the columns: no gather
        column_gates = gates if layout.unit_scaling else gates * layout.slots[0].scaling
    elif traced:
        column_gates = gates @ index["gate_map"][:columns_count].to(gates.dtype).t()
    else:
        column_gates = gates.index_select(1, index["column_expert"])
        if not layout.unit_scaling:
            column_gates = column_gates * index["column_scale"].to(gates.dtype)
    u = columns * column_gates
    if active is not None:  # selected, not multiplied: 0 * inf would reach the output
        u = torch.where(_active_columns(active, layout, index), u, _zero(u))
    adapter_gates = None
    if layout.num_adapters:  # (0 on skipped pairs already: the gates are)
        adapter_gates = gates @ index["gate_map"][columns_count:].to(gates.dtype).t() \
            if traced else gates.index_select(1, index["adapter_experts"])
    return u, adapter_gates, columns, column_gates, index


class _GatedExpand(torch.autograd.Function):
    """y [T, out] + gated expand of hidden [T, R] (pre-activation), as a new tensor (the
    GEMM reads y as its addend: no pass of its own, and y is never modified). The adapters'
    gated up-biases are a second GEMM accumulated into that output (no concatenation of
    u with the adapters' gates, nor of B with the up-biases, forward or backward).

    active [T, E] bool (sparse modes, eagerly): the skipped pairs' u is selected to exactly
    0, and so is every gradient they would get (their gates', their hidden rows'), also for
    a non-finite expert: a skipped pair adds nothing and learns nothing."""

    @staticmethod
    def traced(y, hidden, gates, expand_weight, expand_bias, layout, active=None):
        u, adapter_gates, *_ = _expand_operands(hidden, gates, layout, traced=True,
                                                active=active)
        weight = expand_weight
        if adapter_gates is not None:  # one GEMM (decoding: one reduction) for both
            u = torch.cat([u, adapter_gates], dim=1)
            weight = torch.cat([expand_weight, expand_bias.t()], dim=1)
        # decoding: a reduction fused with the gating before and the op reading y after
        return fusable_addmm(y, u, weight)

    @staticmethod
    def forward(ctx, y, hidden, gates, expand_weight, expand_bias, layout, active=None):
        u, adapter_gates, *_ = _expand_operands(hidden, gates, layout, active=active)
        y = torch.addmm(y, u, expand_weight.t())
        if adapter_gates is not None:
            y.addmm_(adapter_gates, expand_bias)
        ctx.layout = layout
        ctx.save_for_backward(hidden, gates, expand_weight, expand_bias, active)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        hidden, gates, expand_weight, expand_bias, active = ctx.saved_tensors
        layout = ctx.layout
        u, adapter_gates, columns, column_gates, index = _expand_operands(
            hidden, gates, layout, active=active)
        grad_u = grad_y @ expand_weight
        grad_expand_weight = grad_y.t() @ u
        grad_expand_bias = None
        running = None
        if active is not None:  # a skipped pair's columns give its gate nothing
            running = _active_columns(active, layout, index)
            columns = torch.where(running, columns, _zero(columns))
        if layout.num_experts == 1 and adapter_gates is None:
            # one expert: its gate's gradient is a row dot (one batched GEMM)
            grad_gates = row_dot(grad_u, columns).unsqueeze(1)
            if not layout.unit_scaling:
                grad_gates = grad_gates * layout.slots[0].scaling
        else:
            # Per-expert sums over its columns as one small GEMM with the layout's gate map.
            gate_map = index["gate_map"].to(gates.dtype)
            grad_gates = (grad_u * columns) @ gate_map[:layout.expand_columns]
            if adapter_gates is not None:
                grad_adapter_gates = grad_y @ expand_bias.t()
                if active is not None:
                    grad_adapter_gates = torch.where(
                        active.index_select(1, index["adapter_experts"]), grad_adapter_gates,
                        _zero(grad_adapter_gates))
                grad_gates.addmm_(grad_adapter_gates, gate_map[layout.expand_columns:])
        if adapter_gates is not None:
            grad_expand_bias = adapter_gates.t() @ grad_y
        grad_activated = grad_u * column_gates
        if running is not None:
            grad_activated = torch.where(running, grad_activated, _zero(grad_activated))
        if layout.has_shared_shrink:  # hydra heads: sum the columns that read a row
            grad_activated = _rows_of(grad_activated, layout)
        grad_hidden = _activation_backward(hidden, grad_activated, layout)
        if active is not None and layout.activation_segments:
            # act'(h) of a skipped pair's h (perhaps non-finite) must not reach its rows
            rows = running if not layout.has_shared_shrink else \
                (active.to(torch.float32) @ index["row_owner"]) > 0
            grad_hidden = torch.where(rows, grad_hidden, _zero(grad_hidden))
        return (grad_y, grad_hidden, grad_gates, grad_expand_weight, grad_expand_bias, None,
                None)


# ---------------------------------------------------------------------------------------
# sparse path
# ---------------------------------------------------------------------------------------

def _expert_weights(slot, layout, shrink_weight, shrink_bias, expand_weight, expand_bias):
    rows, columns = slice(*slot.shrink), slice(*slot.expand)
    down_bias = None
    if slot.adapter_index is not None:
        down_bias = shrink_bias[slot.shrink[0] - layout.bias_start:
                                slot.shrink[1] - layout.bias_start]
    up_bias = expand_bias[slot.adapter_index] if slot.adapter_index is not None else None
    return rows, columns, shrink_weight[rows], down_bias, expand_weight[:, columns], up_bias


class _SparseExperts(torch.autograd.Function):
    """y [T, out] + sum over active pairs (t, e) of g[t, e] delta_e(x[t]), as a new tensor
    (one copy of y, then index_add per expert into the copy; y is never modified).

    Works expert by expert on the plan's contiguous slices. The gathered rows of each expert
    go into one workspace per call, reused across experts: at most [max count, in] of
    scratch, never the [N, in] of all pairs.
    """

    @staticmethod
    def forward(ctx, y, x, shrink_weight, shrink_bias, expand_weight, expand_bias, gates,
                plan, layout, link=None):
        sorted_gates = gates[plan.token_index, plan.expert_index]
        y = y.clone()
        largest = max(plan.counts_host, default=0)
        x_rows = x.new_empty(largest, x.shape[1])
        out_rows = y.new_empty(largest, y.shape[1])
        hiddens = []
        start = 0
        for slot, count in zip(layout.slots, plan.counts_host):
            stop = start + count
            tokens = plan.token_index[start:stop]
            _, _, down, down_bias, up, up_bias = _expert_weights(
                slot, layout, shrink_weight, shrink_bias, expand_weight, expand_bias)
            hidden = F.linear(torch.index_select(x, 0, tokens, out=x_rows[:count]), down,
                              down_bias)
            gate = sorted_gates[start:stop, None]
            u = activation_by_name(slot.activation).function(hidden) * (gate * slot.scaling)
            out = torch.mm(u, up.t(), out=out_rows[:count])
            if up_bias is not None:
                out.addmm_(gate, up_bias[None])
            y.index_add_(0, tokens, out)
            hiddens.append(hidden)
            start = stop
        ctx.plan, ctx.layout, ctx.link = plan, layout, link
        ctx.save_for_backward(x, shrink_weight, shrink_bias, expand_weight, expand_bias,
                              sorted_gates, *hiddens)
        ctx.gates_shape = gates.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, shrink_weight, shrink_bias, expand_weight, expand_bias, sorted_gates, *hiddens = \
            ctx.saved_tensors
        plan, layout, link = ctx.plan, ctx.layout, ctx.link
        if link is not None:
            # A partial backward (inputs= or autograd.grad on expert or router tensors) can
            # stop before _BaseAndShrink; its pieces must not leak into the next pass.
            link.pieces = []
        input_grad = ctx.needs_input_grad[1] or (link is not None and x.requires_grad)
        grad_shrink_weight = torch.zeros_like(shrink_weight)
        grad_shrink_bias = torch.zeros_like(shrink_bias)
        # Kept transposed [C, out] so each expert's columns are a contiguous row block.
        grad_expand_weight_t = expand_weight.new_zeros(expand_weight.shape[::-1])
        grad_expand_bias = torch.zeros_like(expand_bias)
        grad_x = torch.zeros_like(x) if input_grad and link is None else None
        sorted_grad_gates = sorted_gates.new_empty(plan.num_pairs)
        largest = max(plan.counts_host, default=0)
        x_rows = x.new_empty(largest, x.shape[1])
        grad_rows = grad_y.new_empty(largest, grad_y.shape[1])
        start = 0
        for slot, count, hidden in zip(layout.slots, plan.counts_host, hiddens):
            stop = start + count
            tokens = plan.token_index[start:stop]
            rows, columns, down, _, up, up_bias = _expert_weights(
                slot, layout, shrink_weight, shrink_bias, expand_weight, expand_bias)
            grad_out = torch.index_select(grad_y, 0, tokens, out=grad_rows[:count])
            gate = sorted_gates[start:stop, None]
            activated = activation_by_name(slot.activation).function(hidden)
            grad_activated_scaled = grad_out @ up  # d loss / d (gate * scaling * act)
            grad_expand_weight_t[columns].addmm_(activated.t() * (gate.t() * slot.scaling),
                                                 grad_out)
            grad_gate = (grad_activated_scaled * activated).sum(1) * slot.scaling
            if up_bias is not None:
                grad_gate += grad_out @ up_bias
                grad_expand_bias[slot.adapter_index] += grad_out.t() @ gate[:, 0]
            sorted_grad_gates[start:stop] = grad_gate
            grad_hidden = activation_by_name(slot.activation).derivative(
                grad_activated_scaled * (gate * slot.scaling), hidden)
            x_slice = torch.index_select(x, 0, tokens, out=x_rows[:count])
            grad_shrink_weight[rows].addmm_(grad_hidden.t(), x_slice)
            if slot.adapter_index is not None:
                grad_shrink_bias[slot.shrink[0] - layout.bias_start:
                                 slot.shrink[1] - layout.bias_start] += grad_hidden.sum(0)
            if input_grad and link is not None:
                link.pieces.append((tokens, grad_hidden, down))
            elif input_grad:
                grad_x.index_add_(0, tokens, torch.mm(grad_hidden, down, out=x_rows[:count]))
            start = stop
        grad_gates = sorted_gates.new_zeros(ctx.gates_shape)
        grad_gates[plan.token_index, plan.expert_index] = sorted_grad_gates
        return (grad_y, grad_x, grad_shrink_weight, grad_shrink_bias, grad_expand_weight_t.t(),
                grad_expand_bias, grad_gates, None, None, None)
