"""A skipped (token, expert) pair adds exactly nothing, on every backend and path: a
non-finite expert output must not reach tokens that were not routed to it (0 * inf is NaN),
and gate normalisations must not turn underflowed gates into 0 / 0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moa import MoALinear, RouterConfig
from moa_kernels import torch_ops
from moa_kernels.reference import reference_router
from tests.conftest import relative_error

BACKENDS = ["reference", "torch", "triton"]


def layer_with_a_broken_expert() -> tuple[MoALinear, torch.Tensor]:
    """Three LoRA experts on nn.Linear(16, 12); expert 1's A is infinite, so its output is
    non-finite on every token."""
    torch.manual_seed(0)
    layer = MoALinear(nn.Linear(16, 12), ["lora:4", "lora:3", "lora:5"], router=None)
    with torch.no_grad():
        for params in layer.expert_parameters():
            params["lora_B"].normal_()
        layer.expert_parameters()[1]["lora_A"].fill_(float("inf"))
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(1))
    return layer, x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("routed_to_broken", [
    [0, 3],  # 26 of 30 pairs active: the torch backend takes its dense fallback
    [],  # expert 1 on no token: every output finite
])
def test_a_skipped_non_finite_expert_adds_nothing(backend, routed_to_broken):
    layer, x = layer_with_a_broken_expert()
    layer.backend = backend
    gates = torch.rand(10, 3, generator=torch.Generator().manual_seed(2)) + 0.1
    gates[:, 1] = 0.0
    gates[routed_to_broken, 1] = 0.7
    fraction = (gates != 0).float().mean().item()
    assert fraction > torch_ops.DENSE_ABOVE_ACTIVE_FRACTION  # the dense fallback's case
    with torch.no_grad():
        y = layer(x, gates, sparse=True)
        params = layer.expert_parameters()
        expected = layer.base(x)
        for e in (0, 2):
            expected = expected + gates[:, e:e + 1] * (
                x @ params[e]["lora_A"].t() @ params[e]["lora_B"].t())
    others = [t for t in range(10) if t not in routed_to_broken]
    assert torch.isfinite(y[others]).all(), backend
    assert relative_error(y[others], expected[others]) < 1e-5
    if routed_to_broken:
        assert not torch.isfinite(y[routed_to_broken]).all()  # the broken expert did run


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_sigmoid_normalisation_of_underflowed_gates_is_finite(backend):
    # Logits so negative that sigmoid underflows to 0 for every expert: the kept top-2
    # gates sum to 0 and are normalised by 1, not divided by 0.
    torch.manual_seed(0)
    router = RouterConfig(kind="linear", gate="sigmoid", mode="topk", top_k=2,
                          normalize_topk=True)
    layer = MoALinear(nn.Linear(6, 5), ["lora:2", "lora:2", "lora:2"], router, backend=backend)
    with torch.no_grad():
        layer.router.bias.fill_(-200.0)
        layer.router.weight.zero_()
    x = torch.randn(4, 6)
    gates = layer.route(x)
    assert torch.equal(gates, torch.zeros_like(gates))
    y = layer(x)
    assert torch.isfinite(y).all()
    params = {"weight": layer.router.weight, "bias": layer.router.bias}
    oracle = reference_router(x, params, kind="linear", gate="sigmoid", mode="topk", top_k=2)
    assert torch.equal(oracle, torch.zeros_like(oracle))
