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


@pytest.fixture
def seeded():
    torch.manual_seed(1234)
    return torch.Generator().manual_seed(1234)
