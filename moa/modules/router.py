"""Routers: `MoARouter`, a MoALinear's own router (linear or SwiGLU head, sigmoid or
softmax, soft, threshold, adaptive or top-k gates; docs/DESIGN.md section 2), with
`threshold_straight_through` for a learned Sparse MoA threshold, and `GroupGates`, the
UniPELT-style gates of a "group" layer router. The router of a whole decoder layer, which
holds one of these, is in layer_router.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moa.config import RouterConfig
from moa.modules.dispatch import autocast_off, compute_dtype, generate_cached
from moa_kernels import reference, torch_ops
from moa_kernels.routing import RouterOps, gates_from_first_layer


def threshold_straight_through(gates: torch.Tensor, threshold_logit: torch.Tensor,
                               max_threshold: float) -> torch.Tensor:
    """Sparse MoA gates g = p * [p >= G] with a straight-through gradient for G.

    Args:
        gates: [T, E] the applied gates p * m; threshold_logit: [T, 1] w_G . x + b_G.
    Returns:
        [T, E] equal to `gates` in value (G - G is exactly 0), with d g_e / d G = -g_e: on a
        pair that runs, raising the threshold acts as lowering its gate by p_e; a skipped
        pair (g_e = 0) adds nothing, so every backend (the sparse ones never compute a
        skipped expert's output) gives the reference's gradient. d g / d p is unchanged.
    """
    threshold = max_threshold * torch.sigmoid(threshold_logit)
    return gates * (1 + (threshold.detach() - threshold))



def _in_dtype(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """tensor in dtype (None stays None); no op where it is in dtype already."""
    return tensor if tensor is None or tensor.dtype == dtype else tensor.to(dtype)

class MoARouter(nn.Module):
    """Per-token gates g [..., E] over E experts (docs/DESIGN.md section 2).

    Parameters are named as `router_parameters()` reports them: weight, bias (linear) or
    w1_weight, w1_bias, w3_weight, w3_bias, w2_weight, w2_bias (swiglu); threshold_weight
    [1, in] and threshold_bias [1] in the threshold and adaptive modes. Biases start at zero,
    weights as nn.Linear's. In mode "threshold" the threshold tensors are frozen
    (requires_grad False: the published method never updates them) unless
    config.learn_threshold, which trains them through `threshold_straight_through`.
    """

    def __init__(self, in_features: int, num_experts: int, config: RouterConfig | None = None,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        config = RouterConfig() if config is None else config
        if not isinstance(config, RouterConfig):
            raise TypeError(f"router must be a RouterConfig or None, got {type(config).__name__}")
        config.check_num_experts(num_experts)
        if config.kind == "group":
            raise ValueError("a 'group' router gates the adapter groups of a decoder layer "
                             "(MoAConfig with router_scope 'layer' or 'instance'); a "
                             "MoALinear's own router is 'linear' or 'swiglu'")
        self.config, self.in_features, self.num_experts = config, in_features, num_experts
        factory = {"device": device, "dtype": dtype}
        if config.kind == "linear":
            self._linear("weight", "bias", num_experts, in_features, config.bias, factory)
        else:
            hidden = config.hidden_factor * num_experts
            self._linear("w1_weight", "w1_bias", hidden, in_features, config.bias, factory)
            self._linear("w3_weight", "w3_bias", hidden, in_features, config.bias, factory)
            self._linear("w2_weight", "w2_bias", num_experts, hidden, config.bias, factory)
        if config.uses_threshold:
            self._linear("threshold_weight", "threshold_bias", 1, in_features, True, factory)
            if config.mode == "threshold" and not config.learn_threshold:
                self.threshold_weight.requires_grad_(False)
                self.threshold_bias.requires_grad_(False)

    def _linear(self, weight_name, bias_name, rows, columns, bias, factory) -> None:
        weight = nn.Parameter(torch.empty(rows, columns, **factory))
        if weight.device.type != "meta":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.register_parameter(weight_name, weight)
        self.register_parameter(bias_name, nn.Parameter(torch.zeros(rows, **factory))
                                if bias else None)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The live parameters by name (None for an absent bias)."""
        names = ["weight", "bias"] if self.config.kind == "linear" else \
            ["w1_weight", "w1_bias", "w3_weight", "w3_bias", "w2_weight", "w2_bias"]
        if self.config.uses_threshold:
            names += ["threshold_weight", "threshold_bias"]
        return {name: getattr(self, name) for name in names}

    def ops(self, dtype: torch.dtype) -> RouterOps:
        """First layer (its blocks, to fuse into a shrink GEMM) and finisher, in `dtype`."""
        config = self.config
        if config.kind == "linear":
            weights, biases = [self.weight], [self.bias]
        else:
            weights, biases = [self.w1_weight, self.w3_weight], [self.w1_bias, self.w3_bias]
        if config.uses_threshold:
            # In threshold mode G only enters through a comparison, so it gets no gradient;
            # detaching keeps its .grad None exactly as in the reference.
            detach = config.mode == "threshold" and not config.learn_threshold
            weights.append(self.threshold_weight.detach() if detach else self.threshold_weight)
            biases.append(self.threshold_bias.detach() if detach else self.threshold_bias)
        w2_weight = getattr(self, "w2_weight", None)
        w2_bias = getattr(self, "w2_bias", None)

        def finish(first_layer, balance: bool = False):
            """first_layer: [T, F], or its blocks (one per weight block) apart; balance: the
            load-balancing scores too (`gates_from_first_layer`)."""
            blocks = [first_layer] if isinstance(first_layer, torch.Tensor) else \
                list(first_layer)
            # The head is tiny ([T, F]): run it in at least fp32 (fp64 stays fp64).
            head_dtype = torch.float64 if blocks[0].dtype == torch.float64 else torch.float32
            blocks = [_in_dtype(block, head_dtype) for block in blocks]
            gates, active, *scores = gates_from_first_layer(
                blocks[0] if isinstance(first_layer, torch.Tensor) else blocks,
                kind=config.kind, gate=config.gate,
                mode=config.mode, num_experts=self.num_experts,
                w2_weight=_in_dtype(w2_weight, head_dtype),
                w2_bias=_in_dtype(w2_bias, head_dtype),
                max_threshold=config.max_threshold, top_k=config.top_k,
                normalize_topk=config.normalize_topk, balance=balance)
            if config.learn_threshold:  # the threshold logit is the last column
                gates = threshold_straight_through(gates, blocks[-1][:, -1:],
                                                   config.max_threshold)
            return (gates, active, *scores)

        return RouterOps(weights, biases, finish, self.reference_gates, dtype)

    def reference_gates(self, x: torch.Tensor) -> torch.Tensor:
        """Gates by the reference router, in x's dtype."""
        params = {k: None if v is None else v.to(x.dtype) for k, v in self.tensors().items()}
        c = self.config
        gates = reference.reference_router(
            x, params, kind=c.kind, gate=c.gate, mode=c.mode, max_threshold=c.max_threshold,
            top_k=c.top_k, normalize_topk=c.normalize_topk)
        if c.learn_threshold:
            gates = threshold_straight_through(
                gates, F.linear(x, params["threshold_weight"], params["threshold_bias"]),
                c.max_threshold)
        return gates

    def forward(self, x: torch.Tensor, balance: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Applied gates g [..., E] for x [..., in] (fused: one matmul for the first layer);
        with balance, (g, active or None, scores) [T, E] each for the load-balancing loss
        (`gates_from_first_layer`; active None in soft mode), T the flattened tokens."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"router input has last dimension {x.shape[-1]}, "
                             f"expected in_features={self.in_features}")
        dtype = compute_dtype(x)
        ops = generate_cached(self, ("ops", dtype), lambda: self.ops(dtype))
        with autocast_off(x):
            flat = x.reshape(-1, self.in_features).to(dtype)
            if getattr(self, "generate_cache", None) is not None and \
                    not torch.is_grad_enabled():  # inside generate: stacked once per call
                first = F.linear(flat, ops.first_weight, ops.first_bias)
            else:  # one GEMM over the blocks, stacked once per call inside the op
                first = torch_ops.stacked_linear(flat, ops.weight_parts, [
                    b if b is not None else w.shape[0]
                    for w, b in zip(ops.weight_parts, ops.bias_parts)],
                    [w.shape[0] for w in ops.weight_parts])
            gates, active, *scores = ops.finish(first, balance)
        gates = gates.to(dtype).reshape(*x.shape[:-1], self.num_experts)
        return (gates, active, scores[0]) if balance else gates

    def extra_repr(self) -> str:
        c = self.config
        return (f"in_features={self.in_features}, experts={self.num_experts}, kind={c.kind}, "
                f"gate={c.gate}, mode={c.mode}")


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


__all__ = ["GroupGates", "MoARouter", "threshold_straight_through"]
