"""moa_kernels/routing.py: gates from the router's first layer, and the routing plan.

`gates_from_first_layer` is what the fused backends use to finish a router whose first
layer was folded into the shrink GEMM; it is held against `reference_router` (the oracle)
and against the mode definitions of docs/DESIGN.md section 2 written out by hand.
"""

import pytest
import torch
import torch.nn.functional as F

from moa_kernels.reference import reference_router
from moa_kernels.routing import RoutingPlan, gates_from_first_layer, swiglu_head
from tests.conftest import assert_results_match, relative_error, rounding_floor

MODES = ("soft", "threshold", "adaptive", "topk")
GATES = ("sigmoid", "softmax")
KINDS = ("linear", "swiglu")


def router_params(kind, in_features, num_experts, hidden, mode, bias=True, seed=0):
    """Random router tensors named as reference_router expects (never zeros)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    params = {}
    if kind == "linear":
        params["weight"] = randn(num_experts, in_features, scale=in_features ** -0.5)
        params["bias"] = randn(num_experts, scale=0.5) if bias else None
    else:
        for name, rows, columns in (("w1", hidden, in_features), ("w3", hidden, in_features),
                                    ("w2", num_experts, hidden)):
            params[f"{name}_weight"] = randn(rows, columns, scale=columns ** -0.5)
            params[f"{name}_bias"] = randn(rows, scale=0.5) if bias else None
    if mode in ("threshold", "adaptive"):
        params["threshold_weight"] = randn(1, in_features, scale=in_features ** -0.5)
        params["threshold_bias"] = randn(1, scale=0.5)
    return params


def first_layer_of(x, params, kind, mode):
    """The router's first layer as the fused backends build it: [logits] (linear) or
    [W1 x + b1, W3 x + b3] (swiglu), then the threshold logit column."""
    names = ["weight"] if kind == "linear" else ["w1", "w3"]
    columns = []
    for name in names:
        weight = params[name if kind == "linear" else f"{name}_weight"]
        bias = params["bias" if kind == "linear" else f"{name}_bias"]
        columns.append(F.linear(x, weight, bias))
    if mode in ("threshold", "adaptive"):
        columns.append(F.linear(x, params["threshold_weight"], params["threshold_bias"]))
    return torch.cat(columns, dim=-1)


def finish(first_layer, params, kind, gate, mode, num_experts, **options):
    return gates_from_first_layer(
        first_layer, kind=kind, gate=gate, mode=mode, num_experts=num_experts,
        w2_weight=params.get("w2_weight"), w2_bias=params.get("w2_bias"), **options)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "bias-free"])
@pytest.mark.parametrize(
    "tokens, in_features, num_experts, top_k",
    [
        (7, 13, 5, 2),  # prime E and prime in, T below any tile
        (1, 3, 1, 1),  # E = 1, single token: softmax gives p = 1
        (33, 8, 4, 4),  # top_k = E: every expert kept
        (0, 5, 3, 2),  # T = 0: empty in, empty out
    ],
)
def test_gates_from_first_layer_match_reference_router(
        kind, gate, mode, bias, tokens, in_features, num_experts, top_k):
    params = router_params(kind, in_features, num_experts, 4 * num_experts, mode, bias)
    x = torch.randn(tokens, in_features, dtype=torch.float64)
    options = {"max_threshold": 0.7, "top_k": top_k, "normalize_topk": True}
    expected = reference_router(x, params, kind=kind, gate=gate, mode=mode, **options)
    gates, active = finish(first_layer_of(x, params, kind, mode), params, kind, gate, mode,
                           num_experts, **options)
    assert gates.shape == (tokens, num_experts)
    if mode != "soft":  # soft mode: no mask at all (every pair runs)
        assert active.shape == (tokens, num_experts) and active.dtype == torch.bool
    # gates are probabilities (natural magnitude 1): the floor keeps an all-zero case (T = 0,
    # or E = 1 with its one p below G) from being measured against a zero norm
    assert relative_error(gates, expected, rounding_floor(torch.float64, 1.0, 1e-12)) < 1e-12
    # The active mask is exactly the set of pairs that must run.
    if mode == "soft":
        assert active is None
    else:
        assert not (gates[~active] != 0).any(), "an inactive pair carries a non-zero gate"


def plain_swiglu_head(first_layer, w2_weight, w2_bias):
    up, gate_half = first_layer.chunk(2, dim=-1)
    return F.linear(F.silu(up) * gate_half, w2_weight, w2_bias)


def swiglu_head_run(head, first_layer, w2_weight, w2_bias, grad_logits):
    """Logits and the gradients of every input of `head` for the cotangent grad_logits."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (first_layer, w2_weight, w2_bias)]
    logits = head(*leaves)
    logits.backward(grad_logits)
    names = ("first_layer", "w2_weight", "w2_bias")
    return {"y": logits.detach(), **{name: None if leaf is None else leaf.grad
                                     for name, leaf in zip(names, leaves)}}


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "bias-free"])
@pytest.mark.parametrize(
    "tokens, hidden, num_experts",
    [
        (37, 28, 7),  # the soft_moa layer router: E = 7, hidden 4 x 7; prime T
        (1, 4, 1),  # one token, E = 1
        (0, 8, 2),  # T = 0
    ],
)
def test_swiglu_head_saves_what_its_backward_reads_and_matches_plain_autograd(
        bias, tokens, hidden, num_experts):
    # The head saves its first layer, W2, silu(u) and the product (its backward recomputes
    # nothing: two launches fewer per layer, for 2 H numbers per token); logits and every
    # gradient must be those of plain autograd, on fresh random data including the
    # cotangent.
    generator = torch.Generator().manual_seed(11)
    first_layer = torch.randn(tokens, 2 * hidden, generator=generator) * 2
    w2_weight = torch.randn(num_experts, hidden, generator=generator) * hidden ** -0.5
    w2_bias = torch.randn(num_experts, generator=generator) if bias else None
    grad_logits = torch.randn(tokens, num_experts, generator=generator)
    got = swiglu_head_run(swiglu_head, first_layer, w2_weight, w2_bias, grad_logits)
    want = swiglu_head_run(plain_swiglu_head, first_layer, w2_weight, w2_bias, grad_logits)
    assert_results_match(got, want, 1e-5, dtype=torch.float32)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu_head(first_layer.requires_grad_(True), w2_weight, w2_bias)
    assert sum(t.numel() for t in saved) == \
        2 * first_layer.numel() + w2_weight.numel()  # u, v, silu(u), silu(u) v: 4 T H


def test_swiglu_head_gradcheck_in_float64():
    generator = torch.Generator().manual_seed(12)
    inputs = (torch.randn(5, 6, generator=generator, dtype=torch.float64, requires_grad=True),
              torch.randn(3, 3, generator=generator, dtype=torch.float64, requires_grad=True),
              torch.randn(3, generator=generator, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(swiglu_head, inputs)


def test_threshold_mode_semantics_written_out():
    # threshold: G = max_threshold * sigmoid(threshold logit); m = [p >= G]; g = p * m,
    # no renormalisation.
    logits = torch.tensor([[2.0, -1.0, 0.0, 0.5], [-3.0, -2.0, -4.0, -5.0]])
    threshold_logit = torch.tensor([[0.0], [10.0]])
    gates, active = gates_from_first_layer(
        torch.cat([logits, threshold_logit], 1), kind="linear", gate="sigmoid",
        mode="threshold", num_experts=4, max_threshold=0.6)
    p = torch.sigmoid(logits)
    threshold = 0.6 * torch.sigmoid(threshold_logit)
    assert torch.equal(active, p >= threshold)
    assert torch.equal(gates, p * (p >= threshold))
    assert not active[1].any(), "second token: every p is below G = 0.6, nothing runs"


def test_threshold_tie_counts_as_active():
    # Edge case p == G exactly (max_threshold 1, same logit): m = [p >= G] is 1.
    logits = torch.tensor([[0.3, -7.0]])
    first = torch.cat([logits, torch.tensor([[0.3]])], 1)
    for mode in ("threshold", "adaptive"):
        gates, active = gates_from_first_layer(first, kind="linear", gate="sigmoid",
                                               mode=mode, num_experts=2, max_threshold=1.0)
        assert active.tolist() == [[True, False]], mode
        expected = reference_router(torch.ones(1, 1), {
            "weight": torch.tensor([[0.3], [-7.0]]), "bias": None,
            "threshold_weight": torch.tensor([[0.3]]), "threshold_bias": None},
            kind="linear", gate="sigmoid", mode=mode, max_threshold=1.0)
        assert torch.equal(gates, expected), mode
    # adaptive: a = p - G = 0 for the tie, so the kept sum is 0 and is replaced by 1.
    assert gates.tolist() == [[0.0, 0.0]]


def test_adaptive_mode_renormalises_and_handles_no_active_expert():
    # adaptive: a = p - G; g = a*m / sum(a*m), with the denominator replaced by 1 where 0.
    logits = torch.tensor([[1.0, 2.0, -6.0], [-6.0, -7.0, -8.0]])
    threshold_logit = torch.tensor([[0.0], [0.0]])
    gates, active = gates_from_first_layer(
        torch.cat([logits, threshold_logit], 1), kind="linear", gate="sigmoid",
        mode="adaptive", num_experts=3, max_threshold=0.5)
    a = torch.sigmoid(logits) - 0.25
    kept = a.clamp_min(0)
    assert torch.allclose(gates[0], kept[0] / kept[0].sum())
    assert torch.allclose(gates[0].sum(), torch.tensor(1.0))
    assert torch.equal(gates[1], torch.zeros(3)), "no active expert: all gates exactly 0"
    assert active.tolist() == [[True, True, False], [False, False, False]]


@pytest.mark.parametrize("normalize", [True, False])
def test_topk_mode_keeps_exactly_k_largest(normalize):
    torch.manual_seed(3)
    logits = torch.randn(50, 6)
    gates, active = gates_from_first_layer(logits, kind="linear", gate="softmax",
                                           mode="topk", num_experts=6, top_k=3,
                                           normalize_topk=normalize)
    p = torch.softmax(logits, -1)
    assert (active.sum(1) == 3).all()
    smallest_kept = torch.where(active, p, torch.inf).min(1).values
    largest_dropped = torch.where(active, -torch.inf, p).max(1).values
    assert (smallest_kept > largest_dropped).all()
    expected = p * active
    if normalize:
        expected = expected / expected.sum(1, keepdim=True)
        assert torch.allclose(gates.sum(1), torch.ones(50))
    assert torch.allclose(gates, expected, rtol=1e-6, atol=0)


def test_topk_equal_to_e_is_soft_renormalised():
    # top_k = E keeps every expert: g = p / sum(p).
    torch.manual_seed(4)
    logits = torch.randn(9, 5)
    gates, active = gates_from_first_layer(logits, kind="linear", gate="sigmoid",
                                           mode="topk", num_experts=5, top_k=5)
    p = torch.sigmoid(logits)
    assert active.all()
    assert relative_error(gates, p / p.sum(1, keepdim=True)) < 1e-6  # each row sums to 1


def test_threshold_is_at_most_max_threshold():
    # G = max_threshold * sigmoid(.) < max_threshold: p = 1 - tiny is always active when the
    # threshold logit is huge, p below max_threshold never is.
    logits = torch.tensor([[30.0, -0.1]])
    first = torch.cat([logits, torch.tensor([[1e4]])], 1)
    _, active = gates_from_first_layer(first, kind="linear", gate="sigmoid",
                                       mode="threshold", num_experts=2, max_threshold=0.5)
    assert active.tolist() == [[True, False]]


# ---------------------------------------------------------------------------------------
# RoutingPlan
# ---------------------------------------------------------------------------------------

def plan_by_loop(active):
    """(token, expert) pairs sorted by expert, then token, by a plain loop."""
    pairs = [(t, e) for e in range(active.shape[1]) for t in range(active.shape[0])
             if active[t, e]]
    return [t for t, _ in pairs], [e for _, e in pairs]


@pytest.mark.parametrize(
    "active",
    [
        torch.rand(37, 5, generator=torch.Generator().manual_seed(0)) > 0.5,  # random, prime T
        torch.zeros(6, 3, dtype=torch.bool),  # no token active: empty plan
        torch.ones(4, 7, dtype=torch.bool),  # every pair active, prime E
        torch.zeros(0, 4, dtype=torch.bool),  # T = 0
        torch.tensor([[False, True, False]] * 9),  # all tokens to one expert (skewed)
        torch.tensor([[True]]),  # T = 1, E = 1
    ],
    ids=["random", "none-active", "all-active", "T0", "all-to-one", "T1-E1"],
)
def test_routing_plan_sorted_by_expert_then_token(active):
    plan = RoutingPlan.from_active(active)
    tokens, experts = plan_by_loop(active)
    assert plan.token_index.tolist() == tokens
    assert plan.expert_index.tolist() == experts
    assert plan.token_index.dtype == plan.expert_index.dtype == torch.int64
    assert plan.offsets.dtype == torch.int64
    counts = active.sum(0).tolist()
    assert plan.counts.tolist() == counts
    assert plan.counts_host == counts
    assert isinstance(plan.counts_host, list)
    assert plan.offsets.tolist() == [0] + torch.tensor(counts).cumsum(0).tolist()
    assert plan.num_pairs == int(active.sum())
    # Expert e's pairs are exactly rows offsets[e]:offsets[e + 1].
    for e in range(active.shape[1]):
        lo, hi = plan.offsets[e].item(), plan.offsets[e + 1].item()
        assert (plan.expert_index[lo:hi] == e).all()


# ---- topk normalisation when every kept gate underflows ---------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_topk_sigmoid_normalize_with_underflowing_gates_is_finite(dtype):
    # sigmoid(-200) is 0 in each dtype: row 0 keeps two zero gates, whose sum 0 used to be
    # the divisor (0 / 0 = NaN); as in adaptive mode a zero sum now divides by 1
    logits = torch.tensor([[-200.0, -300.0, -250.0], [2.0, -1.0, 0.5],
                           [-200.0, 3.0, -400.0]], dtype=dtype)
    gates, active = gates_from_first_layer(logits, kind="linear", gate="sigmoid", mode="topk",
                                           num_experts=3, top_k=2, normalize_topk=True)
    kept = torch.sigmoid(logits) * active
    total = kept.sum(dim=-1, keepdim=True)
    expected = kept / torch.where(total == 0, torch.ones_like(total), total)
    assert torch.isfinite(gates).all()
    assert torch.equal(gates, expected)
    assert torch.equal(gates[0], torch.zeros(3, dtype=dtype))
    assert active.sum(dim=-1).tolist() == [2, 2, 2] and active.dtype == torch.bool
