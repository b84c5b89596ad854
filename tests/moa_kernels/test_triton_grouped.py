"""The triton backend's grouped sparse plan (MOA_TRITON_SPARSE=grouped,
moa_kernels/triton/grouped.py) against the reference backend, forward and backward.

Each case builds one sparse-mode MoALinear, runs it with backend="reference" and with
backend="triton" under the grouped plan, and compares y and the gradients of x, of every
trainable parameter (expert weights and biases, router) and, with outside gates, of the
gates; every case also checks that the grouped plan really ran (its pair plan was built).
Errors are measured as in tests/conftest.py (a tolerance against max(||expected||, a
rounding floor); router gradients that vanish by construction asserted negligible). On the
CPU the kernels run in the Triton interpreter; bf16 dots there are computed in fp32 (the
3.9 interpreter's bf16 dot is wrong; compiled kernels use bf16 tensor cores).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from moa import MoALinear, RouterConfig  # noqa: E402
from tests.conftest import (  # noqa: E402
    assert_negligible,
    assert_results_match,
    relative_error,
    router_gates_vanish,
    router_keys,
    run_with_gradients,
    sparse_run_with_outside_gates,
    threshold_layer_as_one,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
pytestmark = pytest.mark.skipif(not (ON_GPU or INTERPRETED),
                                reason="needs CUDA, or TRITON_INTERPRET=1")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

ALL_ACTIVATIONS = ["adapter:6:silu", "lora:1", "adapter:3:gelu", "lora:32", "adapter:9:relu",
                   "lora:5", "adapter:2:identity"]  # E = 7, ranks 1..32

# (id, experts, router config, T, in, out); the id says which edge the case covers
CASES = [
    # T = 1: one pair tile, a token smaller than every tile; lora of several ranks, topk 2
    ("t1-topk-lora-ranks", ["lora:1", "lora:8", "lora:33"],
     RouterConfig(kind="linear", mode="topk", top_k=2), 1, 16, 24),
    # T = 70 (not a multiple of the 64-pair tile), threshold mode, every activation
    ("t70-threshold-every-activation", ALL_ACTIVATIONS, RouterConfig(mode="threshold"),
     70, 19, 23),
    # adaptive mode with hydra heads (shared A rows, duplicated per head), T = 65
    ("t65-adaptive-hydra", ["hydra:5:3", "lora:4", "adapter:7:gelu"],
     RouterConfig(mode="adaptive"), 65, 20, 18),
    # topk 3 of 10 (every activation + hydra), softmax, T = 130: three tiles per expert
    ("t130-topk-activations-hydra", ALL_ACTIVATIONS + ["hydra:5:3"],
     RouterConfig(gate="softmax", mode="topk", top_k=3), 130, 19, 23),
    # ranks past one 64-column rank block (w = 80), in and out past one 64-column tile
    ("rank-chunks-wide-features", ["adapter:70:relu", "lora:66", "lora:3"],
     RouterConfig(kind="linear", mode="topk", top_k=2), 9, 130, 71),
    # a bottleneck adapter of each activation alone, threshold, odd sizes
    ("adapter-silu-threshold", ["adapter:5:silu", "lora:2"], RouterConfig(mode="threshold"),
     17, 13, 11),
    ("adapter-gelu-topk-unnormalised", ["adapter:5:gelu", "lora:2"],
     RouterConfig(mode="topk", top_k=1, normalize_topk=False), 17, 13, 11),
    ("adapter-relu-adaptive", ["adapter:5:relu", "lora:2", "lora:3"],
     RouterConfig(mode="adaptive"), 17, 13, 11),
    ("adapter-identity-topk", ["adapter:5:identity", "lora:2"],
     RouterConfig(kind="linear", mode="topk", top_k=1, normalize_topk=False), 17, 13, 11),
]


def _make_layer(experts, router, in_features, out_features, dtype, dropout=0.0):
    torch.manual_seed(0)
    layer = MoALinear(nn.Linear(in_features, out_features), experts, router, dropout=dropout,
                      backend="triton").to(device=DEVICE, dtype=dtype)
    with torch.no_grad():  # fresh random values everywhere (B starts at zero otherwise)
        for parameter in layer.parameters():
            if parameter.requires_grad:
                parameter.normal_(0.0, 0.4)
    return layer


@pytest.fixture
def grouped(monkeypatch):
    """MOA_TRITON_SPARSE=grouped, and a count of the pair plans built (the plan ran)."""
    from moa_kernels.triton import grouped as module

    monkeypatch.setenv("MOA_TRITON_SPARSE", "grouped")
    built = []
    original = module.PairPlan.of.__func__

    def counting(cls, active):
        built.append(tuple(active.shape))
        return original(cls, active)

    monkeypatch.setattr(module.PairPlan, "of", classmethod(counting))
    return built


def _compare(layer, x, dtype, built):
    """Grouped triton in `dtype` against the reference (a float64 copy for fp16 / bf16, as
    test_triton_ops does). Returns (expected, actual, router gradients vanished)."""
    if dtype == torch.float32:
        oracle_dtype = dtype
        expected, routing = run_with_gradients(layer, x, "reference")
    else:
        oracle_dtype = torch.float64
        expected, routing = run_with_gradients(copy.deepcopy(layer).double(), x.double(),
                                               "reference")
    before = len(built)
    actual, _ = run_with_gradients(layer, x, "triton")
    assert len(built) > before, "the grouped plan did not run"
    for name, value in actual.items():
        assert value is None or value.dtype == dtype, name
    vanish = router_gates_vanish(layer, routing)
    if layer.router.config.mode == "adaptive":
        actual, expected = threshold_layer_as_one(actual), threshold_layer_as_one(expected)
    assert_results_match(actual, expected, TOLERANCE[dtype], dtype=dtype,
                         expected_dtype=oracle_dtype,
                         vanishing=router_keys(expected) if vanish else ())
    return expected, actual, vanish


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_grouped_matches_reference(case, dtype, grouped):
    _, experts, router, tokens, in_features, out_features = case
    layer = _make_layer(experts, router, in_features, out_features, dtype)
    x = torch.randn(tokens, in_features, device=DEVICE, dtype=dtype)
    expected, _, _ = _compare(layer, x, dtype, grouped)
    assert expected["shrink_weight"].abs().sum() > 0  # the comparison is not vacuous
    active = layer.last_gates != 0
    assert 0 < int(active.sum()) < active.numel() or tokens == 1  # sparse, not all or none


# token counts: on a GPU past one wave of tiles and past one weight-gradient split per
# expert (512 pairs); on the CPU (interpreter) one size of several tiles per expert
TOKENS = [1000, 4096, 16384] if ON_GPU else [257]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_token_counts_top2_of_8_with_ranks_above_32(tokens, dtype, grouped):
    # M8-like top-2 of 8 with heterogeneous ranks (48, 40 above the 32-column rank step)
    experts = ["lora:48", "adapter:40:gelu", "lora:8", "hydra:8:2", "adapter:16:silu",
               "lora:16", "lora:4"]
    layer = _make_layer(experts, RouterConfig(gate="softmax", mode="topk", top_k=2), 96, 80,
                        dtype)
    with torch.no_grad():  # moderate values: sums over 96 features stay O(1)
        for parameter in layer.parameters():
            if parameter.requires_grad:
                parameter.mul_(0.3)
    x = torch.randn(tokens, 96, device=DEVICE, dtype=dtype)
    _compare(layer, x, dtype, grouped)


def _forced_router_layer(dtype, mode, bias_values, threshold_bias=0.0, top_k=1, tokens=0):
    """A linear-router layer whose gates depend on the bias only (weights zeroed)."""
    layer = _make_layer(["lora:4", "adapter:5:silu", "lora:2", "hydra:3:2"],
                        RouterConfig(kind="linear", mode=mode, top_k=top_k,
                                     normalize_topk=False), 17, 15, dtype)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor(bias_values))
        if layer.router.config.uses_threshold:
            layer.router.threshold_weight.zero_()
            layer.router.threshold_bias.fill_(threshold_bias)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_experts_without_pairs(dtype, grouped):
    # topk k = 1 with one larger logit: expert 2 gets all 70 tokens, experts 0, 1, 3, 4 none
    layer = _forced_router_layer(dtype, "topk", [0.0, 0.0, 1.0, 0.0, 0.0])
    x = torch.randn(70, 17, device=DEVICE, dtype=dtype)
    expected, actual, vanish = _compare(layer, x, dtype, grouped)
    assert not vanish
    assert (layer.last_gates.count_nonzero(dim=0).cpu() == torch.tensor([0, 0, 70, 0, 0])).all()
    # the experts that ran on no pair get exactly zero gradients
    for e, slot in enumerate(layer.layout.slots):
        rows = actual["shrink_weight"][slot.shrink[0]:slot.shrink[1]]
        columns = actual["expand_weight"][:, slot.expand[0]:slot.expand[1]]
        assert ((rows == 0).all() and (columns == 0).all()) == (e != 2), e
    assert (actual["expand_bias"] == 0).all()  # the adapter (expert 1) ran on no pair


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_all_pairs_active(dtype, grouped):
    # threshold mode with p = sigmoid(4) = 0.98 above G <= 0.5: every pair runs
    layer = _forced_router_layer(dtype, "threshold", [4.0] * 5)
    x = torch.randn(70, 17, device=DEVICE, dtype=dtype)
    _compare(layer, x, dtype, grouped)
    assert (layer.last_gates > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_pair_active(dtype, grouped):
    # threshold mode with p ~ 0 below G = 0.5 sigmoid(20): no pair runs, y = base(x)
    layer = _forced_router_layer(dtype, "threshold", [-20.0] * 5, threshold_bias=20.0)
    x = torch.randn(5, 17, device=DEVICE, dtype=dtype)
    expected, actual, vanish = _compare(layer, x, dtype, grouped)
    assert vanish and (layer.last_gates == 0).all()
    torch.testing.assert_close(actual["y"], layer.base(x).detach())
    for result in (expected, actual):
        for name, grad in result.items():
            if name not in ("y", "x") and grad is not None:
                assert_negligible(grad, 0.0, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_outside_gates_get_their_gradient(dtype, grouped):
    # sparse=True with outside gates (a sparse-mode layer router), 3-D input: a zero gate
    # is a skipped pair; the gates' gradient is compared as well
    layer = _make_layer(["lora:4", "adapter:3:gelu", "hydra:2:2"], None, 13, 11, dtype)
    x = torch.randn(2, 9, 13, device=DEVICE, dtype=dtype)
    gates = torch.rand(2, 9, 4, device=DEVICE, dtype=dtype)
    gates = gates * (torch.rand(2, 9, 4, device=DEVICE) < 0.4)
    results = {}
    for backend in ("reference", "triton"):
        before = len(grouped)
        results[backend] = sparse_run_with_outside_gates(layer, x, gates, backend)
        assert (len(grouped) > before) == (backend == "triton")
    assert_results_match(results["triton"], results["reference"], TOLERANCE[dtype], dtype=dtype)


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_dropout_on_the_adapter_input(mode, grouped):
    # training with dropout: the grouped experts read dropout(x), router and base read x
    layer = _make_layer(["lora:4", "adapter:3:silu"], RouterConfig(mode=mode, top_k=1,
                                                                   normalize_topk=False),
                        13, 11, torch.float32, dropout=0.3)
    layer.train()
    x = torch.randn(9, 13, device=DEVICE)
    _compare(layer, x, torch.float32, grouped)


def test_weight_gradients_split_over_pair_chunks(monkeypatch, grouped):
    # 16 pairs per split: experts with many pairs reduce their weight gradients from
    # several partials (the deterministic second pass), checked against the reference
    from moa_kernels.triton import grouped as module

    monkeypatch.setattr(module, "PAIRS_PER_SPLIT", 16)
    assert module._splits(200, 4) == 4
    layer = _make_layer(ALL_ACTIVATIONS, RouterConfig(mode="topk", top_k=3), 19, 23,
                        torch.float32)
    x = torch.randn(130, 19, device=DEVICE)
    _compare(layer, x, torch.float32, grouped)


def test_buffers_prefilled_with_nan(monkeypatch, grouped):
    # every kernel buffer starts as NaN: an element a kernel forgets to write and then
    # reads (a pair row's padding, a split without pairs, a token without pairs) shows
    from moa_kernels.triton import grouped as module

    def nan_empty(*shape, **kwargs):
        tensor = torch.empty(*shape, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(module, "_empty", nan_empty)
    monkeypatch.setattr(module, "PAIRS_PER_SPLIT", 16)
    # topk 2 of 5 with forced logits: experts 2 and 3 get every token, 0, 1, 4 none
    layer = _forced_router_layer(torch.float32, "topk", [0.0, 0.0, 1.0, 0.5, 0.0], top_k=2)
    x = torch.randn(70, 17, device=DEVICE)
    _compare(layer, x, torch.float32, grouped)
    # threshold: lora:33 (w = 48) beside narrower experts, rows of several widths
    layer = _make_layer(["lora:2", "adapter:7:gelu", "lora:33", "hydra:3:2"],
                        RouterConfig(mode="threshold"), 17, 15, torch.float32)
    _compare(layer, x, torch.float32, grouped)


def test_two_runs_are_bitwise_equal(monkeypatch, grouped):
    # no atomics: the same inputs give the same bits (outputs and every gradient)
    from moa_kernels.triton import grouped as module

    monkeypatch.setattr(module, "PAIRS_PER_SPLIT", 16)
    layer = _make_layer(ALL_ACTIVATIONS + ["hydra:4:2"],
                        RouterConfig(mode="topk", top_k=3), 19, 23, torch.float32)
    x = torch.randn(130, 19, device=DEVICE)
    first, _ = run_with_gradients(layer, x, "triton")
    second, _ = run_with_gradients(layer, x, "triton")
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


def test_grouped_equals_masked(monkeypatch):
    # the two sparse plans compute the same function (to rounding)
    layer = _make_layer(ALL_ACTIVATIONS, RouterConfig(mode="threshold"), 19, 23,
                        torch.float32)
    x = torch.randn(40, 19, device=DEVICE)
    results = {}
    for plan in ("masked", "grouped"):
        monkeypatch.setenv("MOA_TRITON_SPARSE", plan)
        results[plan], _ = run_with_gradients(layer, x, "triton")
    assert_results_match(results["grouped"], results["masked"], TOLERANCE[torch.float32],
                         dtype=torch.float32)


def test_a_skipped_non_finite_expert_adds_nothing(grouped):
    # expert 1's A is infinite: the tokens not routed to it get exactly the other experts'
    # mixture, and (pairs only: unlike the dense plans) a finite gradient of x
    torch.manual_seed(0)
    layer = MoALinear(nn.Linear(16, 12), ["lora:4", "lora:3", "lora:5"], router=None,
                      backend="triton").to(DEVICE)
    with torch.no_grad():
        for params in layer.expert_parameters():
            params["lora_B"].normal_()
        layer.expert_parameters()[1]["lora_A"].fill_(float("inf"))
    x = torch.randn(10, 16, device=DEVICE, requires_grad=True)
    gates = torch.rand(10, 3, device=DEVICE) + 0.1
    gates[:, 1] = 0.0
    gates[[0, 3], 1] = 0.7
    y = layer(x, gates, sparse=True)
    assert grouped
    params = layer.expert_parameters()
    with torch.no_grad():
        expected = layer.base(x)
        for e in (0, 2):
            expected = expected + gates[:, e:e + 1] * (
                x @ params[e]["lora_A"].t() @ params[e]["lora_B"].t())
    others = [t for t in range(10) if t not in (0, 3)]
    assert torch.isfinite(y[others]).all()
    assert relative_error(y[others], expected[others]) < 1e-5
    assert not torch.isfinite(y[[0, 3]]).all()  # the broken expert did run on its tokens
    y[others].sum().backward()
    assert torch.isfinite(x.grad[others]).all()


def test_zero_tokens(grouped):
    layer = _make_layer(["lora:4", "adapter:3:silu"], RouterConfig(mode="topk", top_k=1),
                        13, 11, torch.float32)
    x = torch.randn(0, 13, device=DEVICE, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (0, 11) and x.grad.shape == (0, 13)
    assert layer.shrink_weight.grad.abs().sum() == 0


def test_soft_mode_ignores_the_sparse_plan(grouped):
    # MOA_TRITON_SPARSE picks the sparse plan only: soft mode runs the dense GEMMs
    layer = _make_layer(["lora:4", "adapter:3:silu"], RouterConfig(), 13, 11, torch.float32)
    layer(torch.randn(5, 13, device=DEVICE))
    assert not grouped


@pytest.mark.skipif(ON_GPU, reason="a CPU smoke test of tracing (the GPU run times eager)")
def test_torch_compile_traces_the_grouped_ops(grouped):
    # aot_eager, fullgraph: the custom ops' fake implementations give the pair buffers
    # data-dependent sizes; forward and backward equal to eager
    layer = _make_layer(["adapter:5:silu", "lora:8", "hydra:4:2"], RouterConfig(mode="topk"),
                        24, 20, torch.float32)
    x = torch.randn(9, 24, device=DEVICE)
    eager, _ = run_with_gradients(layer, x, "triton")
    before = len(grouped)
    layer.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    leaf = x.clone().requires_grad_(True)
    y = compiled(leaf)
    weights = torch.linspace(-1.0, 1.0, y.numel(), device=y.device).reshape(y.shape)
    (y.float() * weights).sum().backward()
    traced = {"y": y.detach(), "x": leaf.grad} | {
        name: p.grad for name, p in layer.named_parameters() if p.requires_grad}
    assert len(grouped) > before  # the compiled graph ran the grouped plan
    for name, value in eager.items():
        assert relative_error(traced[name], value) < 1e-5, name


@pytest.mark.parametrize("value", ["bogus", "Grouped", "dense"])
def test_a_bad_plan_name_raises(monkeypatch, value):
    monkeypatch.setenv("MOA_TRITON_SPARSE", value)
    layer = _make_layer(["lora:4"], RouterConfig(mode="topk", top_k=1), 13, 11,
                        torch.float32)
    with pytest.raises(ValueError, match="MOA_TRITON_SPARSE.*'masked', 'grouped'"):
        layer(torch.randn(5, 13, device=DEVICE))


def test_the_pair_plan_sorts_by_expert_then_token():
    from moa_kernels.triton.grouped import PairPlan

    active = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    plan = PairPlan.of(active)
    assert plan.token_index.tolist() == [0, 2, 2, 0, 1]  # expert 0: t 0, 2; 1: t 2; 2: 0, 1
    assert plan.offsets.tolist() == [0, 2, 3, 5]
    assert plan.pair_flat.tolist() == [0, 6, 7, 2, 5]
    assert plan.pos.tolist() == [[0, 3], [4, -1], [1, 2], [-1, -1]]  # expert order per token


def test_weight_gradient_splits_do_not_follow_the_pair_count(monkeypatch, grouped):
    # SPLITS is a constexpr: taken from the active pair count, every new count during
    # training would be a new kernel build. Two routings of the same 40 tokens with
    # different pair counts launch the weight gradients with the same SPLITS.
    from moa_kernels.triton import grouped as module

    monkeypatch.setattr(module, "PAIRS_PER_SPLIT", 16)
    kernel = module.pair_weight_grad_kernel
    launched = []

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["SPLITS"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(module, "pair_weight_grad_kernel", Recording())
    layer = _make_layer(["lora:4", "adapter:3:silu", "lora:2"], None, 13, 11, torch.float32)
    x = torch.randn(40, 13, device=DEVICE)
    pairs = []
    for keep in (0.2, 0.9):
        gates = torch.rand(40, 3, device=DEVICE)
        gates = gates * (torch.rand(40, 3, device=DEVICE) < keep)
        pairs.append(int((gates != 0).sum()))
        results = {backend: sparse_run_with_outside_gates(layer, x, gates, backend)
                   for backend in ("reference", "triton")}
        assert_results_match(results["triton"], results["reference"], TOLERANCE[torch.float32],
                             dtype=torch.float32)
    assert pairs[0] != pairs[1] and len(launched) >= 4
    assert set(launched) == {module._weight_grad_splits(40, 3)}
