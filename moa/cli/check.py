"""`moa check`: every available backend against the reference on this device.

Each case draws a fresh random layer (mixed lora ranks, hydra heads, adapters with random
activations, random router kind and gate), fresh random inputs, and compares the fused
backend's output, input gradient and parameter gradients with the reference backend's.
fp32 with TF32 off must agree to docs/DESIGN.md's 1e-5 relative error. The parameter gradients
are compared as one vector (all trainable tensors concatenated): a tensor whose true
gradient nearly cancels (the adaptive threshold, say) is judged at the scale of the
gradient it belongs to.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

from moa.cli.options import Option, options_dataclass, positive_int, seed, torch_device
from moa.config import ACTIVATIONS, MODES, RouterConfig, parse_experts
from moa.modules.linear import MoALinear
from moa_kernels.backends import available
from moa_kernels.contract import BACKENDS

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}

CHECK_OPTIONS: tuple[Option, ...] = (
    Option("device", torch_device, "cpu", "cpu, cuda or cuda:N"),
    Option("cases", positive_int, 3, "random cases per mode"),
    Option("seed", seed, None, "repeat a run's random cases (default: a fresh seed, "
           "printed)"),
)


@options_dataclass(CHECK_OPTIONS)
class CheckOptions:
    """What `moa check` runs with: a keyword field per CHECK_OPTIONS entry."""


@dataclass
class CheckResult:
    backend: str
    mode: str
    description: str
    output_error: float
    input_grad_error: float
    param_grad_error: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return max(self.output_error, self.input_grad_error, self.param_grad_error) <= \
            self.tolerance


def available_backends(device: torch.device) -> list[str]:
    """Fused backends that can run here: torch always; triton on CUDA, or on CPU under the
    Triton interpreter (TRITON_INTERPRET=1 set before triton was imported)."""
    return [name for name, info in BACKENDS.items()
            if not info.oracle and info.runs_on(device) and available(name)]


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.double().norm().item()
    difference = (actual.double() - expected.double()).norm().item()
    return difference / scale if scale > 0 else difference


def _random_layer(rng: random.Random, mode: str, device: torch.device, small: bool):
    in_features, out_features = rng.choice([7, 16, 33]), rng.choice([5, 24, 31])
    if not small:
        in_features, out_features = in_features * 8, out_features * 8
    experts = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.choice(["lora", "lora", "adapter", "hydra"])
        if kind == "lora":
            experts.append(f"lora:{rng.randint(1, 16)}:{rng.choice([1, 8, 16])}")
        elif kind == "adapter":
            experts.append(f"adapter:{rng.randint(1, 16)}:{rng.choice(ACTIVATIONS)}")
        else:
            experts.append(f"hydra:{rng.randint(1, 8)}:{rng.randint(2, 3)}")
    base = nn.Linear(in_features, out_features, bias=rng.random() < 0.7, device=device)
    num_experts = sum(spec.num_experts for spec in parse_experts(experts))
    router = RouterConfig(kind=rng.choice(["linear", "swiglu"]),
                          gate=rng.choice(["sigmoid", "softmax"]), mode=mode,
                          top_k=rng.randint(1, num_experts), max_threshold=0.5)
    layer = MoALinear(base, experts, router=router)
    with torch.no_grad():
        layer.expand_weight.normal_()
        if layer.expand_bias is not None:
            layer.expand_bias.normal_()
    return layer, ", ".join(experts) + f"; router {router.kind}/{router.gate}"


def _run(layer: MoALinear, backend: str, x: torch.Tensor, grad_y: torch.Tensor):
    layer.backend = backend
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(grad_y)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p)
             for p in layer.parameters() if p.requires_grad]
    return y.detach(), x.grad, torch.cat([g.flatten() for g in grads])


def check_backends(device: str | torch.device = "cpu", cases_per_mode: int = 3,
                   seed: int | None = None, small: bool | None = None) -> list[CheckResult]:
    """Run every available fused backend against the reference, every mode, random layers.

    Args:
        device: where to run. cases_per_mode: random layers per router mode.
        seed: makes the random shapes and values repeatable (None: fresh ones each run).
        small: small shapes (the Triton interpreter is slow); default: small off CUDA.
    """
    device = torch.device(device)
    small = device.type != "cuda" if small is None else small
    rng = random.Random(seed)
    torch.manual_seed(rng.randrange(2**31))
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    results = []
    try:
        for mode in MODES:
            for _ in range(cases_per_mode):
                layer, description = _random_layer(rng, mode, device, small)
                tokens = rng.choice([1, 5, 64, 130] if small else [1, 300, 2048])
                x = torch.randn(tokens, layer.in_features, device=device)
                grad_y = torch.randn(tokens, layer.out_features, device=device)
                expected = _run(layer, "reference", x, grad_y)
                for backend in available_backends(device):
                    actual = _run(layer, backend, x, grad_y)
                    errors = [_relative(a, e) for a, e in zip(actual, expected)]
                    results.append(CheckResult(backend, mode, f"T={tokens}; {description}",
                                               *errors, TOLERANCE[torch.float32]))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return results
