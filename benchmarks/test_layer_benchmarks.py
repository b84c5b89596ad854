"""pytest-benchmark microbenchmarks of the issue-2 layer shapes (CPU, fp32).

    .venv/bin/python -m pytest benchmarks --benchmark-only --benchmark-group-by=param:phase

Absolute times only; the ratios the targets speak of come from benchmarks/layer_ratios.py,
which interleaves the cases in one run.
"""

import pytest
import torch
from torch import nn

from moa.cli.bench import L1, M8_SOFT, M8_TOPK
from moa.modules.linear import MoALinear

TOKENS = FEATURES = 2048


@pytest.fixture(scope="module")
def tensors():
    torch.manual_seed(0)
    base = nn.Linear(FEATURES, FEATURES).requires_grad_(False)
    x = torch.randn(TOKENS, FEATURES, requires_grad=True)
    return base, x, torch.randn(TOKENS, FEATURES)


def _module(case, backend, base):
    if case is None:
        return base
    layer = MoALinear(base, list(case.experts), case.router, backend=backend)
    with torch.no_grad():
        layer.expand_weight.normal_(0.0, 0.02)
    return layer


@pytest.mark.parametrize("phase", ["forward", "train"])
@pytest.mark.parametrize("case,backend", [
    (None, "base"),  # the frozen nn.Linear alone: the denominator of every ratio
    (L1, "torch"), (L1, "reference"),
    (M8_SOFT, "torch"), (M8_TOPK, "torch"),
], ids=["base", "L1-torch", "L1-reference", "M8soft-torch", "M8topk-torch"])
def test_layer(benchmark, tensors, case, backend, phase):
    base, x, grad_y = tensors
    module = _module(case, backend, base)

    def forward():
        with torch.no_grad():
            return module(x)

    def train():
        x.grad = None
        module(x).backward(grad_y)

    benchmark.pedantic(forward if phase == "forward" else train, rounds=5, warmup_rounds=1)
