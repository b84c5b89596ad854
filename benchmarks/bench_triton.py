"""Triton backend on CUDA: L1 and M8 layer timings against the frozen base layer, the torch
backend and the reference backend, as medians from triton.testing.do_bench.

    .venv/bin/python benchmarks/bench_triton.py [--tokens 2048] [--features 2048]
        [--dtype bf16] [--backends triton,torch,reference]

Forward = one layer call; fwd+bwd = call + backward of a fixed dy, x requiring grad and the
base frozen; the adapters in the base's dtype. Every ratio is taken between numbers of the
same run. Beside each do_bench median, the host's time (gpu_suite.host_times): launch, one
call without waiting for the GPU, and wall, per call of calls back to back synchronised
once; "host" marks a median within reach of its launch time (it measures the host: Python,
dispatch, launches, not the kernels). Without CUDA it prints why and exits 0 (CI has no
GPU; see benchmarks/roofline.py for the kernels' floors). benchmarks/gpu_suite.sh runs the
fuller set (the 8B layer, PEFT-style LoRA) with the tests, and writes its figures to a
folder.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _cases():
    from moa.cli.bench import LAYER_CASES

    return LAYER_CASES


def _timings(module: nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> dict[str, float]:
    """do_bench medians (fwd, train, ms) and beside each its host times (fwd_launch,
    fwd_wall, train_launch, train_wall, ms; see gpu_suite.host_times)."""
    from gpu_suite import HOST_CALLS, host_times
    from triton.testing import do_bench

    def forward():
        with torch.no_grad():
            module(x)

    def train():
        x.grad = None
        module(x).backward(grad_y)

    found = {}
    for name, fn, grad_to_none in (("fwd", forward, None),
                                   ("train", train, [x] + list(module.parameters()))):
        found[name] = do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
        found[f"{name}_launch"], found[f"{name}_wall"] = host_times(
            fn, grad_to_none, torch.cuda.synchronize, HOST_CALLS)
    return found


def _row(case: str, backend: str, times: dict, base: dict | None) -> str:
    from gpu_suite import HOST_BOUND_SHARE

    host = [label for label, name in (("fwd", "fwd"), ("fwd+bwd", "train"))
            if times[f"{name}_launch"] >= HOST_BOUND_SHARE * times[name]]
    ratios = " " * 21 if base is None else \
        f" {times['fwd'] / base['fwd']:9.2f} {times['train'] / base['train']:11.2f}"
    return (f"{case:9s} {backend:10s} {times['fwd']:8.3f} {times['fwd_launch']:7.3f} "
            f"{times['fwd_wall']:7.3f} {times['train']:11.3f} {times['train_launch']:7.3f} "
            f"{times['train_wall']:7.3f}{ratios}  {'host: ' + ', '.join(host) if host else ''}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--backends", default="triton,torch,reference")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_triton: no CUDA device here, nothing measured (the Triton backend is "
              "timed on GPUs only; run benchmarks/roofline.py for its floors)")
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_triton: TRITON_INTERPRET=1 would time the interpreter; unset it")
        return 1
    from moa import MoALinear

    torch.backends.cuda.matmul.allow_tf32 = False
    dtype, device = DTYPES[args.dtype], torch.device("cuda")
    backends = args.backends.split(",")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"T = {args.tokens}, in = out = {args.features}, {args.dtype}")
    print(f"{'case':9s} {'backend':10s} {'fwd ms':>8s} {'launch':>7s} {'wall':>7s} "
          f"{'fwd+bwd ms':>11s} {'launch':>7s} {'wall':>7s} {'fwd/base':>9s} "
          f"{'train/base':>11s}")
    results = {}
    for case in _cases():
        torch.manual_seed(0)
        base = nn.Linear(args.features, args.features, device=device, dtype=dtype)
        layer = MoALinear(base, list(case.experts), case.router, adapter_dtype="base")
        x = torch.randn(args.tokens, args.features, device=device, dtype=dtype,
                        requires_grad=True)
        grad_y = torch.randn(args.tokens, args.features, device=device, dtype=dtype)
        results[(case.name, "base")] = _timings(base, x, grad_y)
        print(_row(case.name, "base", results[(case.name, "base")], None))
        for backend in backends:
            layer.backend = backend
            results[(case.name, backend)] = _timings(layer, x, grad_y)
            print(_row(case.name, backend, results[(case.name, backend)],
                       results[(case.name, "base")]))
    for other in ("torch", "reference"):
        if "triton" in backends and other in backends:
            for case in _cases():
                fwd = results[(case.name, other)]["fwd"] / results[(case.name, "triton")]["fwd"]
                train = results[(case.name, other)]["train"] / \
                    results[(case.name, "triton")]["train"]
                print(f"{case.name}: triton is {fwd:.2f}x (fwd) / {train:.2f}x (fwd+bwd) "
                      f"faster than {other}")
    for backend in backends:
        names = [c.name for c in _cases()]
        if "M8 topk2" in names and "M8 soft" in names:
            ratios = []
            for index in ("fwd", "train"):
                base_time = results[("M8 soft", "base")][index]
                sparse = results[("M8 topk2", backend)][index] - base_time
                dense = results[("M8 soft", backend)][index] - base_time
                ratios.append(sparse / dense if dense > 0 else float("nan"))
            print(f"[{backend}] M8 topk2 overhead / soft overhead: forward {ratios[0]:.2f}, "
                  f"fwd+bwd {ratios[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
