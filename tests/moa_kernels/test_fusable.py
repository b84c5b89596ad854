"""moa_kernels/fusable.py: the decoding forms of the small linears and the prompt attention.

Each function is compiled (fullgraph, "aot_eager": dynamo's trace without inductor's code
generation) without grad mode and compared, in float64, with the op it stands for, on fresh
random data; a recording backend checks which form was traced: reductions for decoding-sized
inputs, the library op (GEMM, attention kernel) outside them.
"""

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from moa_kernels.fusable import (
    COMPILED_REDUCTION_MAX_FEATURES,
    COMPILED_REDUCTION_MAX_TOKENS,
    fusable_addmm,
    fusable_attention,
    fusable_linear,
)
from tests.conftest import relative_error

TOLERANCE = 1e-12  # float64, another summation order


def traced(function, *args, graphs: list | None = None):
    """(function(*args) compiled with fullgraph, the aten-level op names of its graph);
    the traced graph modules are appended to `graphs` when given."""
    from torch._dynamo.backends.common import aot_autograd

    seen = []

    def record(graph, example_inputs):
        seen.extend(str(node.target) for node in graph.graph.nodes
                    if node.op == "call_function")
        if graphs is not None:
            graphs.append(graph)
        return graph.forward

    torch._dynamo.reset()
    compiled = torch.compile(function, fullgraph=True, backend=aot_autograd(fw_compiler=record))
    return compiled(*args), seen


def random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.mark.parametrize("tokens, features, reduced", [
    (4, 8, True),  # a decoding step's LoRA expand: a reduction
    (COMPILED_REDUCTION_MAX_TOKENS, COMPILED_REDUCTION_MAX_FEATURES, True),  # both limits
    (COMPILED_REDUCTION_MAX_TOKENS + 1, 8, False),  # a prefill: the GEMM
    (4, COMPILED_REDUCTION_MAX_FEATURES + 1, False),  # a long sum: the GEMM
])
def test_linear_and_addmm_trace_as_reductions_only_for_short_decoding_sums(tokens, features,
                                                                          reduced):
    x, weight = random(tokens, features, seed=0), random(24, features, seed=1)
    bias, addend = random(24, seed=2), random(tokens, 24, seed=3)
    with torch.no_grad():
        out, ops = traced(fusable_linear, x, weight, bias)
        assert relative_error(out, F.linear(x, weight, bias)) < TOLERANCE
        assert any("mm" in op for op in ops) != reduced, ops
        out, ops = traced(fusable_addmm, addend, x, weight)
        assert relative_error(out, addend + x @ weight.t()) < TOLERANCE
        assert any("mm" in op for op in ops) != reduced, ops


@pytest.mark.parametrize("tokens", [
    4,  # a decoding step of batch 4
    1,  # one row: the size-1 view must not drop the row dimension
])
def test_addmm_reduction_does_not_add_straight_onto_a_gemm(tokens):
    """Inductor folds add(mm(a, b), t) into addmm(t, a, b), a library call that copies t
    first: the reduction form's add onto a GEMM output (a MoALinear's base) must read it
    through a view. A [N] addend broadcasts as before."""
    x, base_weight = random(tokens, 32, seed=20), random(24, 32, seed=21)
    u, weight, bias = random(tokens, 8, seed=22), random(24, 8, seed=23), random(24, seed=24)

    def base_plus_experts(x, base_weight, u, weight):
        return fusable_addmm(torch.mm(x, base_weight.t()), u, weight)

    graphs = []
    with torch.no_grad():
        out, _ = traced(base_plus_experts, x, base_weight, u, weight, graphs=graphs)
        assert out.shape == (tokens, 24)
        assert relative_error(out, x @ base_weight.t() + u @ weight.t()) < TOLERANCE
        out, _ = traced(fusable_addmm, bias, u, weight)
        assert out.shape == (tokens, 24)
        assert relative_error(out, bias + u @ weight.t()) < TOLERANCE
    gemm_operands = [node for node in graphs[0].graph.nodes if node.op == "call_function"
                     and "add" in str(node.target)
                     and any(str(getattr(arg, "target", "")).startswith("aten.mm")
                             for arg in node.args)]
    assert not gemm_operands, graphs[0].graph
    assert any("aten.mm" in str(node.target) for node in graphs[0].graph.nodes)


def expected_attention(query, keys, values):
    return torch.softmax(query @ keys.transpose(-1, -2), dim=-1) @ values


@pytest.mark.parametrize("batch, tokens, length, expanded, reduced", [
    (4, 1, 10, True, True),  # a decoding step over batch-expanded prompt keys
    (2, 3, 10, False, True),  # a few tokens, keys given per batch row
    (1, COMPILED_REDUCTION_MAX_TOKENS + 1, 10, True, False),  # a prefill: the kernel
    (2, 1, COMPILED_REDUCTION_MAX_FEATURES + 1, True, False),  # a long prompt: the kernel
])
def test_attention_traces_as_reductions_only_for_decoding(batch, tokens, length, expanded,
                                                          reduced):
    heads, head_dim = 4, 16
    query = random(batch, heads, tokens, head_dim, seed=4)
    keys, values = random(heads, length, head_dim, seed=5), random(heads, length, head_dim,
                                                                    seed=6)
    if expanded:
        keys, values = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
    else:
        keys, values = (t.expand(batch, -1, -1, -1).contiguous() for t in (keys, values))
    with torch.no_grad():
        out, ops = traced(fusable_attention, query, keys, values)
        assert relative_error(out, expected_attention(query, keys, values)) < TOLERANCE
        assert any("attention" in op for op in ops) != reduced, ops


def test_attention_keeps_the_kernel_in_grad_mode():
    """With grad on (a compiled training step) the attention kernel's own backward is used."""
    query = random(2, 4, 1, 16, seed=7).requires_grad_()
    keys, values = random(2, 4, 10, 16, seed=8), random(2, 4, 10, 16, seed=9)
    out, ops = traced(fusable_attention, query, keys, values)
    assert relative_error(out, expected_attention(query, keys, values)) < TOLERANCE
    assert any("attention" in op for op in ops), ops


def test_eager_calls_take_the_library_ops():
    """Outside torch.compile every form is the plain op, bitwise."""
    x, weight = random(4, 8, seed=10), random(24, 8, seed=11)
    query, keys, values = (random(2, 4, 1, 16, seed=12), random(2, 4, 10, 16, seed=13),
                           random(2, 4, 10, 16, seed=14))
    with torch.no_grad():
        assert torch.equal(fusable_linear(x, weight), F.linear(x, weight))
        assert torch.equal(fusable_attention(query, keys, values),
                           F.scaled_dot_product_attention(query, keys, values, scale=1.0))
