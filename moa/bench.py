"""Layer benchmarks: a MoALinear against its frozen base layer, measured as ratios in one run.

Shapes (issue 2):
    L1: nn.Linear(2048, 2048) frozen, T = 2048, experts lora:8, lora:16, lora:32, adapter:16,
        swiglu router x4, soft mode.
    M8: the same base, 8 x lora:16, softmax gate; soft mode against topk k=2.

Every case is timed in interleaved rounds (base, case, base, case, ...) and reported as the
median; ratios divide medians of the same run, so machine-wide drift cancels out.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moa.config import RouterConfig
from moa.layers import MoALinear


@dataclass(frozen=True)
class LayerCase:
    name: str
    experts: tuple[str, ...]
    router: RouterConfig


L1 = LayerCase("L1 soft", ("lora:8", "lora:16", "lora:32", "adapter:16"), RouterConfig())
M8_SOFT = LayerCase("M8 soft", ("lora:16",) * 8, RouterConfig(gate="softmax"))
M8_TOPK = LayerCase("M8 topk2", ("lora:16",) * 8,
                    RouterConfig(gate="softmax", mode="topk", top_k=2))
LAYER_CASES = (L1, M8_SOFT, M8_TOPK)


@dataclass
class Timing:
    case: str
    backend: str
    forward_ms: float
    train_ms: float  # forward + backward (x requires grad, base frozen)
    forward_ratio: float  # over the frozen base layer alone
    train_ratio: float


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(device: torch.device) -> Callable[[Callable[[], None]], float]:
    def run(fn: Callable[[], None]) -> float:
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        return time.perf_counter() - start
    return run


def interleaved_medians(functions: dict[str, Callable[[], None]], rounds: int,
                        device: torch.device, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, timed round-robin `rounds` times after warm-up."""
    timer = _timer(device)
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            samples[name].append(timer(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def _step_functions(module: nn.Module, x: torch.Tensor, grad_y: torch.Tensor):
    def forward() -> None:
        with torch.no_grad():
            module(x)

    def train() -> None:
        x.grad = None
        module(x).backward(grad_y)

    return forward, train


def layer_benchmark(backends: list[str], *, tokens: int = 2048, features: int = 2048,
                    rounds: int = 7, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32,
                    cases: tuple[LayerCase, ...] = LAYER_CASES, seed: int = 0) -> list[Timing]:
    """Time every case x backend against the frozen base layer alone, interleaved."""
    device = torch.device(device)
    torch.manual_seed(seed)
    base = nn.Linear(features, features, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(tokens, features, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(tokens, features, device=device, dtype=dtype)
    functions, labels = {}, {}
    functions["base/forward"], functions["base/train"] = _step_functions(base, x, grad_y)
    for case in cases:
        for backend in backends:
            layer = MoALinear(base, list(case.experts), case.router, backend=backend)
            with torch.no_grad():  # B starts at zero; give the experts real work
                layer.expand_weight.normal_(0.0, 0.02)
            key = f"{case.name}/{backend}"
            labels[key] = (case.name, backend)
            functions[f"{key}/forward"], functions[f"{key}/train"] = _step_functions(
                layer, x, grad_y)
    medians = interleaved_medians(functions, rounds, device)
    base_forward, base_train = medians["base/forward"], medians["base/train"]
    rows = [Timing("base", "-", base_forward * 1e3, base_train * 1e3, 1.0, 1.0)]
    for key, (case, backend) in labels.items():
        forward, train = medians[f"{key}/forward"], medians[f"{key}/train"]
        rows.append(Timing(case, backend, forward * 1e3, train * 1e3, forward / base_forward,
                           train / base_train))
    return rows


def overhead_ratio(rows: list[Timing], sparse_case: str, dense_case: str, backend: str,
                   train: bool) -> float:
    """(sparse - base) / (dense - base) for one backend: the M8 target."""
    pick = {(r.case, r.backend): r for r in rows}
    base = pick[("base", "-")]
    attribute = "train_ms" if train else "forward_ms"
    sparse = getattr(pick[(sparse_case, backend)], attribute) - getattr(base, attribute)
    dense = getattr(pick[(dense_case, backend)], attribute) - getattr(base, attribute)
    return sparse / dense


def format_layer_table(rows: list[Timing]) -> str:
    lines = [f"{'case':10s} {'backend':9s} {'fwd ms':>9s} {'fwd x':>7s} "
             f"{'fwd+bwd ms':>11s} {'fwd+bwd x':>9s}"]
    for r in rows:
        lines.append(f"{r.case:10s} {r.backend:9s} {r.forward_ms:9.2f} {r.forward_ratio:7.3f} "
                     f"{r.train_ms:11.2f} {r.train_ratio:9.3f}")
    return "\n".join(lines)
