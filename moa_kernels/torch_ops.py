"""Fused pure-PyTorch MoA linear: runs on any device, CPU included.

This file holds the backend's entry point `moa_linear` and its plan; the steps live beside
it: step 1 in torch_base_shrink.py, the dense step 3 in torch_gated_expand.py, the sparse
step 3 in torch_sparse_experts.py, and `apply_function` / `InputRecipe` in autograd_apply.py.

Plan (T tokens, R stacked shrink rows, C expand columns, F router first-layer width):

The base output is either given (`base_output`: any frozen module, called by the layer) or
computed here from a plain linear's weights (`base_weight`), the fast path of step 1.

Dense (soft mode, or gates given):
  1. `BaseAndShrink`: y = base(x) and h = x @ [A_stack; W_router1]^T + bias: two GEMMs that
     share the saved x (or, given an `InputRecipe`, the tensors x is recomputed from);
     backward accumulates dx = dy W_base + dh W_shrink in place. With a given base output,
     h = F.linear(x, [A_stack; W_router1]) under plain autograd.
  2. The router finishes from h[:, R:] ([T, F] tensors only; the SwiGLU head saves only
     that view of h, whose storage step 3 keeps anyway).
  3. `GatedExpand`: u = act(h[:, :R]) * g * scaling per column, then one GEMM
     y + [u, g_adapters] @ [B_stack, up_biases]^T with y as its addend (out of place: no
     tensor another op returned is modified, so autograd, torch.compile and tensor
     subclasses see plain functional ops). Backward recomputes the activations (their
     derivatives by autograd's own backward kernels, one op each: no nested autograd call)
     from the saved h ([T, R]), so nothing of size [T, out] or [T, E, out] is stored; the
     per-expert gate gradients are one small GEMM with the layout's gate map (no scatter).
Sparse (threshold, adaptive, topk):
  1. as above, with the router rows only.
  2. the gates give a `RoutingPlan` (pairs sorted by expert; one host sync, here only).
  3. `SparseExperts`: per expert, gather its active rows of x into a reused workspace, run
     its shrink and expand, and add the result into a copy of y with index_add (sequential, so
     deterministic, on CPU; on CUDA it is deterministic only under
     torch.use_deterministic_algorithms(True) -- CUDA's default backend is triton, whose
     combine is deterministic). Backward re-gathers x instead of saving the gathered rows, and
     hands its dx pieces to `BaseAndShrink`, which adds them into the dx it allocates.
  When more than DENSE_ABOVE_ACTIVE_FRACTION of the pairs are active, step 3 is the dense
  `GatedExpand` with the skipped pairs' hidden zeroed and their gates masked instead (the
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

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from moa_kernels.autograd_apply import InputRecipe, apply_function
from moa_kernels.contract import check_base_operands, check_gate_source, check_gates
from moa_kernels.layout import ExpertLayout
from moa_kernels.routing import RouterOps, RoutingPlan
from moa_kernels.torch_base_shrink import (
    BaseAndShrink,
    InputGradLink,
    stack_rows,
    stacked_linear,
)
from moa_kernels.torch_gated_expand import GatedExpand, row_dot
from moa_kernels.torch_sparse_experts import SparseExperts

# (InputRecipe, apply_function, stack_rows and row_dot: re-exported for older imports)
__all__ = ["DENSE_ABOVE_ACTIVE_FRACTION", "SPARSE_PLAN_MIN_TOKENS", "InputRecipe",
           "accelerator_decisions", "apply_function", "host_reads_are_free", "moa_linear",
           "row_dot", "stack_rows", "stacked_linear"]

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
            the shrink GEMM (`BaseAndShrink`).
        shrink_weight [R, in], shrink_bias [R - layout.bias_start], expand_weight [out, C],
        expand_bias [N_ad, out]: the stacked expert tensors, in x's dtype.
        router: the router's first layer and finisher; or None with `gates` [T, E] given.
        sparse: skip inactive (token, expert) pairs (the router's `active` mask).
        input_recipe: how x is recomputed (x's shape or any of the same numel), so that
            `BaseAndShrink` saves the recipe's tensors instead of x (this backend only).
        shrink_output: [T, R] x @ shrink_weight^T + the full shrink bias, computed outside
            (a layer router's GEMM over the same input, moa.modules.layer_router's
            LayerRouter), for gates given, dense, without dropout: the shrink GEMM is then
            skipped (this backend only).
    Returns:
        y [T, out] and the applied gates [T, E].
    """
    check_base_operands(x, base_output, base_weight)
    check_gate_source(router, gates)
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
    # Sparse experts hand their share of dx to BaseAndShrink, which adds it into the dx it
    # allocates anyway (saves a [T, in] buffer and an add pass). Not with dropout: then
    # the experts' dx must flow back through the dropout.
    link = InputGradLink() if planned and fused_input and router is not None and fused_base \
        else None
    outputs = ()
    if not fused_base:
        y = base_output
        if weights:
            outputs = stacked_linear(x, weights, bias_pieces, splits)
    elif weights:
        y, *outputs = apply_function(BaseAndShrink, x, base_weight, base_bias, link,
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
    check_gates(gates, x, layout.num_experts)
    if gates.dtype != x.dtype:
        gates = gates.to(x.dtype)

    if not sparse:
        y = apply_function(GatedExpand, y, hidden, gates, expand_weight, expand_bias, layout, None)
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
    y = apply_function(SparseExperts, y, expert_input, shrink_weight, shrink_bias,
                       expand_weight, expand_bias, gates, plan, layout, link)
    return y, gates


def _masked_expand(y, hidden, gates, active, own_router: bool, expand_weight, expand_bias,
                   layout: ExpertLayout) -> torch.Tensor:
    """The dense expand of a sparse mode, the skipped pairs masked: eagerly inside
    `GatedExpand` (u and every gradient of a skipped pair selected to exactly 0: no mask
    of hidden, no product of the gates with the mask); under torch.compile with the hidden
    rows of skipped pairs zeroed and outside gates multiplied by the mask (plain ops whose
    autograd backward gives those pairs no gradient)."""
    if torch.compiler.is_compiling():
        masked = gates if own_router else gates * active
        return apply_function(GatedExpand, y, _masked_hidden(hidden, active, layout), masked,
                              expand_weight, expand_bias, layout, None)
    return apply_function(GatedExpand, y, hidden, gates, expand_weight, expand_bias, layout,
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
