"""Compilation checks that need no GPU.

1. sm_90 builds made as a GPU run makes them (tools/triton_builds.py): every kernel
   launch of a forward and backward is intercepted, specialised by triton's own JIT binder
   (integers equal to 1 become constants; pointers and integers divisible by 16 are
   marked), compiled ahead of time for an H100 (sm_90) and checked against the issue-13
   budget: no spills, at most 168 registers per thread at 4 warps, fp16 / bf16 dots on
   tensor cores. Realistic shapes (L1, M8 soft and top-2, a Llama-3.1-8B layer at T = 8192;
   the grouped sparse plan, MOA_TRITON_SPARSE=grouped, on M8 top-2 and on L1's experts
   under a top-2 router) in bf16, fp16 and fp32, on the meta device (nothing allocated),
   and small odd shapes in every mode (the unaligned specialisation; grouped too). This
   runs in a subprocess: the kernels must be JIT functions there, not the interpreter's.
2. torch.compile smoke tests: a MoALinear on the triton backend traced with
   fullgraph=True, forward and backward equal to eager.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")

from moa import MoALinear, RouterConfig  # noqa: E402
from tests.conftest import relative_error  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MASKED_KERNELS = {"_gate_kernel", "_gate_grad_kernel"}
# the grouped sparse plan (moa_kernels/triton/grouped.py): configs named "... grouped"
GROUPED_KERNELS = {"gathered_shrink_kernel", "pair_rows_kernel", "combine_kernel",
                   "pair_weight_grad_kernel"}
KERNELS = MASKED_KERNELS | GROUPED_KERNELS


def _expected_kernels(config: str) -> set:
    return GROUPED_KERNELS if config.endswith("grouped") else MASKED_KERNELS


def _without_interpreter(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                            text=True, env=env, timeout=900, cwd=ROOT)
    if result.returncode and "ptxas" in result.stderr and "No such file" in result.stderr:
        pytest.skip(f"this triton cannot compile for CUDA here: {result.stderr[-300:]}")
    return result


def _builds(tmp_path, selection: str, dtypes: str) -> list[dict]:
    out = tmp_path / "builds.json"
    result = _without_interpreter(
        "import sys; from tools.triton_builds import main; sys.exit(main(sys.argv[1:]))",
        "--set", selection, "--dtypes", dtypes, "--json", str(out), "--check")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("selection, dtypes", [
    ("realistic", "bf16,fp16,fp32"),  # L1, M8 soft / top-2, the 8B layer at T = 8192
    ("tiny", "bf16"),  # odd sizes (nothing 16-divisible), every mode and activation
])
def test_sm90_builds_as_a_gpu_run_makes_them_are_within_budget(tmp_path, selection, dtypes):
    rows = _builds(tmp_path, selection, dtypes)
    for row in rows:
        assert row["violations"] == [], row  # --check passed: the same, row by row
        assert all(row["kernel"] in _expected_kernels(config) for config in row["configs"])
    made = {(config, row["dtype"], row["kernel"]) for row in rows for config in row["configs"]}
    configs = {config for row in rows for config in row["configs"]}
    assert any(config.endswith("grouped") for config in configs)
    for dtype in dtypes.split(","):
        for config in configs:
            for kernel in _expected_kernels(config):  # forward and backward were built
                assert (config, dtype, kernel) in made
    grouped_dots = [row for row in rows if row["kernel"] in GROUPED_KERNELS - {"combine_kernel"}
                    and row["dtype"] in ("bf16", "fp16")]
    assert grouped_dots and all(row["tensor_cores"] != "none" for row in grouped_dots)
    if selection == "realistic":
        # the JIT's specialisation reached the builds: 16-aligned rows of h, u and du, and
        # the 8B layer's one-column gates [T, 1] give stride 1, a constant
        for row in rows:
            if row["kernel"] in MASKED_KERNELS:
                assert "stride_h" in row["aligned"], row
            else:  # the grouped plan's pair buffers and gathered rows: 16-aligned strides
                assert {"stride_rows", "stride_src", "stride_data"} & set(row["aligned"]), row
        eight_b = [row for row in rows if "8B q" in row["configs"]]
        assert eight_b and all(row["constants"].get("stride_g") == "1" for row in eight_b)
        assert all(set(row["configs"]) == {"8B q", "8B k", "8B v", "8B o", "8B down"}
                   for row in eight_b)  # one build serves every module of the layer


SPECIALISATION = r"""
import json, torch
from tools import triton_builds as builds
from moa_kernels.triton.expand import _gate_kernel

with builds.recording() as launches:
    h = torch.empty(64, 48, device="meta")
    gates = torch.empty(64, 1, device="meta")
    u = torch.empty(64, 32, device="meta")
    for view in (h, h[:, 1:]):  # aligned, then 4 bytes off
        _gate_kernel[(1,)](view, gates, gates, gates, gates, u, 64, view.stride(0),
                           gates.stride(0), gates.stride(0), u.stride(0), COLUMNS=8,
                           BIAS_STOP=8, K_WIDTH=16, H_WIDTH=16, SILU=8, GELU=8, RELU=8,
                           SPARSE=False, BLOCK_T=32, BLOCK_C=16)
print(json.dumps([{"constants": sorted(l.constants), "aligned": l.aligned}
                  for l in launches]))
"""


def test_recorded_launches_carry_the_jit_specialisation():
    result = _without_interpreter(SPECIALISATION)
    assert result.returncode == 0, result.stderr[-3000:]
    aligned, offset = json.loads(result.stdout.strip().splitlines()[-1])
    # stride_g = 1 is a constant, as the JIT makes it; 64, 48 and 32 are marked divisible
    assert "stride_g" in aligned["constants"] and "stride_a" in aligned["constants"]
    assert {"h_ptr", "u_ptr", "T", "stride_h", "stride_u"} <= set(aligned["aligned"])
    assert "h_ptr" not in offset["aligned"]  # a view 4 bytes into h is not 16-aligned


def _compile_case(mode: str, backend: str):
    torch.manual_seed(0)
    layer = MoALinear(nn.Linear(24, 20), ["adapter:5:silu", "lora:8", "hydra:4:2"],
                      RouterConfig(mode=mode), backend="triton").to(DEVICE)
    with torch.no_grad():
        layer.expand_weight.normal_()
    x = torch.randn(9, 24, device=DEVICE, requires_grad=True)
    eager_y = layer(x)
    eager_y.square().sum().backward()
    eager = [eager_y.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()
                                          if p.grad is not None]
    layer.zero_grad()
    x.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    try:
        y = compiled(x)
        y.square().sum().backward()
    except Exception as error:  # the compiler stack itself may be unusable on this machine
        if backend == "inductor" and "InductorError" in type(error).__name__:
            pytest.skip(f"inductor cannot compile on this machine: {str(error)[:200]}")
        raise
    traced = [y.detach(), x.grad] + [p.grad for p in layer.parameters() if p.grad is not None]
    assert len(traced) == len(eager)
    for actual, expected in zip(traced, eager):
        assert relative_error(actual, expected) < 1e-5


# soft: the fused shrink + gated expand ops; topk: the same ops with the active mask
@pytest.mark.parametrize("mode", ["soft", "topk"])
def test_torch_compile_traces_the_custom_ops(mode):
    _compile_case(mode, "aot_eager")


def test_torch_compile_with_inductor():
    _compile_case("threshold", "inductor")
