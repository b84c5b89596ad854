import torch
from torch import nn

from moa import MoALinear, RouterConfig
from tests.conftest import relative_error


def test_torch_backend_matches_reference_on_a_mixed_layer():
    torch.manual_seed(0)
    layer = MoALinear(nn.Linear(37, 29), ["adapter:5:gelu", "lora:8", "hydra:4:3", "lora:3:6"],
                      RouterConfig(), backend="torch")
    with torch.no_grad():
        layer.expand_weight.normal_()
    x = torch.randn(3, 11, 37, requires_grad=True)
    results = {}
    for backend in ("reference", "torch"):
        layer.backend = backend
        layer.zero_grad()
        x.grad = None
        y = layer(x)
        y.square().sum().backward()
        results[backend] = [y.detach(), x.grad] + [p.grad for p in layer.parameters()
                                                   if p.requires_grad]
    for fused, expected in zip(results["torch"], results["reference"]):
        assert relative_error(fused, expected) < 1e-5
