"""The oracle: a per-expert loop that reads like the math of docs/DESIGN.md section 2.

Every other backend is tested against these two functions. They favour clarity over
speed on purpose: each expert runs as its own pair of small matmuls over all tokens, the
way the published MoA code does, and autograd provides the backward.

    reference_router(x [..., in], params, ...)                    -> gates g [..., E]
    reference_moa_linear(x [..., in], base_weight, base_bias, experts, gates,
                         adapter_input=None)                      -> y [..., out]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATION_FUNCTIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "identity": lambda h: h,
}


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
        hidden = F.silu(F.linear(x, params["w1_weight"], params["w1_bias"])) * F.linear(
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
    if normalize_topk:
        kept = kept / kept.sum(dim=-1, keepdim=True)
    return kept


def reference_expert_delta(
    x: torch.Tensor, kind: str, scaling: float, activation: str,
    params: dict[str, torch.Tensor],
) -> torch.Tensor:
    """delta_e(x) [..., out] of one expert (hydra heads are lora experts sharing lora_A)."""
    if kind in ("lora", "hydra"):
        return scaling * F.linear(F.linear(x, params["lora_A"]), params["lora_B"])
    hidden = ACTIVATION_FUNCTIONS[activation](
        F.linear(x, params["down_weight"], params["down_bias"]))
    return F.linear(hidden, params["up_weight"], params["up_bias"])


def reference_moa_linear(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    experts: list[tuple[str, float, str, dict[str, torch.Tensor]]],
    gates: torch.Tensor,
    adapter_input: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = base(x) + sum_e g_e * delta_e(adapter_input).

    Args:
        x: [..., in] the layer input (base and router read it).
        experts: per expert (kind, scaling, activation, params) in gate order.
        gates: [..., E] the applied gates.
        adapter_input: [..., in] what the experts read (x after dropout); default x.
    Returns:
        [..., out] in the dtype of base(x).
    """
    adapter_input = x if adapter_input is None else adapter_input
    y = F.linear(x, base_weight, base_bias)
    for e, (kind, scaling, activation, params) in enumerate(experts):
        delta = reference_expert_delta(adapter_input, kind, scaling, activation, params)
        y = y + gates[..., e:e + 1].to(delta.dtype) * delta.to(y.dtype)
    return y
