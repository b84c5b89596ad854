"""The Sparse MoA threshold: frozen by default (the published method never updates it), or
learned through the straight-through estimator of RouterConfig(learn_threshold=True), which
leaves every forward value and every other gradient as they were."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moa import MoALinear, RouterConfig
from tests.conftest import relative_error

EXPERTS = ["lora:4", "lora:2:4", "adapter:3:gelu"]


def layer(learn_threshold: bool, backend: str) -> MoALinear:
    torch.manual_seed(0)
    module = MoALinear(nn.Linear(9, 7), EXPERTS, backend=backend,
                       router=RouterConfig(kind="linear", mode="threshold",
                                           learn_threshold=learn_threshold))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in module.named_parameters():
            if param.is_floating_point() and param.dim() > 0:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return module


def run(module: MoALinear) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    x = torch.randn(2, 11, 9, generator=torch.Generator().manual_seed(2))
    y = module(x)
    y.square().sum().backward()
    return y.detach(), {name: None if p.grad is None else p.grad.clone()
                        for name, p in module.named_parameters() if not name.startswith("base.")}


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_the_threshold_is_frozen_by_default_and_learns_on_request(backend):
    frozen_layer, learned_layer = layer(False, backend), layer(True, backend)
    frozen_y, frozen = run(frozen_layer)
    learned_y, learned = run(learned_layer)
    thresholds = ["router.threshold_weight", "router.threshold_bias"]
    assert not any(frozen_layer.get_parameter(n).requires_grad for n in thresholds)
    assert all(frozen[name] is None for name in thresholds)  # as published
    assert all(learned[name] is not None and learned[name].abs().sum() > 0
               for name in thresholds)
    # the same outputs and the same gradients for everything else, bit for bit
    assert torch.equal(frozen_y, learned_y)
    for name, grad in frozen.items():
        if name not in thresholds:
            assert torch.equal(grad, learned[name]), name
    assert 0 < (learned_layer.last_gates == 0).float().mean() < 1  # some pairs skipped


def test_every_backend_learns_the_reference_threshold_gradient():
    _, expected = run(layer(True, "reference"))
    _, fused = run(layer(True, "torch"))
    for name in ("router.threshold_weight", "router.threshold_bias"):
        assert relative_error(fused[name], expected[name]) < 1e-5, name


@pytest.mark.parametrize("mode", ["soft", "adaptive", "topk"])
def test_learn_threshold_is_for_the_threshold_mode_only(mode):
    with pytest.raises(ValueError, match="learn_threshold applies to mode 'threshold'"):
        RouterConfig(mode=mode, learn_threshold=True)
