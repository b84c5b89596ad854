"""Print the issue-2 layer ratios (L1, M8) measured in one interleaved run.

    .venv/bin/python benchmarks/layer_ratios.py [--rounds 9] [--backends torch,reference]
"""

import argparse
import platform

import torch

from moa.cli.bench import format_layer_table, layer_benchmark, overhead_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--backends", default="torch,reference")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    backends = args.backends.split(",")
    rows = layer_benchmark(backends, rounds=args.rounds, device=args.device)
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(format_layer_table(rows))
    pick = {(r.case, r.backend): r for r in rows}
    for backend in backends:
        print(f"[{backend}] M8 topk2 overhead / soft overhead: "
              f"forward {overhead_ratio(rows, 'M8 topk2', 'M8 soft', backend, False):.2f}, "
              f"fwd+bwd {overhead_ratio(rows, 'M8 topk2', 'M8 soft', backend, True):.2f}")
    if "reference" in backends and "torch" in backends:
        speedup = pick[("L1 soft", "reference")].fwd_bwd_ms / pick[("L1 soft", "torch")].fwd_bwd_ms
        print(f"L1 fwd+bwd speed-up of torch over the per-expert reference loop: {speedup:.2f}x")


if __name__ == "__main__":
    main()
