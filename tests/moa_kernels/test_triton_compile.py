"""Compilation checks that need no GPU.

1. Every Triton kernel launch of a forward and backward pass (soft and sparse, fp32, fp16
   and bf16) is recorded under the interpreter, then compiled ahead of time for an H100
   (sm_90) in a subprocess without the interpreter: catches what the lenient interpreter
   accepts but the real compiler rejects (types, constexpr misuse, unsupported control
   flow).
2. torch.compile smoke tests: a MoALinear on the triton backend traced with
   fullgraph=True, forward and backward equal to eager.
"""

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from moa import MoALinear, RouterConfig  # noqa: E402
from tests.conftest import relative_error  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"

COMPILE_SCRIPT = r"""
import importlib, json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
failures = []
launches = json.loads(sys.stdin.read())
for launch in launches:
    module = importlib.import_module(launch["module"])
    fn = getattr(module, launch["name"])
    constexprs = {k: tl.dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                  for k, v in launch["constexprs"].items()}
    try:
        triton.compile(ASTSource(fn=fn, signature=launch["signature"], constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32))
    except Exception as error:  # report every failing kernel, not only the first
        failures.append(f"{launch['name']} {launch['constexprs']}: {error}")
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                  torch.int32: "*i32", torch.int64: "*i64", torch.int8: "*i8"}


def _record_launches(run):
    """(module, kernel name, signature, constexprs) of every launch that `run` makes."""
    from triton.runtime.interpreter import InterpretedFunction

    records = {}
    original = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        signature, constexprs = {}, {}
        parameters = inspect.signature(self.fn).parameters
        for name, value in list(zip(self.arg_names, args)) + list(kwargs.items()):
            if "constexpr" in str(parameters[name].annotation):
                constexprs[name] = f"tl.{value}" if isinstance(value, tl.dtype) else value
            elif isinstance(value, torch.Tensor):
                signature[name] = _POINTER_TYPES[value.dtype]
            elif isinstance(value, int):
                signature[name] = "i64" if abs(value) >= 2 ** 31 else "i32"
            else:
                signature[name] = "fp32"
        key = (self.fn.__module__, self.fn.__name__, json.dumps(signature, sort_keys=True),
               json.dumps(constexprs, sort_keys=True))
        records[key] = {"module": self.fn.__module__, "name": self.fn.__name__,
                        "signature": signature, "constexprs": constexprs}
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    try:
        run()
    finally:
        InterpretedFunction.run = original
    return list(records.values())


def _forward_backward(dtype, mode):
    torch.manual_seed(0)
    layer = MoALinear(nn.Linear(24, 20), ["adapter:5:silu", "lora:8", "hydra:4:2"],
                      RouterConfig(mode=mode), backend="triton").to(dtype)
    x = torch.randn(7, 24, dtype=dtype, requires_grad=True)
    layer(x).float().square().sum().backward()


@pytest.mark.skipif(not INTERPRETED, reason="records launches through the Triton interpreter")
def test_every_kernel_compiles_for_sm90():
    launches = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for mode in ("soft", "topk"):
            launches += _record_launches(lambda d=dtype, m=mode: _forward_backward(d, m))
    names = {launch["name"] for launch in launches}
    assert {"_matmul_kernel", "_grouped_shrink_kernel", "_grouped_weight_grad_kernel",
            "_segmented_kernel", "_expand_grad_kernel", "_expand_weight_grad_kernel"} <= names
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], input=json.dumps(launches),
                            capture_output=True, text=True, env=env, timeout=600,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                                os.path.abspath(__file__)))))
    if "GPUTarget" in result.stderr and "ImportError" in result.stderr:
        pytest.skip(f"this triton cannot compile for CUDA here: {result.stderr[-300:]}")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]


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


# soft: the dense shrink + expand ops; topk: the sync-free plan and the grouped ops
@pytest.mark.parametrize("mode", ["soft", "topk"])
def test_torch_compile_traces_the_custom_ops(mode):
    _compile_case(mode, "aot_eager")


def test_torch_compile_with_inductor():
    _compile_case("threshold", "inductor")
