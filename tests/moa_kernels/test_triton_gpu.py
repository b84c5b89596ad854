"""The triton backend where only a GPU can tell: compiled kernels (bf16 included) at token
counts from 1 to 16384, ranks above 32, non-unit strides, output buffers pre-filled with
NaN (an element a kernel forgets to write shows), run-to-run determinism, and the
registers and spills of the builds the JIT made (against the issue-13 budget).

On CUDA (TRITON_INTERPRET=0; benchmarks/gpu_suite.sh runs this file) every case runs at
full size. On the CPU under the interpreter the same tests run on small token counts
(fp32 and bf16: the kernels have no bf16 dot, so the interpreter computes them right), so
CI exercises this file's code even without a GPU.

Every dtype is compared with the reference on a float64 copy of the layer and its inputs as
rounded to the dtype (`_compare`), at the file's tolerances; expand_bias's gradient, a sum
over the T rows whose terms cancel, is allowed the rounding of an fp32 sum of T terms on
top (`_expand_bias_sum_error`), and the top-k tests use tokens away from a routing tie
(`_decisive_tokens`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import types

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from moa import MoALinear, RouterConfig  # noqa: E402
from moa_kernels.reference import reference_router  # noqa: E402
from tests.conftest import (  # noqa: E402
    assert_results_match,
    output_weighting,
    router_gates_vanish,
    router_keys,
    run_with_gradients,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETED
DEVICE = "cuda" if ON_GPU else "cpu"
RUNNABLE = ON_GPU or INTERPRETED
pytestmark = pytest.mark.skipif(not RUNNABLE, reason="needs CUDA, or TRITON_INTERPRET=1")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if ON_GPU else \
    [torch.float32, torch.bfloat16]
# ranks above 32 (48, 40) beside small ones, an activated adapter and hydra heads
EXPERTS = ["lora:48", "adapter:40:gelu", "lora:8", "hydra:8:2", "adapter:16:silu"]
TOKENS = [1, 2, 15, 16, 17, 63, 64, 65, 127, 1000, 4096, 16384] if ON_GPU else [1, 17, 65]


def _layer(router, in_features, out_features, dtype, experts=EXPERTS):
    torch.manual_seed(0)
    layer = MoALinear(nn.Linear(in_features, out_features), experts, router,
                      backend="triton").to(device=DEVICE, dtype=dtype)
    with torch.no_grad():  # fresh random values everywhere (B starts at zero otherwise)
        for parameter in layer.parameters():
            if parameter.requires_grad:
                parameter.normal_(0.0, 0.4 / parameter.shape[-1] ** 0.5 * 4)
    return layer


def _run(layer, x, backend, gates=None):
    return run_with_gradients(layer, x, backend, gates, seed=None)


def _compare(layer, x, dtype, gates=None, prefill=contextlib.nullcontext):
    """Triton in `dtype` (within `prefill()`) against the reference on a float64 copy of
    the layer, x, the gates and y's weighting as rounded to `dtype`: both sides start from
    the same values and the oracle's own rounding is negligible (an fp32 oracle's is not:
    at T = 16384 it differed from float64 by 1.4e-5 on expand_bias's gradient). Returns
    the triton run's results."""
    oracle = copy.deepcopy(layer).double()
    expected, routing = run_with_gradients(oracle, x.double(), "reference",
                                           None if gates is None else gates.double(),
                                           seed=None, weights_dtype=dtype)
    with prefill():
        actual, _ = _run(layer, x, "triton", gates)
    vanish = gates is None and router_gates_vanish(layer, routing)
    tol = TOLERANCE[dtype]
    floors = {"expand_bias": _expand_bias_sum_error(layer, routing, dtype) / tol}
    assert_results_match(actual, expected, tol, dtype=dtype, expected_dtype=torch.float64,
                         vanishing=router_keys(expected) if vanish else (), floors=floors)
    return actual


def _expand_bias_sum_error(layer, gates, dtype) -> float:
    """The rounding error that the fp32 sum over the T rows behind expand_bias's gradient
    may carry (a norm), from the oracle's applied gates [T, E].

    That gradient is d expand_bias[a, o] = sum_t dy[t, o] g[t, e_a] (adapter a's gate), and
    the triton backend sums it in fp32 whatever the dtype (dy^T u: a GEMM with fp32
    accumulation, expand.py; for bf16 / fp16 rounded to the dtype once, at the end, an
    error that TOLERANCE covers). The test's weighting dy is a ramp over [T, out] that
    drifts from -1 to 1 along t, and g >= 0, so the terms cancel: ||sum|| is 35 to 390
    times smaller than S = ||sum_t |dy[t, o] g[t, e_a]| || at T = 1000 to 16384 (soft and
    top-2, measured; the ratio grows about as sqrt(T)). A relative error of 1e-5 is then
    below what fp32 can promise, as the error of a sum scales with its terms, not with it.
    Summed in fp32 in any order, each of the T additions rounds with an error of at most
    u |partial sum| <= u sum |terms| (u = eps / 2); independent with zero mean, they add
    up to a standard deviation of at most sqrt(T / 3) u S (sequential order, the longest
    chain of additions; a tree or blocked order has fewer), while the worst case, all of
    them aligned, is T u S. Allowed: sqrt(T) u S, sqrt(3) times that standard deviation
    and ~5 times the one of the ramp (whose partial sums have an rms of 0.37 sum|terms|).
    The errors measured on the CPU (blocked fp32 sums) were 1.5 to 1.8 u S at T = 1000 and
    16384. Relative to ||sum||, sqrt(T) u S is 2e-4 (T = 1000) to 3e-3 (T = 16384): a bug
    that drops a row at either end of the ramp changes the sum by ~2 S / T, 16 times that
    at T = 16384."""
    adapters = [index for index, slot in enumerate(layer.layout.slots)
                if slot.adapter_index is not None]
    if not adapters:
        return 0.0
    tokens = gates.shape[0]
    weights = output_weighting((tokens, layer.out_features), gates.device, dtype)
    terms = gates[:, adapters].double().abs().t() @ weights.double().abs()
    return tokens ** 0.5 * torch.finfo(torch.float32).eps / 2 * terms.norm().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["soft", "topk"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_token_counts_and_ranks_above_32(tokens, mode, dtype):
    # T from one token to 16384 (every tile edge: 15, 16, 17, 63, 64, 65) on experts of rank
    # 48 and 40 beside rank 8 and hydra heads; soft and top-2 (masked pairs)
    layer = _layer(RouterConfig(mode=mode, top_k=2, normalize_topk=False), 96, 80, dtype)
    x = _decisive_tokens(layer, tokens, dtype) if mode == "topk" else \
        torch.randn(tokens, 96, device=DEVICE, dtype=dtype)
    _compare(layer, x, dtype)


# Two correct routers may choose differently where the k-th and (k+1)-th probabilities are
# within rounding of a tie (triton computes p in fp32, the oracle in float64; at T = 16384
# one such token made a 2.6% difference in shrink_bias's gradient). The top-k tests take
# tokens whose gap exceeds TOPK_MARGIN, far above p's fp32 error (~1e-7); ties are tested
# in tests/moa_kernels/test_routing.py.
TOPK_MARGIN = 1e-4


def _decisive_tokens(layer, tokens: int, dtype) -> torch.Tensor:
    """x [tokens, in] in `dtype`: random rows whose top-k choice (by the float64 reference
    router, on the rows as rounded to `dtype`) is more than TOPK_MARGIN from a tie."""
    config = layer.router.config
    params = {name: None if value is None else value.detach().double()
              for name, value in layer.router.tensors().items()}
    pool = torch.randn(tokens + tokens // 8 + 64, layer.in_features, device=DEVICE,
                       dtype=dtype)
    p = reference_router(pool.double(), params, kind=config.kind, gate=config.gate,
                         mode="soft")
    ranked = p.sort(-1, descending=True).values
    chosen = pool[ranked[:, config.top_k - 1] - ranked[:, config.top_k] > TOPK_MARGIN]
    assert chosen.shape[0] >= tokens, "test data: too few tokens with a clear top-k choice"
    return chosen[:tokens]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_unit_strides(dtype):
    # x, the outside gates and (through a hooked base) the base output as strided views:
    # every operand the ops read may be non-contiguous
    layer = _layer(None, 48, 40, dtype)
    wide = torch.randn(33, 2 * 48, device=DEVICE, dtype=dtype)
    x = wide[:, ::2]  # column stride 2
    gates = torch.rand(layer.num_experts, 33, device=DEVICE, dtype=dtype).t()  # transposed
    assert not x.is_contiguous() and not gates.is_contiguous()
    _compare(layer, x, dtype, gates)
    layer.base.register_forward_hook(lambda module, args, out: out.t().contiguous().t())
    _compare(layer, x, dtype, gates)  # called as a module: its output has strides (1, T)


@pytest.fixture
def nan_prefilled(monkeypatch):
    """Within `with nan_prefilled():`, every floating-point buffer torch.empty and
    torch.empty_like allocate starts as NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(tensor):
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    @contextlib.contextmanager
    def prefilled():
        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
            patch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
            yield

    return prefilled


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["soft", "threshold", "adaptive", "topk"])
def test_nan_prefilled_outputs_are_fully_written(nan_prefilled, mode, dtype):
    # every buffer of the triton run starts as NaN (the reference runs on a clean
    # allocator): an element a kernel forgets to write would show
    layer = _layer(RouterConfig(mode=mode), 40, 24, dtype)
    x = torch.randn(65, 40, device=DEVICE, dtype=dtype)
    actual = _compare(layer, x, dtype, prefill=nan_prefilled)
    for name, value in actual.items():
        assert value is None or torch.isfinite(value).all(), name


@pytest.mark.parametrize("mode", ["soft", "topk"])
def test_bitwise_deterministic(mode):
    # no float atomics anywhere: two runs give the same bits, values and gradients
    dtype = torch.bfloat16
    layer = _layer(RouterConfig(mode=mode), 96, 80, dtype)
    x = torch.randn(1000 if ON_GPU else 40, 96, device=DEVICE, dtype=dtype)
    first, _ = _run(layer, x, "triton")
    second, _ = _run(layer, x, "triton")
    for name in first:
        if first[name] is not None:
            assert torch.equal(first[name], second[name]), name


# The realistic shapes of tools/triton_builds.py (L1; the 8B layer's projections)
REALISTIC = [("L1", ["lora:8", "lora:16", "lora:32", "adapter:16"], RouterConfig(), 2048, 2048,
              2048),
             ("8B q", ["lora:8"], None, 8192, 4096, 4096)]


@pytest.mark.skipif(not ON_GPU, reason="reads the JIT's compiled kernels (CUDA only)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_jit_builds_within_budget(dtype):
    """The builds the JIT made on this GPU for realistic shapes: registers and spills from
    the driver, against the budget (no spills; <= 168 registers at 4 warps). The builds
    new in this test (compiled for `dtype`) go to the GPU suite's table, once each."""
    from moa_kernels.triton import expand

    kernels = (expand._gate_kernel, expand._gate_grad_kernel)
    device = torch.cuda.current_device()
    before = _compiled_ids(kernels, device)
    for _, experts, router, tokens, d_in, d_out in REALISTIC:
        layer = _layer(router, d_in, d_out, dtype, experts)
        x = torch.randn(tokens, d_in, device=DEVICE, dtype=dtype, requires_grad=True)
        gates = None if router is not None else torch.rand(tokens, 1, device=DEVICE,
                                                           dtype=dtype)
        y = layer(x, gates) if gates is not None else layer(x)
        y.float().sum().backward()
    torch.cuda.synchronize()
    new = _build_rows(kernels, device, str(dtype), before)
    assert {row["kernel"] for row in new} == {k.fn.__name__ for k in kernels}
    out = os.environ.get("MOA_GPU_SUITE_OUT")
    if out:
        with open(os.path.join(out, f"jit_builds_{str(dtype)[6:]}.json"), "w") as handle:
            json.dump(new, handle, indent=1)
    # every build of these kernels in this process keeps the budget (those of earlier
    # tests too)
    for row in _build_rows(kernels, device, str(dtype), set()):
        assert row["spills"] == 0, row
        assert row["warps"] != 4 or row["registers"] <= 168, row


def _compiled(kernel, device) -> list:
    """The kernels the JIT compiled for `kernel` on `device`: triton 3.x keeps them in a
    dict inside device_caches[device] (a tuple whose layout changes between versions),
    older ones in cache[device]; a compiled kernel is what has `asm`."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        entry = caches[device]
        dicts = [c for c in (entry if isinstance(entry, tuple) else (entry,))
                 if isinstance(c, dict)]
    else:
        dicts = [kernel.cache[device]]
    compiled = [k for cache in dicts for k in cache.values() if hasattr(k, "asm")]
    for item in compiled:
        if getattr(item, "n_regs", None) is None and hasattr(item, "_init_handles"):
            item._init_handles()
    return compiled


def _compiled_ids(kernels, device) -> set[int]:
    """The ids of the builds the JIT holds now for `kernels` (each stays alive in its cache,
    so an id names one build for the process's life)."""
    return {id(compiled) for kernel in kernels for compiled in _compiled(kernel, device)}


def _build_rows(kernels, device, dtype: str, before: set[int]) -> list[dict]:
    """A row per build of `kernels` on `device` not in `before` (_compiled_ids), labelled
    with `dtype`: the builds a test made, with the dtype it ran."""
    rows = []
    for kernel in kernels:
        for compiled in _compiled(kernel, device):
            if id(compiled) not in before:
                rows.append({"kernel": kernel.fn.__name__, "dtype": dtype,
                             "registers": int(compiled.n_regs),
                             "spills": int(compiled.n_spills),
                             "shared": int(compiled.metadata.shared),
                             "warps": int(compiled.metadata.num_warps)})
    return rows


class _FakeBuild:
    """What _build_rows reads of a compiled kernel."""

    def __init__(self, registers):
        self.asm, self.n_regs, self.n_spills = {}, registers, 0
        self.metadata = types.SimpleNamespace(shared=1024, num_warps=4)


def test_build_rows_label_each_build_once_with_the_dtype_of_its_test():
    # two "tests" in one process (bf16, then fp16) on a JIT cache laid out as triton 3.9's
    # (device_caches[device] = (kernel cache, key cache, target, backend, binder)): the
    # second records only the builds it added, labelled fp16; nothing appears twice
    class Kernel:
        def __init__(self, name):
            self.fn = types.SimpleNamespace(__name__=name)
            self.device_caches = {0: ({}, {"a key": "not a build"}, None, None, None)}

        def compile(self, key, registers):
            self.device_caches[0][0][key] = _FakeBuild(registers)

    kernels = (Kernel("_gate_kernel"), Kernel("_gate_grad_kernel"))
    before = _compiled_ids(kernels, 0)
    kernels[0].compile("bf16 L1", 80)
    kernels[1].compile("bf16 L1", 90)
    first = _build_rows(kernels, 0, "torch.bfloat16", before)
    before = _compiled_ids(kernels, 0)
    kernels[0].compile("fp16 L1", 81)
    second = _build_rows(kernels, 0, "torch.float16", before)
    assert [(r["kernel"], r["dtype"], r["registers"]) for r in first] == [
        ("_gate_kernel", "torch.bfloat16", 80), ("_gate_grad_kernel", "torch.bfloat16", 90)]
    assert [(r["kernel"], r["dtype"], r["registers"]) for r in second] == [
        ("_gate_kernel", "torch.float16", 81)]
    assert len(_build_rows(kernels, 0, "any", set())) == 3  # all builds, for the budget
