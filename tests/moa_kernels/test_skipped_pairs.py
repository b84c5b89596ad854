"""A skipped (token, expert) pair adds exactly nothing, on every backend and path: a
non-finite expert output must not reach tokens that were not routed to it (0 * inf is NaN),
and gate normalisations must not turn underflowed gates into 0 / 0."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moa import MoALinear, RouterConfig
from moa_kernels import torch_ops
from moa_kernels.reference import reference_router
from tests.conftest import relative_error

BACKENDS = ["reference", "torch", "triton"]


def layer_with_a_broken_expert(tokens: int = 10) -> tuple[MoALinear, torch.Tensor]:
    """Three LoRA experts on nn.Linear(16, 12); expert 1's A is infinite, so its output is
    non-finite on every token. x: [tokens, 16]."""
    torch.manual_seed(0)
    layer = MoALinear(nn.Linear(16, 12), ["lora:4", "lora:3", "lora:5"], router=None)
    with torch.no_grad():
        for params in layer.expert_parameters():
            params["lora_B"].normal_()
        layer.expert_parameters()[1]["lora_A"].fill_(float("inf"))
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(1))
    return layer, x


def gates_for(tokens: int, density: str, routed_to_broken: list[int]) -> torch.Tensor:
    """[tokens, 3] gates: "dense" every token on experts 0 and 2; "sparse" each token on one
    of them (a third of the pairs active). Expert 1 only on `routed_to_broken`."""
    generator = torch.Generator().manual_seed(2)
    gates = torch.rand(tokens, 3, generator=generator) + 0.1
    gates[:, 1] = 0.0
    if density == "sparse":
        gates[torch.arange(tokens) % 2 == 0, 2] = 0.0
        gates[torch.arange(tokens) % 2 == 1, 0] = 0.0
    gates[routed_to_broken, 1] = 0.7
    return gates


def recorded_steps(monkeypatch) -> list[str]:
    """What the torch backend runs in a call, in order: its autograd Functions by name, and
    "plan" where it builds a routing plan."""
    steps = []
    real_apply, real_plan = torch_ops.apply_function, torch_ops.RoutingPlan

    def apply(function, *args):
        steps.append(function.__name__)
        return real_apply(function, *args)

    class RecordedPlan:
        @staticmethod
        def from_active(active):
            steps.append("plan")
            return real_plan.from_active(active)

    monkeypatch.setattr(torch_ops, "apply_function", apply)
    monkeypatch.setattr(torch_ops, "RoutingPlan", RecordedPlan)
    return steps


# (gates given: a planned call has no shrink to fuse with the base GEMM)
STEPS = {"masked": ["BaseAndShrink", "GatedExpand"],
         "planned-dense": ["plan", "GatedExpand"],
         "planned-sparse": ["plan", "SparseExperts"]}
PLANNED = torch_ops.SPARSE_PLAN_MIN_TOKENS


@pytest.mark.parametrize("backend", [*BACKENDS, "triton-grouped"])
@pytest.mark.parametrize("tokens, density, path", [
    (10, "dense", "masked"),  # below SPARSE_PLAN_MIN_TOKENS: the masked dense path outright
    (10, "sparse", "masked"),
    (PLANNED, "dense", "planned-dense"),  # at the threshold, most pairs active: planned,
    (PLANNED, "sparse", "planned-sparse"),  # then the dense fallback; few: SparseExperts
    (2 * PLANNED + 3, "dense", "planned-dense"),  # above it
    (2 * PLANNED + 3, "sparse", "planned-sparse"),
])
@pytest.mark.parametrize("broken_on", ["some", "none"])
def test_a_skipped_non_finite_expert_adds_nothing(backend, tokens, density, path, broken_on,
                                                  monkeypatch):
    layer, x = layer_with_a_broken_expert(tokens)
    if backend == "triton-grouped":
        monkeypatch.setenv("MOA_TRITON_SPARSE", "grouped")
        backend = "triton"
    layer.backend = backend
    routed_to_broken = [0, 3, tokens - 1] if broken_on == "some" else []
    gates = gates_for(tokens, density, routed_to_broken)
    fraction = (gates != 0).float().mean().item()
    assert (fraction > torch_ops.DENSE_ABOVE_ACTIVE_FRACTION) == (density == "dense")
    steps = recorded_steps(monkeypatch)
    with torch.no_grad():
        y = layer(x, gates, sparse=True)
        params = layer.expert_parameters()
        expected = layer.base(x)
        for e in (0, 2):
            expected = expected + gates[:, e:e + 1] * (
                x @ params[e]["lora_A"].t() @ params[e]["lora_B"].t())
    if backend == "torch":  # the path the case is named for really ran
        assert steps == STEPS[path]
    others = [t for t in range(tokens) if t not in routed_to_broken]
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


@pytest.mark.parametrize("backend", ["torch", "triton"])  # (the reference loop's
# gradients are not finite there: it multiplies the skipped pairs' deltas by zero)
def test_a_skipped_non_finite_expert_gives_no_gradient(backend):
    # The dense path of a sparse mode (the accelerators' path, and the CPU's on few
    # tokens): an adapter whose bottleneck is infinite (its down bias: silu(inf), and
    # silu' there, are not finite) is skipped on every token but two, whose output the
    # loss leaves out. On the other tokens nothing of it may reach a gradient: of x, of
    # the gates (its own gate's is exactly 0), of the other experts (hydra heads sharing
    # rows, a LoRA). Oracle: the reference loop on the same layer with that bias finite.
    torch.manual_seed(0)
    layer = MoALinear(nn.Linear(16, 12), ["lora:4", "adapter:3:silu", "hydra:2:2"],
                      router=None)
    with torch.no_grad():
        for params in layer.expert_parameters():
            for name, tensor in params.items():
                if name in ("lora_B", "up_weight", "up_bias", "down_bias"):
                    tensor.normal_()
    fixed = copy.deepcopy(layer)
    with torch.no_grad():
        layer.expert_parameters()[1]["down_bias"].fill_(float("inf"))
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(10, 16, generator=generator)
    gates = torch.rand(10, 4, generator=generator) + 0.1
    gates[:, 1] = 0.0
    gates[[0, 3], 1] = 0.7
    gates[5, 2] = 0.0  # a skipped hydra head beside an active one (they share A rows)
    others = [t for t in range(10) if t not in (0, 3)]
    cotangent = torch.randn(len(others), 12, generator=generator)
    results = {}
    for name, model, model_backend in (("expected", fixed, "reference"),
                                       ("actual", layer, backend)):
        model.backend = model_backend
        leaf_x, leaf_gates = x.clone().requires_grad_(True), gates.clone().requires_grad_(True)
        y = model(leaf_x, leaf_gates, sparse=True)
        (y[others] * cotangent).sum().backward()
        results[name] = [y[others].detach(), leaf_x.grad[others],
                         leaf_gates.grad[others][:, [0, 2, 3]],
                         model.shrink_weight.grad[:6],  # the LoRA's and the hydra's rows
                         model.expand_weight.grad[:, :8]]  # their columns
        if name == "actual":
            assert torch.equal(leaf_gates.grad[others, 1], torch.zeros(len(others)))
    for actual, expected in zip(results["actual"], results["expected"]):
        assert torch.isfinite(expected).all() and torch.isfinite(actual).all(), backend
        assert relative_error(actual, expected) < 1e-5, backend
