"""Router statistics: expert names, the numbers per router, and their text tables."""

import torch
from torch import nn

from moa import MoAConfig, MoALinear, get_moa_model
from moa.stats import expert_names, format_router_stats, gate_stats
from tests.moa.tiny import perturb, tiny_llama, token_batch


def test_expert_names_are_distinct():
    layer = MoALinear(nn.Linear(8, 8), ["lora:8", "lora:8", "adapter:4", "hydra:2:2", "lora:2",
                                        "hydra:2:2"])
    assert expert_names(layer) == ["lora:8#0", "lora:8#1", "adapter:4:silu", "hydra:2:2#0",
                                   "hydra:2:2#1", "lora:2", "hydra:2:2#2", "hydra:2:2#3"]


def test_gate_stats_counts_mean_and_activity():
    gates = torch.tensor([[0.5, 0.0], [0.25, 1.0], [0.0, 1.0], [0.25, 0.0]])
    assert gate_stats(gates) == {"tokens": 4, "mean_gate": [0.25, 0.5],
                                 "active_fraction": [0.75, 0.5]}


def test_tables_show_the_activation_rate_only_for_sparse_routers(capsys):
    soft = {"model.layers.0.moa_router": {"experts": ["q:lora:8", "prompt:10"], "mode": "soft",
                                           "tokens": 6, "mean_gate": [0.25, 0.5],
                                           "active_fraction": [1.0, 1.0]}}
    text = format_router_stats(soft)
    assert "e0 = q:lora:8" in text and "e1 = prompt:10" in text
    assert "mean gate over 6 tokens" in text and "layers.0  0.250  0.500" in text
    assert "every expert runs on every token" in text and "active over" not in text
    sparse = {name: {**entry, "mode": "threshold", "active_fraction": [0.5, 0.125]}
              for name, entry in soft.items()}
    assert "layers.0  0.500  0.125" in format_router_stats(sparse)
    assert "no router has run" in format_router_stats({})


def test_print_router_stats_of_a_model(capsys):
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("molora"))
    perturb(moa, scale=0.5)
    moa.print_router_stats()
    assert "no router has run" in capsys.readouterr().out
    with torch.no_grad():
        moa(token_batch(2, 5))
    moa.print_router_stats()
    out = capsys.readouterr().out
    assert "e7 = lora:8:8#7" in out and "layers.1.mlp.down_proj" in out
    assert out.count("experts:") == 1  # every module router has the same experts: one table
