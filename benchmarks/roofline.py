"""Roofline floors of the triton backend's kernels for the issue-2 layer shapes on an H100.

    .venv/bin/python benchmarks/roofline.py [--tokens 2048] [--features 2048]

For each kernel launched by one forward + backward of a MoALinear (shapes L1, M8 soft,
M8 topk2; bf16 data, fp32 h), FLOPs and bytes follow the formulas in each kernel file's
docstring; the floor is max(FLOPs / 800 TFLOP/s, bytes / 3 TB/s). The frozen base GEMMs
(cuBLAS) are listed as the yardstick: "x base" is the layer's floor over the base floor.
Sparse rows assume uniform routing: topk k gives N = k T active pairs per layer.
No GPU is needed: this is arithmetic, not a measurement.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from moa.bench import LAYER_CASES
from moa.config import parse_experts
from moa_kernels.layout import ExpertLayout
from moa_kernels.triton.kernel_utils import BLOCK_R

PEAK_FLOPS = 800e12  # H100 SXM dense bf16 tensor-core, about
PEAK_BYTES = 3.0e12  # H100 SXM HBM3, about
DATA = 2  # bf16 bytes per element (x, weights, y, dy)
ACC = 4  # fp32 bytes per element (h, dh, gates math)


@dataclass
class Row:
    kernel: str
    flops: float
    bytes: float

    @property
    def floor_us(self) -> float:
        return max(self.flops / PEAK_FLOPS, self.bytes / PEAK_BYTES) * 1e6

    @property
    def bound(self) -> str:
        return "flop" if self.flops / PEAK_FLOPS > self.bytes / PEAK_BYTES else "mem"


def kernel_rows(case, tokens: int, features: int) -> list[Row]:
    """FLOPs and bytes of every launch of one forward + backward (x requires grad)."""
    t, d_in, d_out = tokens, features, features
    specs = parse_experts(list(case.experts))
    layout = ExpertLayout.from_specs(specs, d_in, d_out)
    experts, rows, columns = layout.num_experts, layout.shrink_rows, layout.expand_columns
    adapters = layout.num_adapters
    router = case.router
    hidden = router.hidden_factor * experts
    first = (experts if router.kind == "linear" else 2 * hidden) + router.uses_threshold
    chunks = sum(math.ceil(slot.rank / BLOCK_R) for slot in layout.slots)
    base = [Row("base fwd (cuBLAS)", 2 * t * d_in * d_out,
                DATA * (t * d_in + d_in * d_out + t * d_out)),
            Row("base dx (cuBLAS)", 2 * t * d_in * d_out,
                DATA * (t * d_out + d_in * d_out + t * d_in))]
    result = []
    if not router.is_sparse:
        s = rows + first
        result += [
            Row("shrink fwd [A;W_router]", 2 * t * d_in * s,
                DATA * (t * d_in + s * d_in) + ACC * t * s),
            Row("gated expand fwd", 2 * t * (columns + adapters) * d_out,
                2 * DATA * t * d_out + ACC * t * rows + DATA * columns * d_out),
            Row("expand bwd dh, dg", 2 * t * (columns + adapters) * d_out,
                DATA * t * d_out * chunks + 2 * ACC * t * rows + DATA * columns * d_out),
            Row("expand bwd dB, db_up", 2 * t * columns * d_out,
                DATA * t * d_out * chunks + ACC * t * rows + DATA * columns * d_out),
            Row("shrink bwd dx", 2 * t * s * d_in,
                ACC * t * s + DATA * (s * d_in + t * d_in)),
            Row("shrink bwd dW, db", 2 * t * s * d_in,
                ACC * t * s + DATA * (t * d_in + s * d_in)),
        ]
    else:
        pairs = t * (router.top_k if router.mode == "topk" else experts)
        rank_pairs = sum(pairs / experts * slot.rank for slot in layout.slots)
        result += [
            Row("router shrink fwd", 2 * t * d_in * first,
                DATA * (t * d_in + first * d_in) + ACC * t * first),
            Row("grouped shrink fwd", 2 * d_in * rank_pairs,
                DATA * (pairs * d_in + rows * d_in) + ACC * rank_pairs),
            Row("gated expand fwd (tile skip)", 2 * t * (columns + adapters) * d_out,
                2 * DATA * t * d_out + ACC * t * rows + DATA * columns * d_out),
            Row("expand bwd dh, dg (tile skip)", 2 * t * columns * d_out,
                DATA * t * d_out * chunks + 2 * ACC * t * rows + DATA * columns * d_out),
            Row("expand bwd dB (plan pairs)", 2 * rank_pairs * d_out,
                DATA * pairs * d_out + ACC * rank_pairs + DATA * columns * d_out),
            Row("grouped shrink bwd dx (tile skip)", 2 * t * rows * d_in,
                ACC * t * rows + DATA * (rows * d_in + t * d_in)),
            Row("grouped shrink bwd dW (plan pairs)", 2 * rank_pairs * d_in,
                ACC * rank_pairs + DATA * (pairs * d_in + rows * d_in)),
            Row("router shrink bwd dx + dW", 4 * t * first * d_in,
                2 * ACC * t * first + 2 * DATA * (first * d_in + t * d_in)),
        ]
    return base + result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=2048)
    args = parser.parse_args()
    print(f"H100 roofline: {PEAK_FLOPS / 1e12:.0f} TFLOP/s bf16, {PEAK_BYTES / 1e12:.1f} TB/s;"
          f" T = {args.tokens}, in = out = {args.features}, bf16 data, fp32 h\n")
    header = f"{'case':9s} {'kernel':36s} {'GFLOP':>8s} {'MB':>8s} {'floor us':>9s} bound"
    for case in LAYER_CASES:
        rows = kernel_rows(case, args.tokens, args.features)
        print(header)
        for row in rows:
            print(f"{case.name:9s} {row.kernel:36s} {row.flops / 1e9:8.2f} "
                  f"{row.bytes / 1e6:8.2f} {row.floor_us:9.2f} {row.bound}")
        base_floor = sum(r.floor_us for r in rows[:2])
        base_forward = rows[0].floor_us
        total = sum(r.floor_us for r in rows)
        forward = base_forward + sum(r.floor_us for r in rows[2:] if "bwd" not in r.kernel)
        print(f"{case.name:9s} {'total fwd+bwd':36s} {'':8s} {'':8s} {total:9.2f} "
              f"= {total / base_floor:.2f} x base; forward {forward:.2f} us = "
              f"{forward / base_forward:.2f} x base\n")


if __name__ == "__main__":
    main()
