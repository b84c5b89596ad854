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
choice from its bytes and FLOPs. Sparse modes run the dense GEMMs with the inactive pairs
masked (expand.py says why that is the fast way on a GPU); no routing plan is built.
"""

from __future__ import annotations

import torch

from moa_kernels.backends import check_triton_input
from moa_kernels.layout import ExpertLayout
from moa_kernels.reference import resolve_base_output
from moa_kernels.routing import RouterOps
from moa_kernels.triton.kernel_utils import align16
from moa_kernels.triton.ops import gated_expand_op, shrink_op
from moa_kernels.triton.plan import KernelLayout, layout_code

__all__ = ["moa_linear", "KernelLayout"]


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
    moa_kernels/backends.py).

    Args:
        x: [T, in]. adapter_input: [T, in] what the experts read (x after dropout), or None.
        base_output: [T, out] the base module's output for x (any base); or base_weight
            [out, in] and base_bias [out] of a plain linear (cuBLAS computes x W^T + b).
        shrink_weight [R, in], shrink_bias [R - layout.bias_start], expand_weight [out, C],
        expand_bias [N_ad, out]: the stacked expert tensors (fp32, fp16 or bf16).
        router: the router's first layer and finisher; or None with `gates` [T, E] given.
        sparse: skip inactive (token, expert) pairs (the router's `active` mask).
    Returns:
        y [T, out] in x's dtype and the applied gates [T, E] in x's dtype.
    """
    check_triton_input(x)
    code, scales = _code(layout)
    width = align16(layout.expand_columns)
    if base_output is not None or base_weight is None:
        base_output = resolve_base_output(x, base_output, base_weight, base_bias)
    full_bias = layout.full_shrink_bias(shrink_bias) \
        if layout.bias_start < layout.shrink_rows else None
    first_weight = router.first_weight if router is not None else None
    first_bias = router.first_bias if router is not None else None
    if adapter_input is None:  # one GEMM over x for the experts, the router and the base
        y, h = shrink_op(x, shrink_weight, full_bias, first_weight, first_bias, base_weight,
                         base_bias, code, scales)
        hidden, router_h = h[:, :width], h[:, width:]
    else:  # the experts read adapter_input (x after dropout); router and base read x
        y = x.new_empty(0)
        router_h = None
        if router is not None:
            y, router_h = shrink_op(x, None, None, first_weight, first_bias, base_weight,
                                    base_bias, [], [])
        elif base_weight is not None:
            y = torch.nn.functional.linear(x, base_weight, base_bias)
        hidden = shrink_op(adapter_input, shrink_weight, full_bias, None, None, None, None,
                           code, scales)[1][:, :width]
    if base_output is not None:
        y = base_output
    active = None
    if router is not None:
        gates, active = router.finish(router_h[:, :first_weight.shape[0]])
    if gates is None or gates.shape != (x.shape[0], layout.num_experts):
        shape = None if gates is None else tuple(gates.shape)
        raise ValueError(f"gates must have shape {(x.shape[0], layout.num_experts)}, "
                         f"got {shape}")
    gates = gates.to(x.dtype).contiguous()
    if not sparse:
        active = None
    elif active is None:
        active = gates != 0
    out, _ = gated_expand_op(y, hidden, gates, active, expand_weight, expand_bias, code,
                             scales)
    return out, gates


def _code(layout: ExpertLayout) -> tuple[list[int], list[float]]:
    """layout_code(layout), cached in the layout in eager mode (under torch.compile built
    while tracing: plain Python, a constant of the graph)."""
    if torch.compiler.is_compiling():
        return layout_code(layout)
    key = "moa_kernels.triton.code"
    if key not in layout._cache:
        layout._cache[key] = layout_code(layout)
    return layout._cache[key]
