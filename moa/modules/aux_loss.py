"""The auxiliary load-balancing loss: `GateCollector` gathers the applied gates of every
router call of a forward (with their graph), `load_balancing_loss` turns one call's gates
into the Switch-style loss E * sum_e f_e P_e, and `CollectingHook` routes a MoALinear with
its own router in a pre-hook so that its gates are collected. MoAModel.forward adds
aux_loss_coef times the mean of the calls' losses.
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
    every token. The masked tokens are left out on the CPU; elsewhere (where selecting rows
    by a mask would synchronise the host with the device) their gates are zeroed instead,
    which `load_balancing_loss` counts exactly as no token."""

    def __init__(self) -> None:
        self.active = False
        self.gates: list[torch.Tensor] = []
        self.token_mask: torch.Tensor | None = None

    def add(self, gates: torch.Tensor) -> None:
        if not self.active:
            return
        flat = gates.reshape(-1, gates.shape[-1])
        mask = self.token_mask
        if mask is not None and (tuple(gates.shape[:-1]) == tuple(mask.shape)
                                 or (gates.dim() == 2 and flat.shape[0] == mask.numel())):
            keep = mask.reshape(-1).bool()
            if host_reads_are_free(flat.device):
                flat = flat[keep]
            else:  # a boolean selection syncs: zero gates, which the loss counts as no token
                flat = torch.where(keep[:, None], flat, 0.0)
        self.gates.append(flat)


def load_balancing_loss(gates: torch.Tensor) -> torch.Tensor:
    """Switch-style load-balancing loss of one router call, E * sum_e f_e * P_e.

    Args:
        gates: [T, E] the applied gates (with grad).
    Returns:
        a scalar: P_e is the mean over tokens of the token's gates normalised to sum 1
        (tokens whose gates are all zero count as zero), f_e the fraction of those tokens
        whose largest gate is expert e (no gradient). It is 1 for a uniform router.
    """
    gates = gates.float()
    num_experts = gates.shape[-1]
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
        # Route here on every call, collecting or not, so that a checkpoint's recompute
        # takes the same path as the forward it replays.
        if not module.active or kwargs.get("gates") is not None or len(args) > 1:
            return None
        x = args[0] if args else kwargs["x"]
        gates = module.route(x)
        self.collector.add(gates)
        return args, {**kwargs, "gates": gates, "sparse": module.router.config.is_sparse}


def collecting_pre_hook(collector: GateCollector) -> Callable:
    """A forward pre-hook (with_kwargs) for a MoALinear with its own router: see
    CollectingHook."""
    return CollectingHook(collector)


__all__ = ["CollectingHook", "GateCollector", "collecting_pre_hook", "load_balancing_loss"]
