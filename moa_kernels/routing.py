"""Gates from router logits, and the per-call routing plan of the sparse modes.

The router's first layer is a plain linear map of x, so the fused backends compute it in
the same GEMM as the experts' shrink (x is read once). `gates_from_first_layer` finishes
the router from that output; `RoutingPlan` lists the active (token, expert) pairs sorted
by expert, built once per MoALinear call by the torch backend's sparse path (the Triton
backend's sparse plans are in moa_kernels/triton/: masked dense GEMMs, or its own pair plan
in grouped.py).

Shapes: T tokens, E experts, H router hidden width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moa_kernels.activations import SILU
from moa_kernels.fusable import fusable_linear


def gates_from_first_layer(
    first_layer: torch.Tensor | Sequence[torch.Tensor],
    *,
    kind: str,
    gate: str,
    mode: str,
    num_experts: int,
    w2_weight: torch.Tensor | None = None,
    w2_bias: torch.Tensor | None = None,
    max_threshold: float = 0.5,
    top_k: int = 2,
    normalize_topk: bool = True,
    balance: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None,
                                                      torch.Tensor]:
    """Finish the router.

    Args:
        first_layer: [T, F] the router's first-layer output: the logits [T, E] (linear)
            or [T, 2H] = [W1 x + b1, W3 x + b3] (swiglu), then one threshold logit column
            in the threshold and adaptive modes; or those blocks as separate tensors (the
            logits, or W1 x + b1 and W3 x + b3; then the threshold logit [T, 1]), as a
            fused GEMM returns them (no slicing, and no gradient gathered back into one).
    Returns:
        gates [T, E] (the applied gates g, dtype of first_layer) and active [T, E] bool
        (which pairs must run), None in soft mode (every pair runs); with balance, also
        the scores [T, E] a load-balancing loss averages (moa.modules.aux_loss): the
        router's probabilities p before any selection, and in adaptive mode p minus the
        threshold (as the published top-k, threshold and adaptive MoE-LoRA layers take them).
    """
    blocks = None if isinstance(first_layer, torch.Tensor) else list(first_layer)
    body = first_layer
    if mode in ("threshold", "adaptive"):
        if blocks is None:
            body, threshold_logit = first_layer[:, :-1], first_layer[:, -1:]
        else:
            blocks, threshold_logit = blocks[:-1], blocks[-1]
    if blocks is not None:
        body = blocks[0] if kind != "swiglu" else tuple(blocks)
    if kind == "swiglu":
        logits = swiglu_head(body, w2_weight, w2_bias)
    else:
        logits = body
    if logits.shape[-1] != num_experts:
        raise ValueError(f"the router gives {logits.shape[-1]} logits per token, expected "
                         f"num_experts={num_experts}")
    p = torch.sigmoid(logits) if gate == "sigmoid" else torch.softmax(logits, dim=-1)

    scores = p
    if mode == "soft":
        gates, active = p, None
    elif mode in ("threshold", "adaptive"):
        threshold = max_threshold * torch.sigmoid(threshold_logit)
        if mode == "threshold":
            active = p >= threshold
            gates = p * active
        else:
            scores = above = p - threshold
            active = above >= 0
            kept = above * active
            total = kept.sum(dim=-1, keepdim=True)
            gates = kept / torch.where(total == 0, 1.0, total)
    else:
        chosen = p.topk(top_k, dim=-1).indices
        active = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, chosen, True)
        gates = p * active
        if normalize_topk:
            total = gates.sum(dim=-1, keepdim=True)  # 0 where every kept sigmoid underflows
            gates = gates / torch.where(total == 0, 1.0, total)
    return (gates, active, scores) if balance else (gates, active)


def swiglu_head(first_layer: torch.Tensor | Sequence[torch.Tensor], w2_weight: torch.Tensor,
                w2_bias: torch.Tensor | None) -> torch.Tensor:
    """The SwiGLU router's logits W2 (silu(u) * v) + b2 from its first layer [T, 2H] =
    [u, v], or from the pair (u, v) of [T, H] tensors.

    Saves the first layer's v, silu(u) and the product (and W2) for the backward, which
    then recomputes nothing ([T, H] each, H a few times the experts: small beside the
    layer's width; a recompute would be two launches more per layer); u itself only goes
    to silu's derivative. Plain ops under torch.compile (the compiler picks what to save)
    and without grad mode."""
    if isinstance(first_layer, torch.Tensor):
        up, gate_half = first_layer.chunk(2, dim=-1)
    else:
        up, gate_half = first_layer
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return fusable_linear(SILU.function(up) * gate_half, w2_weight, w2_bias)
    return _SwiGLUHead.apply(up, gate_half, w2_weight, w2_bias)


class _SwiGLUHead(torch.autograd.Function):
    """(u [T, H], v [T, H], W2 [E, H], b2 [E] or None) -> logits [T, E]; the gradients of
    u and v are returned apart (no concatenation)."""

    @staticmethod
    def forward(ctx, up, gate_half, w2_weight, w2_bias):
        activated = SILU.function(up)
        product = activated * gate_half
        ctx.save_for_backward(up, gate_half, w2_weight, activated, product)
        ctx.has_bias = w2_bias is not None
        return F.linear(product, w2_weight, w2_bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logits):
        up, gate_half, w2_weight, activated, product = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_up = grad_gate_half = grad_w2 = grad_b2 = None
        if needs[0] or needs[1]:
            grad_hidden = grad_logits @ w2_weight  # [T, H]
            if needs[0]:  # d silu(u) / du by autograd's own kernel (one op)
                grad_up = SILU.derivative(grad_hidden * gate_half, up)
            if needs[1]:
                grad_gate_half = grad_hidden * activated
        if needs[2]:
            grad_w2 = grad_logits.t() @ product
        if needs[3] and ctx.has_bias:
            grad_b2 = grad_logits.sum(0)
        return grad_up, grad_gate_half, grad_w2, grad_b2


@dataclass
class RoutingPlan:
    """Active (token, expert) pairs, sorted by expert then token.

    token_index [N] int64: token of each pair; expert_index [N] int64: its expert;
    counts [E] int64 and offsets [E + 1] int64 on the device; counts_host: the same
    counts as a Python list (one host sync, at build time, never inside a kernel loop).
    """

    token_index: torch.Tensor
    expert_index: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    counts_host: list[int]

    @property
    def num_pairs(self) -> int:
        return int(self.token_index.numel())

    @classmethod
    def from_active(cls, active: torch.Tensor) -> RoutingPlan:
        """Build from active [T, E] bool."""
        pairs = active.t().nonzero()  # [N, 2] as (expert, token), row-major = sorted
        counts = active.sum(dim=0)
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=active.device)
        torch.cumsum(counts, dim=0, out=offsets[1:])
        return cls(pairs[:, 1].contiguous(), pairs[:, 0].contiguous(), counts, offsets,
                   counts.tolist())


class RouterOps:
    """What a fused backend needs from a router: its first layer, to fold into the shrink
    GEMM, and a function that finishes the gates from that layer's output.

    weight_parts: the first layer's row blocks [F_i, in] (W1 and W3 of a SwiGLU router, the
    threshold row), as the router holds them (any float dtype): a backend stacks them with
    its own rows once (`torch_ops.stack_rows`, cached per parameter version);
    bias_parts: the matching biases [F_i] or None; dtype: the compute dtype.
    first_weight [F, in] and first_bias [F] or None: the same stacked in dtype (made on
    first use, with the graph of the concatenation). finish(first_layer [T, F], or its
    blocks [T, F_i] as separate tensors) returns (gates [T, E], active [T, E] bool or None:
    every pair), as `gates_from_first_layer` does; reference_gates(x [T, in]) gives the
    same gates by the reference router (the oracle backend's way), or is None.
    """

    def __init__(self, weight_parts, bias_parts, finish, reference_gates=None,
                 dtype: torch.dtype | None = None) -> None:
        self.weight_parts = tuple(weight_parts)
        self.bias_parts = tuple(bias_parts)
        self.finish = finish
        self.reference_gates = reference_gates
        self.dtype = dtype if dtype is not None else self.weight_parts[0].dtype
        self.rows = sum(w.shape[0] for w in self.weight_parts)
        self._first: tuple | None = None

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._first is None:
            weights, biases = self.weight_parts, self.bias_parts
            weight = torch.cat(weights).to(self.dtype) if len(weights) > 1 else \
                weights[0].to(self.dtype)
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0])
                                  for w, b in zip(weights, biases)]).to(self.dtype)
            self._first = (weight, bias)
        return self._first

    @property
    def first_weight(self) -> torch.Tensor:
        return self._stacked()[0]

    @property
    def first_bias(self) -> torch.Tensor | None:
        return self._stacked()[1]
