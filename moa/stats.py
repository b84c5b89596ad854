"""Router statistics: per router and expert, the mean gate and the fraction of tokens active.

Computed from the gates of the last forward pass that each router saw (`last_gates`), so
call it right after a forward on the data of interest. Every token of that forward counts,
padding included. Plots, if any, build on the plain dicts returned here.
"""

from __future__ import annotations

import torch
from torch import nn

from moa.experts import LayerRouter
from moa.layers import MoALinear


def gate_stats(gates: torch.Tensor) -> dict:
    """Statistics of one router call.

    Args:
        gates: [..., E] the applied gates (any leading shape, any float dtype).
    Returns:
        {"tokens": T, "mean_gate": [E] floats (mean of g_e over the T tokens),
        "active_fraction": [E] floats (fraction of tokens with g_e > 0)}.
    """
    flat = gates.detach().reshape(-1, gates.shape[-1]).double()
    tokens = flat.shape[0]
    if tokens == 0:
        zeros = [0.0] * flat.shape[1]
        return {"tokens": 0, "mean_gate": zeros, "active_fraction": list(zeros)}
    return {"tokens": tokens, "mean_gate": flat.mean(dim=0).tolist(),
            "active_fraction": (flat > 0).double().mean(dim=0).tolist()}


def expert_names(layer: MoALinear) -> list[str]:
    """A name per gated expert of a MoALinear ("lora:8", hydra heads "hydra:8:8#h")."""
    names = []
    for spec in layer.specs:
        if spec.kind == "hydra":
            names += [f"{spec}#{h}" for h in range(spec.heads)]
        else:
            names.append(str(spec))
    return names


def router_stats(model: nn.Module) -> dict[str, dict]:
    """Per router of `model` (layer routers and MoALinears with their own router), keyed by
    module name: {"experts": [E] names, "tokens", "mean_gate", "active_fraction"} from its
    last forward. Routers that have not run yet are left out."""
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, LayerRouter) and module.router is not None:
            gates, names = module.last_gates, module.expert_names
        elif isinstance(module, MoALinear) and module.router is not None:
            gates, names = module.last_gates, expert_names(module)
        else:
            continue
        if gates is not None:
            stats[name] = {"experts": list(names), **gate_stats(gates)}
    return stats


__all__ = ["expert_names", "gate_stats", "router_stats"]
