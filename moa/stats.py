"""Router statistics: per router and expert, the mean gate and the fraction of tokens active.

Computed from the gates of the last forward pass that each router saw (`last_gates`), so
call it right after a forward on the data of interest. Every token of that forward counts,
padding included. Plots, if any, build on the plain dicts returned here.
"""

from __future__ import annotations

import torch
from torch import nn

from moa.modules.layer_router import LayerRouter
from moa.modules.linear import MoALinear, expert_names  # (expert_names: re-exported)


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


def router_stats(model: nn.Module) -> dict[str, dict]:
    """Per router of `model` (layer routers and MoALinears with their own router), keyed by
    module name: {"experts": [E] names, "mode" (the router's), "tokens", "mean_gate",
    "active_fraction"} from its last forward. Routers that have not run yet are left out."""
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, LayerRouter) and module.router is not None:
            gates, names = module.last_gates, module.expert_names
        elif isinstance(module, MoALinear) and module.router is not None:
            gates, names = module.last_gates, expert_names(module)
        else:
            continue
        if gates is not None:
            stats[name] = {"experts": list(names), "mode": module.router.config.mode,
                           **gate_stats(gates)}
    return stats


def short_router_name(name: str) -> str:
    """"model.layers.3.moa_router" -> "layers.3"; module routers keep their module path."""
    name = name.removeprefix("model.").removeprefix("base_model.")
    return name.removesuffix(".moa_router").removesuffix(".router")


def format_router_stats(stats: dict[str, dict]) -> str:
    """router_stats() as text: per set of expert names, a legend (e0 = its first expert,
    ...) and a table with a row per router and a column per expert, of the mean gates and
    (sparse modes) of the fraction of tokens active."""
    if not stats:
        return "(no router has run: call the model on a batch first, or the preset has none)"
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, entry in stats.items():
        groups.setdefault(tuple(entry["experts"]), []).append(name)
    blocks = []
    for experts, names in groups.items():
        blocks += ["experts:"] + [f"  e{i} = {e}" for i, e in enumerate(experts)]
        row_width = max(6, *(len(short_router_name(n)) for n in names))
        header = f"{'router':{row_width}s} " + " ".join(f"{f'e{i}':>6s}"
                                                        for i in range(len(experts)))
        sparse = any(stats[n]["mode"] != "soft" for n in names)
        for label, key in (("mean gate", "mean_gate"),
                           ("fraction of tokens active", "active_fraction")):
            if key == "active_fraction" and not sparse:
                blocks.append("(soft routing: every expert runs on every token)")
                continue
            blocks.append(f"{label} over {stats[names[0]]['tokens']} tokens")
            blocks.append(header)
            blocks += [f"{short_router_name(n):{row_width}s} " +
                       " ".join(f"{v:6.3f}" for v in stats[n][key]) for n in names]
    return "\n".join(blocks)


__all__ = ["expert_names", "format_router_stats", "gate_stats", "router_stats",
           "short_router_name"]
