"""Shared test helpers. The Triton interpreter must be switched on before triton is
imported, so it is set here, first."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.norm().item()
    difference = (actual - expected).norm().item()
    if scale == 0.0:
        return difference
    return difference / scale


def sparse_run_with_outside_gates(layer, x: torch.Tensor, gates: torch.Tensor,
                                  backend: str) -> list[torch.Tensor]:
    """y and the gradients of x, of the gates and of every trainable tensor of
    `layer(x, gates, sparse=True)` on `backend`, after checking that every zero gate got a
    zero gradient (a skipped pair)."""
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    leaf, gate_leaf = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
    y = layer(leaf, gate_leaf, sparse=True)
    weights = torch.linspace(-1.0, 1.0, y.numel(), device=y.device).reshape(y.shape)
    (y.float() * weights).sum().backward()
    assert torch.all(gate_leaf.grad[gates == 0] == 0), backend
    return [y.detach(), leaf.grad, gate_leaf.grad] + [
        p.grad for p in layer.parameters() if p.requires_grad]


@pytest.fixture
def seeded():
    torch.manual_seed(1234)
    return torch.Generator().manual_seed(1234)
