"""The triton backend for MoALinear: the twin of moa_kernels/torch_ops.py (same entry point,
same semantics), run as two custom ops (ops.py) over the layout's packed column space
(plan.py).

Plan (T tokens; h_width, k_width: the packed widths; F router first-layer rows):
  1. y, h = moa::shrink(x, [A packed; W_router1], base): x is read once for every expert
     and the router (one cuBLAS GEMM, h [T, S] in x's dtype); y = x Wb^T + bb beside it
     for a plain linear base (any other base's output is given).
  2. The router finishes from h[:, h_width:] with ordinary autograd ([T, F] tensors only);
     in the sparse modes it also gives the active pairs.
  3. out = moa::gated_expand(y, h[:, :h_width], g, active): u = the gated, activated,
     scaled h (a Triton kernel; 0 on inactive pairs) and one cuBLAS addmm, out = y + u B^T
     with the adapters' up-biases as columns of the packed B.
Backward: registered per op; see shrink.py and expand.py, whose docstrings argue each
choice from its bytes and FLOPs.

Sparse modes (threshold, adaptive, topk; `sparse=True`) have two kernel plans, chosen by the
environment variable MOA_TRITON_SPARSE, read at every call (plain Python: under
torch.compile it is read while tracing, a constant of the graph):
  "masked" (default): the dense GEMMs above with the inactive pairs' u set to exactly 0;
      no routing plan is built (expand.py says why that is the fast way on a GPU for the
      presets' ranks). Compiles with fullgraph=True.
  "grouped": grouped GEMMs over the active pairs sorted by expert (grouped.py, the op
      moa::grouped_mixture): step 1 computes only the router's first layer and the base
      (x is read again, once per active pair, by the grouped shrink), the router gives the
      active pairs, and the experts run on those pairs only; per-pair outputs are combined
      per token in expert order. Two host syncs per call (the pair count), inside the op;
      meant for eager runs on a GPU, to be measured against "masked"
      (benchmarks/gpu_suite.py). Traces with fullgraph=True too (the fakes have
      data-dependent pair counts; tested with aot_eager).
Any other value raises a ValueError naming the allowed ones.
"""

from __future__ import annotations

import torch

from moa_kernels.contract import (
    check_base_operands,
    check_gate_source,
    check_gates,
    check_triton_input,
)
from moa_kernels.layout import ExpertLayout
from moa_kernels.reference import resolve_base_output
from moa_kernels.routing import RouterOps
from moa_kernels.triton.grouped import SPARSE_PLAN_VARIABLE, SPARSE_PLANS, sparse_plan
from moa_kernels.triton.kernel_utils import align16
from moa_kernels.triton.ops import gated_expand_op, grouped_mixture_op, shrink_op
from moa_kernels.triton.plan import KernelLayout, layout_code

__all__ = ["moa_linear", "KernelLayout", "SPARSE_PLANS", "SPARSE_PLAN_VARIABLE", "sparse_plan"]


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = base + sum_e g_e delta_e(adapter_input) for 2-D x (the backend contract of
    moa_kernels/contract.py).

    Args:
        x: [T, in]. adapter_input: [T, in] what the experts read (x after dropout), or None.
        base_output: [T, out] the base module's output for x (any base); or base_weight
            [out, in] and base_bias [out] of a plain linear (cuBLAS computes x W^T + b).
        shrink_weight [R, in], shrink_bias [R - layout.bias_start], expand_weight [out, C],
        expand_bias [N_ad, out]: the stacked expert tensors (fp32, fp16 or bf16, x's dtype
            or another: the ops cast them while packing, and the packed weights are cached
            per version of these very tensors, so pass the parameters, not casts of them).
        router: the router's first layer and finisher; or None with `gates` [T, E] given.
        sparse: skip inactive (token, expert) pairs (the router's `active` mask), by the
            kernel plan MOA_TRITON_SPARSE names ("masked" or "grouped"; module docstring).
    Returns:
        y [T, out] in x's dtype and the applied gates [T, E] in x's dtype.
    """
    check_triton_input(x)
    check_base_operands(x, base_output, base_weight)
    check_gate_source(router, gates)
    if sparse and sparse_plan() == "grouped":
        return _grouped_linear(x, base_output, base_weight, base_bias, layout, shrink_weight,
                               shrink_bias, expand_weight, expand_bias, router, gates,
                               adapter_input)
    code, scales = _code(layout)
    width = align16(layout.expand_columns)
    if base_output is not None or base_weight is None:
        base_output = resolve_base_output(x, base_output, base_weight, base_bias)
    full_bias = layout.full_shrink_bias(shrink_bias) \
        if layout.bias_start < layout.shrink_rows else None
    blocks = _router_blocks(router)
    if adapter_input is None:  # one GEMM over x for the experts, the router and the base
        y, h, _ = shrink_op(x, shrink_weight, full_bias, *blocks, base_weight, base_bias,
                            code, scales)
        hidden, router_h = h[:, :width], h[:, width:]
    else:  # the experts read adapter_input (x after dropout); router and base read x
        y = x.new_empty(0)
        router_h = None
        if router is not None:
            y, router_h, _ = shrink_op(x, None, None, *blocks, base_weight, base_bias, [], [])
        elif base_weight is not None:
            y = torch.nn.functional.linear(x, base_weight, base_bias)
        hidden = shrink_op(adapter_input, shrink_weight, full_bias, [], [], 0, None, None,
                           code, scales)[1][:, :width]
    if base_output is not None:
        y = base_output
    active = None
    if router is not None:
        gates, active = router.finish(router_h[:, :router.rows])
    check_gates(gates, x, layout.num_experts)
    gates = gates.to(x.dtype).contiguous()
    if not sparse:
        active = None
    elif active is None:
        active = gates != 0
    out, _ = gated_expand_op(y, hidden, gates, active, expand_weight, expand_bias, code,
                             scales)
    return out, gates


def _grouped_linear(x, base_output, base_weight, base_bias, layout, shrink_weight,
                    shrink_bias, expand_weight, expand_bias, router, gates, adapter_input
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """moa_linear's sparse path by the grouped plan (grouped.py): the router's first layer
    and the base in one GEMM over x, then moa::grouped_mixture over the active pairs."""
    code, scales = _code(layout)
    if base_output is not None or base_weight is None:
        base_output = resolve_base_output(x, base_output, base_weight, base_bias)
    y = base_output
    if router is not None:
        base_y, router_h, _ = shrink_op(x, None, None, *_router_blocks(router), base_weight,
                                        base_bias, [], [])
        gates, active = router.finish(router_h[:, :router.rows])
        if y is None:
            y = base_y
    else:
        active = None
        if y is None:
            y = torch.nn.functional.linear(x, base_weight, base_bias)
    check_gates(gates, x, layout.num_experts)
    gates = gates.to(x.dtype).contiguous()
    if active is None:
        active = gates != 0
    full_bias = layout.full_shrink_bias(shrink_bias) \
        if layout.bias_start < layout.shrink_rows else None
    experts_x = x if adapter_input is None else adapter_input
    out = grouped_mixture_op(y.contiguous(), experts_x.contiguous(), gates,
                             active.contiguous(), shrink_weight, full_bias, expand_weight,
                             expand_bias, code, scales)[0]
    return out, gates


def _router_blocks(router: RouterOps | None) -> tuple[list, list, int]:
    """moa::shrink's router arguments: the first layer's blocks as the router holds them
    (stacked with the packed A in one concatenation inside the op), the biases present,
    and a bit mask of the blocks that have one."""
    if router is None:
        return [], [], 0
    biases = router.bias_parts
    return (list(router.weight_parts), [b for b in biases if b is not None],
            sum(1 << i for i, b in enumerate(biases) if b is not None))


def _code(layout: ExpertLayout) -> tuple[list[int], list[float]]:
    """layout_code(layout), cached in the layout in eager mode (under torch.compile built
    while tracing: plain Python, a constant of the graph)."""
    return layout.cached("moa_kernels.triton.code", lambda: layout_code(layout))
