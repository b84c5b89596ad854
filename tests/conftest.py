"""Shared test helpers. The Triton interpreter must be switched on before triton is
imported, so it is set here, first.

Comparing tensors
-----------------
Errors are norms, measured in float64: ||actual - expected|| < tol * max(||expected||, floor).
Dividing by ||expected|| alone is meaningless where that norm is itself rounding noise: a
gradient that is zero by construction but computed as a difference of equal terms (adaptive
g = a / a with one active expert, topk k = 1 renormalised g = p / p, softmax over E = 1) is
~1e-15 in a float64 oracle and ~1e-7 in float32, so "noise / noise" reads 1e9 on one CPU
and 0 on another. And a gradient that is small because its terms cancel (a bias summed over
a cotangent of both signs, the one-scalar threshold bias) carries the rounding error of its
terms, not of its norm. Hence:

- A tensor's natural magnitude is about what its norm would be without cancellation:
  sqrt(numel) times the run's typical gradient element (`gradient_scale`).
- `rounding_floor(dtype, magnitude, tol)`: computed in `dtype`, such a tensor carries errors
  of up to ROUNDING_UNITS * eps(dtype) * magnitude. The floor is the norm at which that
  reaches tol, so measured against max(||expected||, floor) a tensor far below its natural
  magnitude is held to ROUNDING_UNITS rounding units of it, absolute, and any other to tol
  relative, as before. It is capped at the magnitude itself (bf16's 2e-2 is only 2.6
  units of eps = 2^-7, so there every tensor is measured against at least its natural size).
- `negligible_bound(dtype, magnitude)` / `assert_negligible`: for tensors that are zero by
  construction (the caller says why): NEGLIGIBLE_UNITS rounding units of their natural
  magnitude, asserted on each side instead of a comparison.
- `assert_results_match`: all of it, for the dicts of outputs and gradients that the
  backend tests compare.
"""

import importlib.util
import math
import os
from pathlib import Path
from types import ModuleType

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# Rounding units (eps(dtype) * natural magnitude) of error that a difference of two
# roundings of one gradient may show: where its norm is far below its natural magnitude
# (terms that cancel), the comparison allows this much absolute error. Measured on CPU in
# fp32: up to ~3 units (a one-scalar bias gradient summed from terms of both signs).
ROUNDING_UNITS = 8
# Rounding units that a gradient which is zero by construction may carry. Measured on CPU:
# up to ~5 units in fp32 (torch backend) and ~14 in the float64 oracle (with
# ATEN_CPU_CAPABILITY=default), both for g = a / a, whose noise is amplified by 1 / a; the
# triton kernels accumulate in fp32 and stay below 2 units of fp16. A real router gradient
# in the fp32 tests is over 10^4 units, in the fp16 ones over 100.
NEGLIGIBLE_UNITS = 64

# entries of a result dict that are outputs, not gradients (see assert_results_match)
OUTPUT_KEYS = ("y", "last_gates")


def benchmark_script(name: str) -> ModuleType:
    """benchmarks/NAME.py imported as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def norm(tensor: torch.Tensor) -> float:
    return tensor.double().norm().item()


def gradient_scale(result: dict, skip=()) -> float:
    """The typical size of one gradient element of a run: the root-mean-square over every
    element of the gradients in `result` (name -> tensor or None; OUTPUT_KEYS and `skip`
    left out). Every gradient of a run is summed from products of the same cotangent and
    activations, so a tensor of n elements has a natural magnitude of about sqrt(n) times
    this."""
    grads = [value for key, value in result.items()
             if key not in OUTPUT_KEYS and key not in skip and value is not None]
    count = sum(value.numel() for value in grads)
    return (sum(norm(value) ** 2 for value in grads) / count) ** 0.5 if count else 0.0


def rounding_floor(dtype: torch.dtype, magnitude: float, tol: float) -> float:
    """min(ROUNDING_UNITS * eps(dtype) / tol, 1) * magnitude: the floor for comparing, at
    tolerance `tol`, a tensor computed in `dtype` whose natural magnitude is `magnitude`
    (see the module docstring)."""
    return min(ROUNDING_UNITS * torch.finfo(dtype).eps / tol, 1.0) * magnitude


def negligible_bound(dtype: torch.dtype, magnitude: float) -> float:
    """NEGLIGIBLE_UNITS * eps(dtype) * magnitude: the largest norm that a tensor which is
    zero by construction may have when computed in `dtype` with natural magnitude
    `magnitude`. (That is 8e-6 of the magnitude in fp32 and 1e-14 in float64, but 6% in
    fp16 and 50% in bf16: there a check for gross errors only.)"""
    return NEGLIGIBLE_UNITS * torch.finfo(dtype).eps * magnitude


def relative_error(actual: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """||actual - expected|| / max(||expected||, floor) in float64.

    floor: the smallest scale the error is measured against (`rounding_floor`); pass one
    wherever ||expected|| can be rounding noise. With floor 0 and ||expected|| = 0 the
    absolute difference is returned (0 when both are zero)."""
    actual, expected = actual.double(), expected.double()
    scale = max(expected.norm().item(), floor)
    difference = (actual - expected).norm().item()
    if scale == 0.0:
        return difference
    return difference / scale


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, *, name: str,
                 floor: float) -> None:
    """||actual - expected|| < tol * max(||expected||, floor), or both equal (where the scale
    is 0: an exactly zero expected with no floor, e.g. T = 0, must be matched exactly)."""
    difference = norm(actual.double() - expected.double())
    scale = max(norm(expected), floor)
    assert difference == 0.0 or difference < tol * scale, (
        f"{name}: error {difference / scale if scale else float('inf'):.3g} >= {tol:g}, "
        f"relative to max(||expected|| = {norm(expected):.3g}, floor = {floor:.3g}); "
        f"||actual|| = {norm(actual):.3g}")


def assert_negligible(tensor: torch.Tensor, bound: float, name: str) -> None:
    """||tensor|| <= bound: a tensor that is zero by construction is zero up to rounding."""
    size = norm(tensor)
    assert size <= bound, f"{name}: norm {size:.3g} > {bound:.3g}, should be zero up to rounding"


def assert_results_match(actual: dict, expected: dict, tol: float, *, dtype: torch.dtype,
                         expected_dtype: torch.dtype | None = None,
                         vanishing=(), floors: dict | None = None) -> None:
    """Every entry of `actual` (name -> tensor or None) against `expected`.

    dtype / expected_dtype: what each side computed in (expected_dtype defaults to dtype).
    - Outputs (OUTPUT_KEYS): relative error to their own norm; y holds base(x) and gates are
      O(1) or exactly zero, never rounding noise.
    - Names in `vanishing` are zero by construction (the caller knows why, e.g.
      `router_gates_vanish`): each side must be negligible in its own dtype.
    - Other gradients: relative error with floor `rounding_floor`, or the caller's floor
      for that name in `floors` (name -> norm) where it is larger: one derived from the
      gradient's own terms (e.g. a long reduction's accumulated rounding).
    Magnitudes are natural ones: sqrt(numel) * the `gradient_scale` of the expected
    gradients that do not vanish.
    """
    assert actual.keys() == expected.keys()
    assert set(vanishing) <= expected.keys()
    expected_dtype = expected_dtype or dtype
    scale = gradient_scale(expected, skip=vanishing)
    for key, want in expected.items():
        got = actual[key]
        assert (got is None) == (want is None), f"{key}: one side gave no gradient"
        if want is None:
            continue
        assert got.shape == want.shape, f"{key}: {tuple(got.shape)} != {tuple(want.shape)}"
        magnitude = scale * want.numel() ** 0.5
        if key in vanishing:
            assert_negligible(want, negligible_bound(expected_dtype, magnitude),
                              f"{key} (expected, zero by construction)")
            assert_negligible(got, negligible_bound(dtype, magnitude),
                              f"{key} (actual, zero by construction)")
        elif key in OUTPUT_KEYS:
            assert_close(got, want, tol, name=key, floor=0.0)
        else:
            floor = max(rounding_floor(dtype, magnitude, tol), (floors or {}).get(key, 0.0))
            assert_close(got, want, tol, name=key, floor=floor)


def router_gates_vanish(layer, gates: torch.Tensor) -> bool:
    """True when the applied gates do not depend on the router at all, so that every router
    (and threshold) gradient is mathematically zero and only rounding noise remains:
    - softmax over E = 1 expert gives p = 1 whatever the logits;
    - topk with normalize_topk and k = 1 gives g = p / p = 1 for the kept expert;
    - adaptive where no token has two or more active experts gives g = a / a = 1 (or 0);
    - no gate is non-zero at all (nothing active): g = p * 0.
    `gates` are the applied gates of the oracle's run."""
    if layer.router is None:
        return False
    config = layer.router.config
    if config.gate == "softmax" and layer.num_experts == 1:
        return True
    if config.mode == "topk" and config.normalize_topk and config.top_k == 1:
        return True
    if config.mode == "adaptive" and bool(((gates != 0).sum(-1) <= 1).all()):
        return True
    return not bool(gates.any())


def threshold_layer_as_one(result: dict) -> dict:
    """`result` with the gradients of the threshold layer, the weight and the bias of one
    Linear(in, 1), joined into one tensor "...router.threshold". For adaptive mode: there
    the threshold gradient is ill-conditioned, g = a / sum(a) sums to 1, so per token the
    terms dL/dg_e * dg_e/dG, each amplified by 1 / sum(a), cancel, and the bias gradient
    (one scalar, also summed over tokens of both signs) is a small difference of large
    terms: its relative rounding error reached 9e-6 in fp32 (triton against reference, one
    ATen build), at a tolerance of 1e-5. As one tensor the layer's gradient is measured
    against its own norm, still at the full tolerance."""
    result = dict(result)
    for prefix in ("grad router.", "router."):
        names = prefix + "threshold_weight", prefix + "threshold_bias"
        if all(result.get(name) is not None for name in names):
            parts = [result.pop(name).flatten() for name in names]
            result[prefix + "threshold"] = torch.cat(parts)
    return result


def router_keys(result: dict) -> set:
    """The names of the router's gradients in a result dict."""
    return {key for key in result if "router" in key}


def sparse_run_with_outside_gates(layer, x: torch.Tensor, gates: torch.Tensor,
                                  backend: str) -> dict:
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
    result = {"y": y.detach(), "grad x": leaf.grad, "grad gates": gate_leaf.grad}
    for name, parameter in layer.named_parameters():
        if parameter.requires_grad:
            result[f"grad {name}"] = parameter.grad
    return result


def output_weighting(shape, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weighting of y [T, out] under which run_with_gradients differentiates, fp32: a
    ramp from -1 to 1 over y's elements in row-major order (both signs, drifting along T),
    rounded to `dtype` first when given (the cotangent a run in `dtype` receives)."""
    weights = torch.linspace(-1.0, 1.0, math.prod(shape), device=device).reshape(shape)
    return weights if dtype is None else weights.to(dtype).float()


def run_with_gradients(layer, x: torch.Tensor, backend: str, gates=None,
                       seed: int | None = 7, weights_dtype: torch.dtype | None = None):
    """y and the gradients of x and of every trainable tensor of `layer(x[, gates])` on
    `backend` under a fixed weighting of y, and the gates the layer applied. seed: the
    global seed set just before the call (the same dropout mask for every backend), or None
    to leave the generator alone. weights_dtype: round the weighting to this dtype first
    (a bf16 run's backward starts from the weighting rounded to bf16, so a float64 oracle of
    that run is given weights_dtype=torch.bfloat16 to differentiate the same values)."""
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    y = layer(x, gates) if gates is not None else layer(x)
    weights = output_weighting(y.shape, y.device, weights_dtype)
    (y.float() * weights).sum().backward()
    grads = {"y": y.detach(), "x": x.grad}
    for name, parameter in layer.named_parameters():
        if parameter.requires_grad:
            grads[name] = parameter.grad
    return grads, layer.last_gates


@pytest.fixture
def seeded():
    torch.manual_seed(1234)
    return torch.Generator().manual_seed(1234)
