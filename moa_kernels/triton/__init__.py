"""Triton kernels for MoALinear: the twin of moa_kernels/torch_ops.py (same entry point,
same semantics), run as three custom ops (see ops.py).

Plan (T tokens, R stacked shrink rows, C expand columns, F router first-layer width):

Dense (soft mode, or gates given):
  1. y = base(x) (given by the layer for any base; for a plain linear the frozen GEMM
     stays with cuBLAS), h = moa::shrink(x, [A_stack;
     W_router1]) [T, R + F] fp32: x is read once for every expert and the router.
  2. The router finishes from h[:, R:] with ordinary autograd ([T, F] tensors only).
  3. y = moa::gated_expand(y, h[:, :R], g): activation, gate and scaling in the operand
     prologue, expand GEMM, gated up-biases and the base output in the epilogue.
Sparse (threshold, adaptive, topk):
  1. y = base(x), h = moa::shrink(x, W_router1) (router rows only).
  2. The gates give a `TritonPlan` (pairs sorted by expert and by shrink group) built on
     the device without a host sync.
  3. H = moa::grouped_shrink(x, plan) on active pairs only (rows gathered in the loads),
     then y = moa::gated_expand(y, H, g, plan), skipping experts per token tile.
Backward: registered per op; see each kernel file's docstring.
"""

from __future__ import annotations

import torch

from moa_kernels.backends import check_triton_input
from moa_kernels.layout import ExpertLayout
from moa_kernels.reference import resolve_base_output
from moa_kernels.routing import RouterOps
from moa_kernels.triton.ops import gated_expand_op, grouped_shrink_op, shrink_op
from moa_kernels.triton.plan import KernelLayout, TritonPlan

__all__ = ["moa_linear", "KernelLayout", "TritonPlan"]


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
    meta = KernelLayout.of(layout, x.device)
    rows = layout.shrink_rows
    full_bias = layout.full_shrink_bias(shrink_bias)
    y = resolve_base_output(x, base_output, base_weight, base_bias).contiguous()
    fused = adapter_input is None and not sparse
    hidden = active = None
    if router is not None:
        if fused:
            first_bias = router.first_bias if router.first_bias is not None else \
                router.first_weight.new_zeros(router.first_weight.shape[0])
            h = shrink_op(x, torch.cat([shrink_weight, router.first_weight]),
                          torch.cat([full_bias, first_bias]))
            hidden, router_h = h[:, :rows], h[:, rows:]
        else:
            router_h = shrink_op(x, router.first_weight, router.first_bias)
        gates, active = router.finish(router_h)  # fp32: the head runs in fp32 anyway
    if gates is None or gates.shape != (x.shape[0], layout.num_experts):
        shape = None if gates is None else tuple(gates.shape)
        raise ValueError(f"gates must have shape {(x.shape[0], layout.num_experts)}, "
                         f"got {shape}")
    gates = gates.to(x.dtype).contiguous()
    expert_input = x if adapter_input is None else adapter_input
    if not sparse:
        if hidden is None:
            hidden = shrink_op(expert_input, shrink_weight, full_bias)
        y = gated_expand_op(y, hidden, gates, expand_weight, expand_bias, meta.expert_meta,
                            meta.expert_scale, meta.group_meta, meta.max_rank, None, None, None)
        return y, gates
    if active is None:
        active = gates != 0
    plan = TritonPlan.build(active, meta)
    groups, experts = plan.groups, plan.experts
    hidden = grouped_shrink_op(expert_input, shrink_weight, full_bias, groups.token_index,
                               groups.offsets, groups.active, meta.group_meta, meta.max_rank)
    y = gated_expand_op(y, hidden, gates, expand_weight, expand_bias, meta.expert_meta,
                        meta.expert_scale, meta.group_meta, meta.max_rank, experts.active,
                        experts.token_index, experts.offsets)
    return y, gates
