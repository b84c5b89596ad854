"""The auxiliary load-balancing loss: `GateCollector` gathers the applied gates of every
router call of a forward (with their graph), `load_balancing_loss` turns one call's gates
into the Switch-style loss E * sum_e f_e P_e (for routers that select experts, on their
scores and selections, as the published MoE-LoRA baselines define it), and `CollectingHook`
routes a MoALinear with its own router in a pre-hook so that its gates are collected.
MoAModel.forward adds aux_loss_coef times the mean (or, with aux_loss_reduction "sum", the
sum) of the calls' losses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from moa.modules.dispatch import Hook
from moa_kernels.torch_ops import host_reads_are_free

if TYPE_CHECKING:
    from moa.modules.linear import MoALinear


class GateCollector:
    """Collects the applied gates [T, E] (with their graph) of every router call while
    `active`, for the auxiliary load-balancing loss. With a `token_mask` [B, S] (the
    attention mask of the call), a router call over those same B x S tokens (as [B, S, E]
    or flattened to [B * S, E]) keeps only the tokens the mask marks: padding does not count
    towards the balance. Calls over other tokens (an encoder-decoder's decoder, say) count
    every token; an instance router's call (gates [B, 1, E], one row per sequence) keeps
    the sequences with a token the mask marks. The masked tokens are left out on the CPU;
    elsewhere (where selecting rows by a mask would synchronise the host with the device)
    their gates are zeroed instead, which `load_balancing_loss` counts exactly as no
    token."""

    def __init__(self) -> None:
        self.active = False
        self.gates: list[torch.Tensor] = []
        self.token_mask: torch.Tensor | None = None

    def add(self, gates: torch.Tensor, active: torch.Tensor | None = None,
            scores: torch.Tensor | None = None) -> None:
        """One router call's applied gates [..., E]; for a router that selects experts (top-k,
        threshold, adaptive), also which pairs it selected (active) and its scores (the
        probabilities before selection: `gates_from_first_layer(balance=True)`), [..., E]
        or flattened, which the loss then reads instead of the gates."""
        if not self.active:
            return
        selected = None
        if active is not None and scores is not None:
            gates, selected = scores, active.reshape(-1, active.shape[-1])
        flat = gates.reshape(-1, gates.shape[-1])
        mask, keep = self.token_mask, None
        if mask is not None and (tuple(gates.shape[:-1]) == tuple(mask.shape)
                                 or flat.shape[0] == mask.numel()):
            keep = mask.reshape(-1).bool()
        elif mask is not None and tuple(gates.shape[:-1]) == (mask.shape[0], 1):
            keep = mask.bool().any(dim=1)  # an instance router: a sequence of padding only
        if keep is not None:
            if host_reads_are_free(flat.device):
                flat = flat[keep]
                selected = None if selected is None else selected[keep]
            else:  # a boolean selection syncs: zero the rows, which the loss counts as no token
                flat = torch.where(keep[:, None], flat, 0.0)
                selected = None if selected is None else selected & keep[:, None]
        self.gates.append(flat if selected is None else (flat, selected))


def load_balancing_loss(gates: torch.Tensor, selected: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Switch-style load-balancing loss of one router call, E * sum_e f_e * P_e.

    Args:
        gates: [T, E] the applied gates (with grad); with selected, the router's scores
            instead (`GateCollector.add`).
        selected: [T, E] bool, the pairs a top-k, threshold or adaptive router selected, or
            None.
    Returns:
        a scalar. Without selected: P_e is the mean over tokens of the token's gates
        normalised to sum 1, f_e the fraction of tokens whose largest gate is expert e (no
        gradient); 1 for a uniform router. With selected, as the published top-k,
        threshold and adaptive MoE-LoRA layers define it: P_e the mean score, f_e the
        fraction of tokens that selected expert e (summing to k for top-k). Tokens whose
        row is all zero (padding zeroed by GateCollector) count as no token.
    """
    gates = gates.float()
    num_experts = gates.shape[-1]
    if selected is not None:
        routed = (gates != 0).any(dim=-1)
        count = routed.sum().clamp_min(1)
        fraction = ((selected & routed[:, None]).float().sum(dim=0) / count).detach()
        return num_experts * (fraction * (gates.sum(dim=0) / count)).sum()
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


class CollectingHook(Hook):
    """Forward pre-hook for a MoALinear with its own router: while the collector is active,
    route here (keeping the gates' graph for the auxiliary loss) and pass the gates on."""

    def __init__(self, collector: GateCollector) -> None:
        self.collector = collector

    def __call__(self, module: MoALinear, args, kwargs):
        # Route here on every call, the same way collecting or not, so that a checkpoint's
        # recompute (the collector inactive) takes the same path as the forward it replays:
        # on the oracle backends a router that selects runs twice for its scores.
        if not module.active or kwargs.get("gates") is not None or len(args) > 1:
            return None
        x = args[0] if args else kwargs["x"]
        if module.router.config.is_sparse:
            gates, active, scores = module.route(x, balance=True)
            self.collector.add(gates, active, scores)
        else:
            gates = module.route(x)
            self.collector.add(gates)
        return args, {**kwargs, "gates": gates, "sparse": module.router.config.is_sparse}


def collecting_pre_hook(collector: GateCollector) -> Callable:
    """A forward pre-hook (with_kwargs) for a MoALinear with its own router: see
    CollectingHook."""
    return CollectingHook(collector)


__all__ = ["CollectingHook", "GateCollector", "collecting_pre_hook", "load_balancing_loss"]
