"""The oracle: a per-expert loop that reads like the math of docs/DESIGN.md section 2.

Every other backend is tested against these functions. They favour clarity over
speed on purpose: each expert runs as its own pair of small matmuls over all tokens, the
way the published MoA code does, and autograd provides the backward.

    reference_router(x [..., in], params, ...)                    -> gates g [..., E]
    reference_moa_linear(x [..., in], base_weight, base_bias, experts, gates,
                         adapter_input=None)                      -> y [..., out]
    moa_linear(x [T, in], *, base_output | base_weight, ...)      -> (y [T, out], g [T, E])

`moa_linear` is this backend's side of the backend contract (moa_kernels/contract.py): the
same entry point, with the same arguments, as torch_ops.moa_linear and
moa_kernels.triton.moa_linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moa_kernels.activations import SILU, activation_by_name
from moa_kernels.contract import check_base_operands, check_gate_source, check_gates
from moa_kernels.layout import ExpertLayout
from moa_kernels.routing import RouterOps


def reference_router(
    x: torch.Tensor,
    params: dict[str, torch.Tensor | None],
    *,
    kind: str,
    gate: str,
    mode: str,
    max_threshold: float = 0.5,
    top_k: int = 2,
    normalize_topk: bool = True,
) -> torch.Tensor:
    """Applied gates g [..., E] for tokens x [..., in].

    params: {"weight", "bias"} (linear) or {"w1_weight", "w1_bias", "w3_weight", "w3_bias",
    "w2_weight", "w2_bias"} (swiglu), plus {"threshold_weight", "threshold_bias"} for the
    threshold and adaptive modes. A bias may be None (bias-free router).
    """
    if kind == "linear":
        logits = F.linear(x, params["weight"], params["bias"])
    else:
        hidden = SILU.function(F.linear(x, params["w1_weight"], params["w1_bias"])) * F.linear(
            x, params["w3_weight"], params["w3_bias"])
        logits = F.linear(hidden, params["w2_weight"], params["w2_bias"])
    p = torch.sigmoid(logits) if gate == "sigmoid" else torch.softmax(logits, dim=-1)

    if mode == "soft":
        return p
    if mode in ("threshold", "adaptive"):
        threshold = max_threshold * torch.sigmoid(
            F.linear(x, params["threshold_weight"], params["threshold_bias"]))
        if mode == "threshold":
            return p * (p >= threshold).to(p.dtype)
        above = p - threshold
        kept = above * (above >= 0).to(p.dtype)
        total = kept.sum(dim=-1, keepdim=True)
        return kept / torch.where(total == 0, torch.ones_like(total), total)
    # topk
    keep = torch.zeros_like(p).scatter(-1, p.topk(top_k, dim=-1).indices, 1.0)
    kept = p * keep
    if normalize_topk:  # kept gates that all underflowed to 0 stay 0 (not 0 / 0)
        total = kept.sum(dim=-1, keepdim=True)
        kept = kept / torch.where(total == 0, torch.ones_like(total), total)
    return kept


def reference_expert_delta(
    x: torch.Tensor, kind: str, scaling: float, activation: str,
    params: dict[str, torch.Tensor],
) -> torch.Tensor:
    """delta_e(x) [..., out] of one expert (hydra heads are lora experts sharing lora_A)."""
    if kind in ("lora", "hydra"):
        return scaling * F.linear(F.linear(x, params["lora_A"]), params["lora_B"])
    hidden = activation_by_name(activation).function(
        F.linear(x, params["down_weight"], params["down_bias"]))
    return F.linear(hidden, params["up_weight"], params["up_bias"])


def reference_mixture(
    base_output: torch.Tensor,
    adapter_input: torch.Tensor,
    experts: list[tuple[str, float, str, dict[str, torch.Tensor]]],
    gates: torch.Tensor,
    skip_zero_gates: bool = False,
) -> torch.Tensor:
    """base_output + sum_e g_e * delta_e(adapter_input).

    Args:
        base_output: [..., out] the frozen layer's output.
        adapter_input: [..., in] what the experts read (the layer input after dropout).
        experts: per expert (kind, scaling, activation, params) in gate order.
        gates: [..., E] the applied gates.
        skip_zero_gates: a pair whose gate is 0 is skipped: it adds exactly nothing (not
            0 * delta, which is NaN for a non-finite delta) and its gate gets no gradient.
    Returns:
        [..., out] in base_output's dtype.
    """
    y = base_output
    for e, (kind, scaling, activation, params) in enumerate(experts):
        delta = reference_expert_delta(adapter_input, kind, scaling, activation, params)
        gate = gates[..., e:e + 1].to(delta.dtype)
        gated = gate * delta
        if skip_zero_gates:
            gated = torch.where(gate != 0, gated, torch.zeros_like(gated))
        y = y + gated.to(y.dtype)
    return y


def reference_moa_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    experts: list[tuple[str, float, str, dict[str, torch.Tensor]]],
    gates: torch.Tensor,
    adapter_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = base(x) + sum_e g_e * delta_e(adapter_input), base(x) = x W^T + b.

    Args:
        x: [..., in] the layer input (base and router read it).
        experts: per expert (kind, scaling, activation, params) in gate order.
        gates: [..., E] the applied gates.
        adapter_input: [..., in] what the experts read (x after dropout); default x.
    Returns:
        [..., out] in the dtype of base(x).
    """
    adapter_input = x if adapter_input is None else adapter_input
    return reference_mixture(F.linear(x, base_weight, base_bias), adapter_input, experts,
                             gates)


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
    """The backend contract (moa_kernels/contract.py) by the per-expert loop.

    y = base + sum_e g_e delta_e(adapter_input) for 2-D x, base being `base_output` (the
    base module's output, any base) or x W^T + b from `base_weight`/`base_bias` (a plain
    linear). The gates are the router's reference gates (`router.reference_gates`) unless
    given; with `sparse` a zero gate skips its pair (adds nothing, gets no gradient).
    Returns y [T, out] and the applied gates [T, E], in x's dtype.
    """
    base = resolve_base_output(x, base_output, base_weight, base_bias)
    check_gate_source(router, gates)
    if gates is None:
        gates = router.reference_gates(x)
    check_gates(gates, x, layout.num_experts)
    gates = gates.to(x.dtype)
    experts = [(slot.kind, slot.scaling, slot.activation, params) for slot, params in
               zip(layout.slots, layout.expert_tensors(shrink_weight, shrink_bias,
                                                       expand_weight, expand_bias))]
    adapter_input = x if adapter_input is None else adapter_input
    return reference_mixture(base, adapter_input, experts, gates, skip_zero_gates=sparse), gates


def resolve_base_output(x: torch.Tensor, base_output: torch.Tensor | None,
                        base_weight: torch.Tensor | None,
                        base_bias: torch.Tensor | None) -> torch.Tensor:
    """The base output of the backend contract: base_output itself, or x W^T + b."""
    check_base_operands(x, base_output, base_weight)
    if base_output is not None:
        return base_output
    return F.linear(x, base_weight, base_bias)
