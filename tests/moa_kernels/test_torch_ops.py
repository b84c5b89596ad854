"""The fused torch backend (moa_kernels/torch_ops.py) against the reference oracle.

Every test builds one MoALinear, fills every trainable tensor with fresh random values
(LoRA B starts at zero and adapters at ~1e-4, which would hide the experts), runs it on the
"reference" and the "torch" backend and compares the output and the gradients of x, of the
given gates and of every trainable tensor. Tolerances (docs/DESIGN.md section 6): fp32 relative
error < 1e-5, bf16 < 2e-2 against an fp32 reference. Errors are measured as in
tests/conftest.py: against max(||expected||, a rounding floor), and the router's gradients
where they are zero by construction (`router_gates_vanish`) are asserted negligible on both
backends rather than compared with each other. The remaining `relative_error` calls here
compare outputs y (which hold base(x)), gradients of x (which hold base's) or gates (with a
floor for probabilities), never a norm that can be rounding noise.

Sparse modes compare p with a threshold (or rank the p's), so two correct backends may
disagree on a pair whose p sits within rounding of the boundary. Such tokens are not bugs,
so the sparse tests draw their tokens from a pool and keep those whose routing decision
has a margin well above the dtype's rounding (`decisive_tokens`); boundary ties are tested
exactly in test_routing.py.
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from moa import MoALinear, RouterConfig, parse_experts
from moa_kernels import reference, torch_ops
from moa_kernels.layout import ExpertLayout
from moa_kernels.torch_gated_expand import GatedExpand, columns_of, rows_of
from moa_kernels.torch_sparse_experts import SparseExperts
from tests.conftest import (
    assert_results_match,
    relative_error,
    rounding_floor,
    router_gates_vanish,
    router_keys,
    sparse_run_with_outside_gates,
    threshold_layer_as_one,
)

FP32_TOL = 1e-5
BF16_TOL = 2e-2
MODES = ("soft", "threshold", "adaptive", "topk")
GATES = ("sigmoid", "softmax")
KINDS = ("linear", "swiglu")


@pytest.fixture(autouse=True)
def always_sparse_path(monkeypatch):
    """The sparse modes take the dense path when most pairs are active; the tests here pin
    the sparse path (the dense fallback has its own test below) so that every sparse case
    really runs `SparseExperts`, whatever its routing density and token count."""
    monkeypatch.setattr(torch_ops, "DENSE_ABOVE_ACTIVE_FRACTION", 1.0)
    monkeypatch.setattr(torch_ops, "SPARSE_PLAN_MIN_TOKENS", 0)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def randomize(layer: MoALinear, seed: int = 0) -> MoALinear:
    """Fresh random values in every trainable tensor: weights N(0, 1/fan_in), biases
    N(0, 0.25) (router biases too, so a zero bias cannot hide a bug)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in layer.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("weight"):
            std = param.shape[-1] ** -0.5
        else:
            std = 0.5
        param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * std)
    return layer


def make_layer(experts, router=None, in_features=13, out_features=11, *, dtype=torch.float32,
               base_bias=True, dropout=0.0, seed=0, gates_from_outside=False):
    """A randomised MoALinear (router=None only when gates_from_outside)."""
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=base_bias, dtype=dtype)
    router = None if gates_from_outside else (router or RouterConfig())
    layer = MoALinear(base, experts, router, dropout=dropout, backend="reference")
    return randomize(layer, seed)


def run(layer, backend, leaf, make_x=lambda leaf: leaf, gates=None, seed=None):
    """Forward and backward of layer on `backend`, with a fixed random cotangent.

    leaf is the tensor gradients are taken for; make_x(leaf) the (possibly strided) input.
    Returns a dict of output, last_gates and every gradient (None where none flowed).
    """
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    leaf = leaf.detach().clone().requires_grad_(True)
    if gates is not None:
        gates = gates.detach().clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    y = layer(make_x(leaf), gates)
    cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(99))
    (y * cotangent.to(y.dtype)).sum().backward()
    result = {"y": y.detach(), "last_gates": layer.last_gates, "grad x": leaf.grad}
    if gates is not None:
        result["grad gates"] = gates.grad
    for name, param in layer.named_parameters():
        if param.requires_grad:
            result[f"grad {name}"] = None if param.grad is None else param.grad.clone()
        else:
            assert param.grad is None, f"frozen {name} received a gradient"
    return result


def assert_matches(actual, expected, tol, layer=None, dtype=torch.float32,
                   expected_dtype=None):
    """Every entry of `actual` within `tol` of `expected` (`assert_results_match`): dtype
    and expected_dtype say what each side computed in.

    With `layer` given, router gradients that are mathematically zero (see
    `router_gates_vanish`, judged on the expected gates) are pure rounding noise on both
    backends: each is asserted negligible instead of compared with the other. Returns
    whether that was the case. In adaptive mode the threshold layer's weight and bias
    gradients are measured as one tensor (`threshold_layer_as_one`).
    """
    vanish = layer is not None and router_gates_vanish(layer, expected["last_gates"])
    if layer is not None and layer.router is not None and \
            layer.router.config.mode == "adaptive":
        actual, expected = threshold_layer_as_one(actual), threshold_layer_as_one(expected)
    assert_results_match(actual, expected, tol, dtype=dtype, expected_dtype=expected_dtype,
                         vanishing=router_keys(expected) if vanish else ())
    return vanish


def compare_backends(layer, leaf, make_x=lambda leaf: leaf, gates=None, tol=FP32_TOL,
                     seed=None):
    expected = run(layer, "reference", leaf, make_x, gates, seed)
    actual = run(layer, "torch", leaf, make_x, gates, seed)
    assert_matches(actual, expected, tol, layer)
    return actual, expected


def routing_margin(layer: MoALinear, x: torch.Tensor) -> torch.Tensor:
    """Per token, how far its routing decision is from flipping (inf in soft mode):
    min_e |p_e - G| (threshold, adaptive) or the gap between the k-th and (k+1)-th p
    (topk), computed in float64 by the reference router."""
    config = layer.router.config
    params = {k: None if v is None else v.detach().double()
              for k, v in layer.router.tensors().items()}
    x = x.detach().double().reshape(-1, layer.in_features)
    p = reference.reference_router(x, params, kind=config.kind, gate=config.gate,
                                   mode="soft")
    if config.mode == "soft":
        return torch.full((x.shape[0],), torch.inf, dtype=torch.float64)
    if config.mode == "topk":
        if config.top_k == layer.num_experts:
            return torch.full((x.shape[0],), torch.inf, dtype=torch.float64)
        ranked = p.sort(-1, descending=True).values
        return ranked[:, config.top_k - 1] - ranked[:, config.top_k]
    threshold = config.max_threshold * torch.sigmoid(
        F.linear(x, params["threshold_weight"], params["threshold_bias"]))
    return (p - threshold).abs().min(-1).values


def decisive_tokens(layer, tokens, margin, dtype=torch.float32, seed=1):
    """x [tokens, in] of random rows whose routing decision is at least `margin` away
    from flipping (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(max(64, 8 * tokens), layer.in_features, generator=generator)
    chosen = pool[routing_margin(layer, pool) > margin]
    assert chosen.shape[0] >= tokens, "test data: too few tokens with a clear decision"
    return chosen[:tokens].to(dtype)


def fp32_margin(mode):
    return 0.0 if mode == "soft" else 1e-4


# ---------------------------------------------------------------------------------------
# torch vs reference, fp32
# ---------------------------------------------------------------------------------------

EXPERT_MIXES = {
    # E = 1, rank 1: the smallest layer there is
    "lora1": ["lora:1"],
    # E = 1 with an adapter only (bias path, no lora)
    "adapter-only": ["adapter:3:gelu"],
    # LoRA ranks 1..64 mixed, alpha != r on some
    "lora-ranks": ["lora:1", "lora:3:6", "lora:16", "lora:64:32"],
    # every adapter activation, E = 4
    "adapter-acts": ["adapter:4:silu", "adapter:5:gelu", "adapter:3:relu",
                     "adapter:2:identity"],
    # the paper's heterogeneous mix, prime E = 5, adapters before and between loras
    "paper-mix-E5": ["adapter:16:silu", "lora:8", "lora:2", "adapter:7:gelu", "lora:13"],
    # HydraLoRA: 3 heads sharing one A, next to a lora and an adapter (E = 5)
    "hydra-mix": ["hydra:4:3", "lora:5", "adapter:6:relu"],
}


@pytest.mark.parametrize("mix", list(EXPERT_MIXES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gate_router_and_mix(mix, kind, gate, mode):
    experts = EXPERT_MIXES[mix]
    num_experts = MoALinear(nn.Linear(2, 2), experts, None).num_experts
    router = RouterConfig(kind=kind, gate=gate, mode=mode, top_k=min(2, num_experts))
    layer = make_layer(experts, router)
    x = decisive_tokens(layer, 7, fp32_margin(mode))  # T = 7: below any tile
    compare_backends(layer, x)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", MODES)
def test_bias_free_router(kind, mode):
    # MoLoRA / HydraLoRA baselines: routers without biases (threshold layer keeps its bias)
    router = RouterConfig(kind=kind, gate="softmax", mode=mode, bias=False)
    layer = make_layer(["hydra:3:4", "lora:2"], router)
    assert any(v is None for v in layer.router.tensors().values())  # biases really absent
    compare_backends(layer, decisive_tokens(layer, 9, fp32_margin(mode)))


@pytest.mark.parametrize("tokens", [0, 1, 7, 300])  # T = 0 empty, 1, below a tile, many
@pytest.mark.parametrize("mode", MODES)
def test_token_counts(tokens, mode):
    layer = make_layer(EXPERT_MIXES["paper-mix-E5"], RouterConfig(mode=mode, top_k=3))
    x = decisive_tokens(layer, tokens, fp32_margin(mode)) if tokens else \
        torch.randn(0, layer.in_features)
    actual, _ = compare_backends(layer, x)
    assert actual["y"].shape == (tokens, layer.out_features)


@pytest.mark.parametrize(
    "in_features, out_features",
    [
        (1, 1),  # one input and one output feature
        (2, 97),  # out prime and much larger than in
        (61, 3),  # in prime and much larger than out
        (31, 31),  # square, prime
    ],
)
@pytest.mark.parametrize("mode", ["soft", "threshold"])
@pytest.mark.parametrize("base_bias", [True, False], ids=["base-bias", "base-no-bias"])
def test_odd_and_prime_dims(in_features, out_features, mode, base_bias):
    layer = make_layer(["lora:3", "adapter:5:silu", "hydra:2:2"], RouterConfig(mode=mode),
                       in_features, out_features, base_bias=base_bias)
    compare_backends(layer, decisive_tokens(layer, 11, fp32_margin(mode)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "layout",
    [
        "3d",  # [B, S, in]: leading dims flattened and restored
        "transposed",  # [T, in] that is the transpose of an [in, T] tensor
        "strided",  # every other column of a wider tensor
        "3d-permuted",  # [B, S, in] permuted from [S, in, B]
    ],
)
def test_3d_and_non_contiguous_inputs(mode, layout):
    layer = make_layer(["lora:4", "adapter:3:gelu", "lora:2:4"],
                       RouterConfig(kind="linear", mode=mode))
    x = decisive_tokens(layer, 12, fp32_margin(mode))
    if layout == "3d":
        leaf, make_x = x.reshape(3, 4, -1), lambda t: t
    elif layout == "transposed":
        leaf, make_x = x.t().contiguous(), lambda t: t.t()
    elif layout == "strided":
        leaf = torch.stack([x, torch.randn_like(x)], -1).reshape(12, -1)
        make_x = lambda t: t[:, ::2]  # noqa: E731
    else:
        leaf = x.reshape(3, 4, -1).permute(1, 2, 0).contiguous()
        make_x = lambda t: t.permute(2, 0, 1)  # noqa: E731
    assert not make_x(leaf).is_contiguous() or layout == "3d"
    actual, _ = compare_backends(layer, leaf, make_x)
    assert actual["y"].shape == (*make_x(leaf).shape[:-1], layer.out_features)


@pytest.mark.parametrize("mode", MODES)
def test_dropout_same_seed_both_backends(mode):
    # Dropout hits the adapters' input only; with the same seed both backends draw the same
    # mask, so they must agree, and the result must differ from the no-dropout output.
    layer = make_layer(["lora:4", "adapter:6:silu", "hydra:2:2"], RouterConfig(mode=mode),
                       dropout=0.3)
    x = decisive_tokens(layer, 10, fp32_margin(mode))
    layer.train()
    actual, expected = compare_backends(layer, x, seed=7)
    layer.eval()
    evaluated = run(layer, "torch", x)
    assert relative_error(actual["y"], evaluated["y"]) > 1e-3, "dropout had no effect"
    # The router reads x before dropout: same gates with and without dropout.
    assert torch.allclose(actual["last_gates"], evaluated["last_gates"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse-from-gates"])
@pytest.mark.parametrize(
    "gates_kind",
    [
        "random",  # arbitrary non-negative gates from a shared router
        "masked",  # about half the pairs gated off (zeros), as a sparse router gives
    ],
)
def test_gates_from_outside(sparse, gates_kind):
    # router=None: a shared router hands in gates [..., E]; their gradient must flow back.
    layer = make_layer(EXPERT_MIXES["hydra-mix"], gates_from_outside=True)
    x = torch.randn(2, 5, layer.in_features)
    gates = torch.rand(2, 5, layer.num_experts)
    if gates_kind == "masked":
        gates = gates * (torch.rand(gates.shape) > 0.5)
    if not sparse:
        compare_backends(layer, x, gates=gates)
        return
    # torch_ops.moa_linear(sparse=True, gates=...) runs only the pairs with g != 0.
    layer.backend = "reference"
    expected = layer(x, gates).reshape(-1, layer.out_features)
    shrink_weight, shrink_bias, expand_weight, expand_bias = layer._stacked()
    y, used = torch_ops.moa_linear(
        x.reshape(-1, layer.in_features), base_weight=layer.base.weight,
        base_bias=layer.base.bias, layout=layer.layout, shrink_weight=shrink_weight,
        shrink_bias=shrink_bias, expand_weight=expand_weight, expand_bias=expand_bias,
        gates=gates.reshape(-1, layer.num_experts), sparse=True)
    assert relative_error(y, expected) < FP32_TOL
    assert torch.equal(used, gates.reshape(-1, layer.num_experts))


# ---------------------------------------------------------------------------------------
# routing edge cases
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_all_tokens_to_one_expert(mode):
    # A huge logit bias on expert 2 (linear router): every token picks it and only it.
    router = RouterConfig(kind="linear", mode=mode, top_k=1, max_threshold=0.9)
    layer = make_layer(EXPERT_MIXES["paper-mix-E5"], router)
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([-30.0, -30.0, 30.0, -30.0, -30.0]))
    x = torch.randn(40, layer.in_features)
    actual, _ = compare_backends(layer, x)
    active = actual["last_gates"] != 0
    assert active[:, 2].all() and active.sum() == 40


@pytest.mark.parametrize("mode", ["threshold", "adaptive"])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_no_token_active_output_is_base_exactly(mode, backend):
    # Threshold logit +1e4 gives G = max_threshold = 1 and router bias -30 gives p << 1:
    # no pair runs, so y must be base(x) bit for bit and every gate exactly 0.
    router = RouterConfig(kind="linear", mode=mode, max_threshold=1.0)
    layer = make_layer(EXPERT_MIXES["hydra-mix"], router)
    with torch.no_grad():
        layer.router.threshold_bias.fill_(1e4)
        layer.router.bias.fill_(-30.0)
    x = torch.randn(2, 9, layer.in_features)
    result = run(layer, backend, x)
    assert torch.equal(result["y"], layer.base(x).detach())
    assert torch.equal(result["last_gates"], torch.zeros(2, 9, layer.num_experts))
    # Nothing ran: every expert gradient is exactly zero (or absent).
    for key, grad in result.items():
        if key.startswith("grad") and key != "grad x" and grad is not None:
            assert not grad.any(), key


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_zero_gates_from_outside_output_is_base_exactly(backend):
    # A shared router that switches every expert off: y must equal base(x) bit for bit.
    layer = make_layer(EXPERT_MIXES["paper-mix-E5"], gates_from_outside=True)
    x = torch.randn(6, layer.in_features)
    layer.backend = backend
    y = layer(x, torch.zeros(6, layer.num_experts))
    assert torch.equal(y, layer.base(x))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_every_expert_active_threshold_equals_soft(backend):
    # Threshold logit -1e4 gives G = 0 <= p: every pair runs and g = p, i.e. soft mode.
    router = RouterConfig(kind="swiglu", mode="threshold")
    layer = make_layer(EXPERT_MIXES["paper-mix-E5"], router)
    with torch.no_grad():
        layer.router.threshold_bias.fill_(-1e4)
    soft = copy.deepcopy(layer)
    soft.router.config = dataclasses.replace(router, mode="soft")
    x = torch.randn(15, layer.in_features)
    sparse_result = run(layer, backend, x)
    assert (sparse_result["last_gates"] != 0).all()
    soft_result = run(soft, backend, x)
    # The threshold layer gets no gradient in threshold mode (it only enters a comparison;
    # frozen by default), and none in the soft copy (unused there).
    assert not layer.router.threshold_weight.requires_grad
    for result in (sparse_result, soft_result):
        assert result.pop("grad router.threshold_weight", None) is None
        assert result.pop("grad router.threshold_bias", None) is None
    assert_matches(sparse_result, soft_result, FP32_TOL)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("gate", GATES)
def test_topk_equal_to_e_is_soft_with_renormalised_gates(backend, gate):
    router = RouterConfig(kind="swiglu", gate=gate, mode="topk", top_k=5)
    layer = make_layer(EXPERT_MIXES["paper-mix-E5"], router)
    soft = copy.deepcopy(layer)
    soft.router.config = dataclasses.replace(router, mode="soft")
    x = torch.randn(13, layer.in_features)
    layer.backend = soft.backend = backend
    p = soft.route(x)
    y_topk = layer(x)
    y_soft = soft(x, p / p.sum(-1, keepdim=True))
    assert relative_error(y_topk, y_soft) < FP32_TOL
    assert relative_error(layer.last_gates, p / p.sum(-1, keepdim=True),
                          rounding_floor(torch.float32, 1.0, FP32_TOL)) < FP32_TOL


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_skewed_routing(mode):
    # Expert 0 takes nearly every token, expert 3 almost none: very uneven plan segments.
    router = RouterConfig(kind="linear", mode=mode, top_k=2)
    layer = make_layer(EXPERT_MIXES["paper-mix-E5"], router)
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([6.0, 0.0, -1.0, -6.0, 0.5]))
    x = decisive_tokens(layer, 50, fp32_margin(mode))
    actual, _ = compare_backends(layer, x)
    counts = (actual["last_gates"] != 0).sum(0)
    assert counts[0] >= 45 and counts[3] <= 5, counts


# ---------------------------------------------------------------------------------------
# bf16
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_bf16_against_fp32_reference(mode, kind):
    # bf16 base, fp32 adapters (the default): the torch backend computes in bf16; the truth
    # is the reference in fp32 on the same bf16-representable x and base weights.
    router = RouterConfig(kind=kind, mode=mode)
    layer = make_layer(EXPERT_MIXES["hydra-mix"] + ["adapter:5:gelu"], router,
                       in_features=64, out_features=48, dtype=torch.bfloat16)
    assert layer.shrink_weight.dtype == torch.float32
    truth = copy.deepcopy(layer).float()
    x = decisive_tokens(layer, 33, 0.05 if mode != "soft" else 0.0)
    x = x.to(torch.bfloat16)
    actual = run(layer, "torch", x)
    assert actual["y"].dtype == torch.bfloat16
    expected = run(truth, "reference", x.float())
    # (adaptive: the ill-conditioned threshold bias gradient alone misses the fp32 truth by
    # 0.14 in the bf16 *reference* with seed 0, by 0.05 in torch; assert_matches measures
    # the threshold layer as one tensor, see threshold_layer_as_one)
    assert_matches(actual, expected, BF16_TOL, layer, dtype=torch.bfloat16,
                   expected_dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# float64 gradcheck
# ---------------------------------------------------------------------------------------

def gradcheck_layer(layer, backend, x, gates=None):
    layer.backend = backend
    names = [name for name, p in layer.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_(True) for name, p in
              layer.named_parameters() if p.requires_grad]
    inputs = [x.detach().clone().requires_grad_(True)]
    if gates is not None:
        inputs.append(gates.detach().clone().requires_grad_(True))

    def function(*tensors):
        values = dict(zip(names, tensors[len(inputs):]))
        return torch.func.functional_call(layer, values, tuple(tensors[:len(inputs)]))

    assert torch.autograd.gradcheck(function, (*inputs, *params))


TINY_EXPERTS = ["lora:2", "adapter:2:gelu", "hydra:1:2", "adapter:1:silu"]


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_gradcheck_gates_from_outside(backend):
    layer = make_layer(TINY_EXPERTS, in_features=3, out_features=2, dtype=torch.float64,
                       gates_from_outside=True)
    gates = torch.rand(4, layer.num_experts, dtype=torch.float64)
    gradcheck_layer(layer, backend, torch.randn(4, 3, dtype=torch.float64), gates)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_with_router(backend, mode, kind):
    router = RouterConfig(kind=kind, mode=mode, gate="sigmoid", hidden_factor=1)
    layer = make_layer(TINY_EXPERTS, router, in_features=3, out_features=2,
                       dtype=torch.float64)
    x = decisive_tokens(layer, 4, 1e-3, dtype=torch.float64)
    gradcheck_layer(layer, backend, x)


@pytest.mark.parametrize("mode", MODES)
def test_float64_torch_backend_matches_reference_closely(mode):
    # In float64 both backends compute the same math; they should agree to ~1e-12, far
    # tighter than the fp32 tolerance. (Pins the cause of the gradcheck failure above.)
    layer = make_layer(EXPERT_MIXES["paper-mix-E5"], RouterConfig(mode=mode),
                       dtype=torch.float64)
    x = decisive_tokens(layer, 9, 1e-3, dtype=torch.float64)
    actual, expected = run(layer, "torch", x), run(layer, "reference", x)
    assert_matches(actual, expected, 1e-10, layer, dtype=torch.float64)


# ---------------------------------------------------------------------------------------
# property test and determinism
# ---------------------------------------------------------------------------------------

expert_strings = st.one_of(
    st.builds("lora:{}".format, st.integers(1, 64)),
    st.builds("lora:{}:{}".format, st.integers(1, 16), st.integers(1, 32)),
    st.builds("adapter:{}:{}".format, st.integers(1, 24),
              st.sampled_from(["silu", "gelu", "relu", "identity"])),
    st.builds("hydra:{}:{}".format, st.integers(1, 8), st.integers(1, 3)),
)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    experts=st.lists(expert_strings, min_size=1, max_size=5),
    kind=st.sampled_from(KINDS),
    gate=st.sampled_from(GATES),
    mode=st.sampled_from(MODES),
    bias=st.booleans(),
    leading=st.sampled_from([(0,), (1,), (5,), (2, 3), (3, 1, 2)]),
    in_features=st.integers(1, 40),
    out_features=st.integers(1, 40),
    top_k=st.integers(1, 4),
    seed=st.integers(0, 2 ** 16),
)
def test_property_random_mixes_modes_and_shapes(experts, kind, gate, mode, bias, leading,
                                                in_features, out_features, top_k, seed):
    num_experts = MoALinear(nn.Linear(1, 1), experts, None).num_experts
    router = RouterConfig(kind=kind, gate=gate, mode=mode, bias=bias,
                          top_k=min(top_k, num_experts))
    layer = make_layer(experts, router, in_features, out_features, seed=seed)
    tokens = 1
    for size in leading:
        tokens *= size
    x = decisive_tokens(layer, tokens, fp32_margin(mode), seed=seed) if tokens else \
        torch.randn(0, in_features)
    compare_backends(layer, x.reshape(*leading, in_features))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_deterministic_on_cpu(mode, backend):
    # Same input twice: bitwise-equal outputs and gradients (no atomics, no reordering).
    layer = make_layer(EXPERT_MIXES["hydra-mix"] + ["adapter:4:silu"], RouterConfig(mode=mode))
    x = torch.randn(300, layer.in_features)
    first, second = run(layer, backend, x), run(layer, backend, x)
    for key in first:
        if first[key] is None:
            assert second[key] is None
        else:
            assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("active_fraction, path", [
    (0.3, "sparse"),  # under half the pairs active: SparseExperts
    (0.8, "dense"),   # most pairs active: the dense fallback
])
def test_sparse_flag_with_masked_outside_gates_matches_reference(active_fraction, path,
                                                                 monkeypatch):
    # A sparse-mode layer router hands each layer masked gates and sparse=True: a zero gate
    # is a skipped pair, which adds nothing and gets no gate gradient, on every backend and
    # whichever path the density picks. Output and every gradient match the reference.
    monkeypatch.setattr(torch_ops, "DENSE_ABOVE_ACTIVE_FRACTION", 0.5)
    layer = make_layer(EXPERT_MIXES["hydra-mix"], gates_from_outside=True)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, layer.in_features, generator=generator)
    keep = torch.rand(3, 7, layer.num_experts, generator=generator) < active_fraction
    gates = torch.rand(3, 7, layer.num_experts, generator=generator) * keep
    assert (gates != 0).float().mean() > 0.5 if path == "dense" else \
        (gates != 0).float().mean() < 0.5, "test data: the density must pick the path"
    results = {backend: sparse_run_with_outside_gates(layer, x, gates, backend)
               for backend in ("reference", "torch")}
    assert_results_match(results["torch"], results["reference"], FP32_TOL,
                         dtype=torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_partial_backward_then_full_backward_matches_reference(mode):
    # backward(inputs=[expert tensor]) may stop before the base layer's backward; the next
    # full backward must still give the reference's dx (nothing carried over between passes).
    layer = make_layer(EXPERT_MIXES["paper-mix-E5"], RouterConfig(mode=mode, top_k=2))
    x0 = decisive_tokens(layer, 12, 1e-3)
    grads = {}
    for backend in ("reference", "torch"):
        layer.backend = backend
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        loss = layer(x).square().sum()
        loss.backward(inputs=[layer.expand_weight], retain_graph=True)
        torch.autograd.grad(loss, [layer.router.w2_weight], retain_graph=True)
        x.grad = None
        loss.backward()
        grads[backend] = x.grad
    assert relative_error(grads["torch"], grads["reference"]) < FP32_TOL


@pytest.mark.parametrize("mode", ["soft", "topk"])
def test_second_derivative_is_refused_by_the_torch_backend(mode):
    # The hand-written backwards are not differentiable themselves: a gradient penalty must
    # fail loudly, never return a silently wrong second derivative.
    layer = make_layer(EXPERT_MIXES["paper-mix-E5"], RouterConfig(mode=mode))
    layer.backend = "torch"
    x = torch.randn(6, layer.in_features, requires_grad=True)
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable twice|once_differentiable"):
        grad_x.square().sum().backward()


def record_applied_functions(monkeypatch) -> list:
    """The autograd Functions torch_ops runs (through `apply_function`), in order, from now
    on."""
    ran, apply = [], torch_ops.apply_function
    monkeypatch.setattr(torch_ops, "apply_function",
                        lambda function, *args: ran.append(function) or apply(function, *args))
    return ran


def routed_layer_and_tokens(router: RouterConfig, tokens: int):
    """A paper-mix-E5 layer with `router`, decisive tokens for it, and the fraction of its
    (token, expert) pairs the router marks active."""
    layer = make_layer(EXPERT_MIXES["paper-mix-E5"], router)
    x = decisive_tokens(layer, tokens, 1e-3)
    ops = layer.router.ops(torch.float32)
    _, active = ops.finish(F.linear(x, ops.first_weight, ops.first_bias))
    return layer, x, active.float().mean().item()


@pytest.mark.parametrize("mode", ["threshold", "adaptive", "topk"])
def test_dense_fallback_of_sparse_modes_matches_the_sparse_path(mode, monkeypatch):
    # Low thresholds leave most pairs active, so with the default fraction the layer runs
    # the dense path; pinning the fraction to 1 forces the sparse path. Both must match the
    # reference, and each other, in output and in every gradient.
    layer, x, active = routed_layer_and_tokens(
        RouterConfig(mode=mode, max_threshold=0.05, top_k=4), 40)
    assert active > 0.5, "test data: the routing must be mostly active"
    ran = record_applied_functions(monkeypatch)
    results = {}
    for fraction, path in ((0.5, GatedExpand), (1.0, SparseExperts)):
        monkeypatch.setattr(torch_ops, "DENSE_ABOVE_ACTIVE_FRACTION", fraction)
        ran.clear()
        results[fraction], _ = compare_backends(layer, x)
        assert path in ran
    assert_matches(results[0.5], results[1.0], FP32_TOL, layer)


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_sparse_modes_on_few_tokens_take_the_dense_path(mode, monkeypatch):
    # Decoding-sized calls (under SPARSE_PLAN_MIN_TOKENS tokens) skip the routing plan even
    # when few pairs are active: the masked dense path, which must match the planned path
    # and the reference in output and every gradient.
    layer, x, active = routed_layer_and_tokens(
        RouterConfig(mode=mode, gate="softmax", max_threshold=0.5, top_k=1), 12)
    assert active < 0.5, "test data: the routing must be mostly inactive"
    ran = record_applied_functions(monkeypatch)
    monkeypatch.setattr(torch_ops, "DENSE_ABOVE_ACTIVE_FRACTION", 0.5)
    results = {}
    for minimum, path in ((256, GatedExpand), (0, SparseExperts)):
        monkeypatch.setattr(torch_ops, "SPARSE_PLAN_MIN_TOKENS", minimum)
        ran.clear()
        results[minimum], _ = compare_backends(layer, x)
        assert path in ran
        assert minimum == 0 or SparseExperts not in ran
    assert_matches(results[256], results[0], FP32_TOL, layer)


def test_sparse_path_saves_its_expert_hiddens_through_saved_tensor_hooks():
    # Activation offloading and non-reentrant checkpointing see only what goes through
    # saved-tensor hooks, so the per-expert hidden tensors [count_e, rank_e] must too.
    router = RouterConfig(mode="threshold", max_threshold=0.5)
    layer = make_layer(EXPERT_MIXES["paper-mix-E5"], router)
    layer.backend = "torch"
    x = decisive_tokens(layer, 40, 1e-3).requires_grad_()
    ops = layer.router.ops(torch.float32)
    _, active = ops.finish(F.linear(x.detach(), ops.first_weight, ops.first_bias))
    counts = active.sum(0).tolist()
    assert 0 < sum(counts) < active.numel(), "test data: the routing must be partly active"
    packed_shapes = []

    def pack(tensor):
        packed_shapes.append(tuple(tensor.shape))
        return tensor.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(x)
    widths = [start_stop[1] - start_stop[0]
              for start_stop in (slot.shrink for slot in layer.layout.slots)]
    for count, width in zip(counts, widths):
        if count:
            assert (count, width) in packed_shapes
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------
# inputs recomputed, not saved (InputRecipe; moa_kernels/gated_adapter.py, prompt_attention.py)
# ---------------------------------------------------------------------------------------

def saved_storages(function):
    """function()'s result and the storages (data pointers) of what it saved for backward."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.untyped_storage().data_ptr()) or t, lambda t: t):
        result = function()
    return result, set(saved)


@pytest.mark.parametrize("outside_gates", [True, False], ids=["outside-gates", "own-router"])
def test_an_input_recipe_is_saved_instead_of_the_input_with_the_same_gradients(outside_gates):
    # o_proj's case: its input x = a + b * c is recomputed in BaseAndShrink's backward from
    # tensors kept anyway. Output and every gradient (a's through x's own graph) must be the
    # reference backend's, which ignores the recipe, on fresh random data.
    layer = make_layer(EXPERT_MIXES["paper-mix-E5"], gates_from_outside=outside_gates,
                       seed=5)
    generator = torch.Generator().manual_seed(21)
    scale, shift = (torch.randn(17, layer.in_features, generator=generator) for _ in range(2))
    gates = torch.rand(17, layer.num_experts, generator=generator) if outside_gates else None
    made = []

    def make_x(leaf):
        x = torch.addcmul(shift, leaf, scale)
        layer.next_input_recipe = (x, torch_ops.InputRecipe(torch.addcmul, (shift, leaf, scale)))
        made.append(x)
        return x

    leaf = torch.randn(17, layer.in_features, generator=generator)
    actual, expected = compare_backends(layer, leaf, make_x, gates)
    assert layer.next_input_recipe is None, "the recipe is consumed by the call it was for"

    layer.backend = "torch"
    x_leaf = leaf.clone().requires_grad_(True)
    _, storages = saved_storages(lambda: layer(make_x(x_leaf), gates))
    assert made[-1].untyped_storage().data_ptr() not in storages
    x = torch.addcmul(shift, x_leaf, scale)
    _, storages = saved_storages(lambda: layer(x, gates))
    assert x.untyped_storage().data_ptr() in storages, "without a recipe x itself is saved"


@pytest.mark.parametrize("activation", ["silu", "gelu", "identity"])
def test_gated_adapter_with_an_input_recipe_matches_plain_autograd(activation):
    # The parallel adapter's case: x = norm(z) recomputed from z in the backward (here
    # x = tanh(z)); output and every gradient equal plain autograd's, and x is not saved.
    from moa_kernels.activations import activation_by_name
    from moa_kernels.gated_adapter import gated_adapter
    from moa_kernels.torch_ops import InputRecipe

    generator = torch.Generator().manual_seed(31)
    tokens, features, size = 23, 12, 5
    tensors = {"out": torch.randn(tokens, features, generator=generator),
               "z": torch.randn(tokens, features, generator=generator),
               "gate": torch.rand(tokens, 1, generator=generator),
               "down_weight": torch.randn(size, features, generator=generator) * 0.3,
               "down_bias": torch.randn(size, generator=generator),
               "up_weight": torch.randn(features, size, generator=generator) * 0.3,
               "up_bias": torch.randn(features, generator=generator)}
    cotangent = torch.randn(tokens, features, generator=generator)

    def run_adapter(fused):
        leaves = {k: v.clone().requires_grad_(True) for k, v in tensors.items()}
        x = torch.tanh(leaves["z"])
        weights = [leaves[k] for k in ("down_weight", "down_bias", "up_weight", "up_bias")]

        def forward():
            if fused:
                return gated_adapter(leaves["out"], x, leaves["gate"], *weights, activation,
                                     InputRecipe(torch.tanh, (leaves["z"],)))
            hidden = activation_by_name(activation).function(F.linear(x, *weights[:2]))
            return leaves["out"] + leaves["gate"] * F.linear(hidden, *weights[2:])

        y, storages = saved_storages(forward)
        (y * cotangent).sum().backward()
        return {"y": y.detach(), **{k: v.grad for k, v in leaves.items()}}, storages, x

    actual, storages, x = run_adapter(True)
    expected, _, _ = run_adapter(False)
    assert_results_match(actual, expected, FP32_TOL, dtype=torch.float32)
    assert x.untyped_storage().data_ptr() not in storages


def prompt_attention_by_hand(query, keys, values, gate):
    """g * concat_h softmax(q_h keys_h^T) values_h [B, S, H * D] in float64, written out
    per head and token (keys come pre-scaled by D^-0.5, values pre-gated per head)."""
    batch, heads, tokens, head_dim = query.shape
    out = torch.zeros(batch, tokens, heads * head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            k, v = keys[h].double(), values[h].double()
            for t in range(tokens):
                scores = k @ query[b, h, t].double()  # [L]
                weights = scores.exp() / scores.exp().sum()
                out[b, t, h * head_dim:(h + 1) * head_dim] = gate[b, t, 0].double() * \
                    (weights @ v)
    return out


@pytest.mark.parametrize("compute_dtype, tol", [
    (torch.float32, FP32_TOL),  # x in the query's dtype: the fused addcmul
    (torch.bfloat16, BF16_TOL),  # an fp32 x beside a bf16 query: the cast-then-add path
], ids=["same-dtype", "bf16-query-fp32-x"])
def test_the_prompt_attention_recipe_recomputes_its_output_bitwise(compute_dtype, tol):
    """The recipe gives the forward's output bit for bit, and both are the prompt attention
    written out here (the recipe and the forward share their code: compared with each other
    alone, a wrong attention would agree with itself)."""
    from moa_kernels.prompt_attention import prompt_attention, prompt_attention_recipe

    generator = torch.Generator().manual_seed(41)
    batch, heads, tokens, head_dim, length = 2, 3, 7, 4, 5
    x = torch.randn(batch, tokens, heads * head_dim, generator=generator)
    operands = [torch.randn(batch, heads, tokens, head_dim, generator=generator),
                torch.randn(heads, length, head_dim, generator=generator),
                torch.randn(heads, length, head_dim, generator=generator),
                torch.rand(batch, tokens, 1, generator=generator)]
    operands = (x, *(t.to(compute_dtype) for t in operands))
    output = prompt_attention(*operands)
    recipe = prompt_attention_recipe(*operands)
    assert torch.equal(recipe.function(*recipe.tensors), output)
    assert output.dtype == x.dtype
    # the added part alone (x would dominate the comparison)
    expected = prompt_attention_by_hand(*operands[1:])
    assert relative_error(output.double() - x.double(), expected) < tol


# ---------------------------------------------------------------------------------------
# hydra heads' shared rows: slices and repeats instead of a [C, R] map
# ---------------------------------------------------------------------------------------

def dense_source_map(layout) -> torch.Tensor:
    """[C, R]: 1 where expand column c reads shrink row r, written out from the slots."""
    source = torch.zeros(layout.expand_columns, layout.shrink_rows, dtype=torch.float64)
    for slot in layout.slots:
        for offset in range(slot.rank):
            source[slot.expand[0] + offset, slot.shrink[0] + offset] = 1.0
    return source


@pytest.mark.parametrize("experts", [
    ["hydra:4:3"],  # one hydra alone: a single repeated block
    ["hydra:4:3", "lora:5", "adapter:6:relu"],  # hydra first, then a run of plain experts
    ["lora:2", "hydra:3:2", "lora:4", "hydra:1:5", "adapter:2:gelu"],  # hydras among others
    ["lora:3", "adapter:2:silu", "lora:1"],  # no hydra: one block, the identity
])
def test_columns_of_and_rows_of_against_a_dense_source_map(experts):
    layout = ExpertLayout.from_specs(parse_experts(experts), 3, 3)
    source = dense_source_map(layout)
    generator = torch.Generator().manual_seed(3)
    activated = torch.randn(5, layout.shrink_rows, generator=generator, dtype=torch.float64)
    grad_columns = torch.randn(5, layout.expand_columns, generator=generator,
                               dtype=torch.float64)
    torch.testing.assert_close(columns_of(activated, layout), activated @ source.t(),
                               rtol=0, atol=0)
    # sums of up to 5 heads of N(0, 1) values: equal up to float64 rounding
    torch.testing.assert_close(rows_of(grad_columns, layout), grad_columns @ source,
                               rtol=1e-12, atol=1e-12)


def test_gated_expand_traced_twin_matches_the_function_on_hydra_mixes():
    """The traced twin (what torch.compile runs) against the autograd Function, forward and
    every gradient, on a layout whose hydra rows sit between plain experts."""
    layout = ExpertLayout.from_specs(
        parse_experts(["lora:2", "hydra:3:2", "adapter:4:gelu", "hydra:2:3:4", "lora:3:6"]),
        6, 5)
    generator = torch.Generator().manual_seed(8)
    tokens = 7
    inputs = {"y": torch.randn(tokens, 5, generator=generator, dtype=torch.float64),
              "hidden": torch.randn(tokens, layout.shrink_rows, generator=generator,
                                    dtype=torch.float64),
              "gates": torch.rand(tokens, layout.num_experts, generator=generator,
                                  dtype=torch.float64),
              "expand_weight": torch.randn(5, layout.expand_columns, generator=generator,
                                           dtype=torch.float64),
              "expand_bias": torch.randn(layout.num_adapters, 5, generator=generator,
                                         dtype=torch.float64)}
    cotangent = torch.randn(tokens, 5, generator=generator, dtype=torch.float64)

    def run_expand(function):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        y = function(*leaves.values(), layout)
        (y * cotangent).sum().backward()
        return {"out": y.detach(), **{k: v.grad for k, v in leaves.items()}}

    expected = run_expand(GatedExpand.apply)
    actual = run_expand(GatedExpand.traced)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-12, atol=1e-12,
                                   msg=name)


def plain_prompt_expert(x, query, gate, prompt, head_gate, k_weight, k_bias, v_weight, v_bias,
                        kv_heads):
    """The prompt expert as written in docs/DESIGN.md section 4, in plain autograd ops."""
    batch, heads, tokens, head_dim = query.shape
    length = prompt.shape[0]
    keys = F.linear(prompt, k_weight, k_bias).view(length, kv_heads, head_dim)
    values = F.linear(prompt, v_weight, v_bias).view(length, kv_heads, head_dim)
    groups = heads // kv_heads
    outputs = []
    for h in range(heads):
        scores = query[:, h] @ keys[:, h // groups].t() * head_dim ** -0.5  # [B, S, L]
        outputs.append(head_gate[h] * torch.softmax(scores, -1) @ values[:, h // groups])
    out = torch.stack(outputs, dim=2).reshape(batch, tokens, heads * head_dim)
    return x + gate * out


# (batch, heads, kv heads, query laid out as the attention makes it, biases): each covers
GQA_CASES = [
    (2, 4, 2, True, True),  # grouped-query attention, the rotary's [B, S, H, D] memory, Qwen2
    (1, 3, 3, False, False),  # one query head per KV head, a contiguous query, no biases
    (3, 6, 1, True, False),  # multi-query: every head reads one KV head
]


@pytest.mark.parametrize("batch,heads,kv_heads,permuted,biases", GQA_CASES)
def test_prompt_expert_matches_plain_autograd(batch, heads, kv_heads, permuted, biases):
    # the fused prompt expert of a training step (keys, values and attention in one op):
    # output and the gradients of every input, the frozen projections' included, against
    # the plain formula on fresh random data; its keys and values recompute y bitwise
    from moa_kernels.prompt_attention import prompt_attention_recipe, prompt_expert

    generator = torch.Generator().manual_seed(43)
    tokens, head_dim, length, hidden = 7, 4, 5, 9

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    query = randn(batch, tokens, heads, head_dim).transpose(1, 2) if permuted else \
        randn(batch, heads, tokens, head_dim)
    inputs = {"x": randn(batch, tokens, heads * head_dim), "query": query,
              "gate": torch.rand(batch, tokens, 1, generator=generator),
              "prompt": randn(length, hidden), "head_gate": randn(heads),
              "k_weight": randn(kv_heads * head_dim, hidden) * 0.5,
              "k_bias": randn(kv_heads * head_dim) if biases else None,
              "v_weight": randn(kv_heads * head_dim, hidden) * 0.5,
              "v_bias": randn(kv_heads * head_dim) if biases else None}
    cotangent = randn(batch, tokens, heads * head_dim)
    results = {}
    for name, function in (("fused", prompt_expert), ("plain", plain_prompt_expert)):
        leaves = {k: None if v is None else v.detach().clone().requires_grad_(True)
                  for k, v in inputs.items()}
        y = function(*leaves.values(), kv_heads)
        if name == "fused":
            y, keys, values = y
            assert not keys.requires_grad and not values.requires_grad
            recipe = prompt_attention_recipe(leaves["x"], leaves["query"], keys, values,
                                             leaves["gate"])
            assert torch.equal(recipe.function(*recipe.tensors), y)
        (y * cotangent).sum().backward()
        results[name] = {"y": y.detach(), **{k: v.grad for k, v in leaves.items()
                                             if v is not None}}
    assert_results_match(results["fused"], results["plain"], FP32_TOL, dtype=torch.float32)


def test_prompt_expert_gradcheck():
    from moa_kernels.prompt_attention import prompt_expert

    generator = torch.Generator().manual_seed(47)
    double = {"dtype": torch.float64}
    inputs = (torch.randn(2, 3, 8, generator=generator, **double),
              torch.randn(2, 3, 4, 2, generator=generator, **double).transpose(1, 2),
              torch.rand(2, 3, 1, generator=generator, **double),
              torch.randn(3, 5, generator=generator, **double),
              torch.randn(4, generator=generator, **double),
              torch.randn(4, 5, generator=generator, **double),
              torch.randn(4, generator=generator, **double),
              torch.randn(4, 5, generator=generator, **double),
              torch.randn(4, generator=generator, **double))
    inputs = tuple(t.detach().requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(lambda *a: prompt_expert(*a, 2)[0], inputs)
