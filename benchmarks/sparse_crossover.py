"""Sparse modes on few tokens: the torch backend's routing plan against its dense masked
path, per token count (how moa_kernels/torch_ops.py SPARSE_PLAN_MIN_TOKENS was chosen).

    python benchmarks/sparse_crossover.py --features 512 --tokens 4,16,64,256,1024

One MoALinear of the layer benchmark's M8 top-2 case (moa/cli/bench.py LAYER_CASES), forward
without grad and forward + backward, both paths in the same interleaved rounds; prints
dense / plan (below 1: the dense path is faster).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from moa.cli import bench
from moa.modules.linear import MoALinear
from moa_kernels import torch_ops


def crossover(features: int, tokens: int, rounds: int, case_name: str = "M8 topk2"):
    case = next(c for c in bench.LAYER_CASES if c.name == case_name)
    base = nn.Linear(features, features).requires_grad_(False)
    layer = MoALinear(base, list(case.experts), case.router, backend="torch")
    with torch.no_grad():
        layer.expand_weight.normal_(0.0, 0.02)
    x = torch.randn(tokens, features, requires_grad=True)
    grad_y = torch.randn(tokens, features)
    functions = {}
    for label, minimum in (("plan", 0), ("dense", 2 ** 62)):
        def forward(minimum=minimum) -> None:
            torch_ops.SPARSE_PLAN_MIN_TOKENS = minimum
            with torch.no_grad():
                layer(x)

        def train(minimum=minimum) -> None:
            torch_ops.SPARSE_PLAN_MIN_TOKENS = minimum
            layer(x).backward(grad_y)
        functions[(label, "forward")], functions[(label, "train")] = forward, train
    default = torch_ops.SPARSE_PLAN_MIN_TOKENS
    try:
        samples = bench.interleaved_samples(functions, rounds, torch.device("cpu"))
    finally:
        torch_ops.SPARSE_PLAN_MIN_TOKENS = default
    return (bench.median_ratio(samples, ("dense", "forward"), ("plan", "forward")),
            bench.median_ratio(samples, ("dense", "train"), ("plan", "train")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--tokens", default="4,16,32,64,128,256,1024")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"M8 topk2, features {args.features}, {torch.get_num_threads()} threads")
    for tokens in (int(t) for t in args.tokens.split(",")):
        forward, train = crossover(args.features, tokens, args.rounds)
        print(f"T={tokens:6d}  dense/plan forward {forward:.3f}  fwd+bwd {train:.3f}",
              flush=True)


if __name__ == "__main__":
    main()
