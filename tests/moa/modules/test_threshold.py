"""The Sparse MoA threshold: frozen by default (the published method never updates it), or
learned through the straight-through estimator of RouterConfig(learn_threshold=True), which
leaves every forward value and every other gradient as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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


ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "identity": lambda h: h}


def threshold_gradient_by_hand(module: MoALinear) -> dict[str, torch.Tensor]:
    """The threshold's gradient for run()'s loss L = sum(y^2), written out in float64 from
    README "Sparse MoA's thresholds": dL/dG_t = -sum_e g_te dL/dg_te over the pairs that run
    (g_te = 0 on the others), with dL/dg_te = 2 y_t . delta_e(x_t), then through
    G = max_threshold * sigmoid(w_G . x + b_G)."""
    x = torch.randn(2, 11, 9, generator=torch.Generator().manual_seed(2)).double()
    x = x.reshape(-1, 9)
    with torch.no_grad():
        gates = module.route(x.float()).double()  # the applied gates, 0 on skipped pairs
        deltas = []
        for spec, params in zip(module.specs, module.expert_parameters()):
            params = {k: v.double() for k, v in params.items()}
            if spec.kind == "adapter":
                hidden = ACTIVATIONS[spec.activation](
                    x @ params["down_weight"].t() + params["down_bias"])
                deltas.append(hidden @ params["up_weight"].t() + params["up_bias"])
            else:
                deltas.append(spec.scaling * (x @ params["lora_A"].t() @ params["lora_B"].t()))
        delta = torch.stack(deltas, 1)  # [T, E, out]
        y = module.base(x.float()).double() + (gates[:, :, None] * delta).sum(1)
        grad_gates = 2 * (y[:, None, :] * delta).sum(-1)  # [T, E]
        grad_threshold = -(gates * grad_gates).sum(1)  # [T]
        router = module.router_parameters()
        logit = x @ router["threshold_weight"].double().t()[:, 0] + \
            router["threshold_bias"].double()
        sigmoid = torch.sigmoid(logit)
        grad_logit = grad_threshold * module.router.config.max_threshold * sigmoid * \
            (1 - sigmoid)
    assert 0 < (gates == 0).double().mean() < 1  # some pairs skipped, some run
    return {"router.threshold_weight": (grad_logit @ x)[None],
            "router.threshold_bias": grad_logit.sum()[None]}


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_every_backend_learns_the_threshold_gradient_written_out(backend):
    """Against the formula, not against threshold_straight_through (which every backend
    calls, so a sign error there would agree with itself)."""
    module = layer(True, backend)
    expected = threshold_gradient_by_hand(module)
    _, actual = run(module)
    for name, grad in expected.items():
        assert relative_error(actual[name].double(), grad) < 1e-5, name


@pytest.mark.parametrize("mode", ["soft", "adaptive", "topk"])
def test_learn_threshold_is_for_the_threshold_mode_only(mode):
    with pytest.raises(ValueError, match="learn_threshold applies to mode 'threshold'"):
        RouterConfig(mode=mode, learn_threshold=True)
