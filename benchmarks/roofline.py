"""Roofline floors of the triton backend's plan for the layer shapes, on an H100 or H200.

    .venv/bin/python benchmarks/roofline.py [--tokens 2048] [--features 2048] [--gpu h100]

For each operation of one forward + backward of a MoALinear (L1, M8 soft, M8 top-2; bf16
data), FLOPs and bytes follow the counts in moa_kernels/triton/shrink.py and expand.py;
the floor of each is max(FLOPs / peak FLOP/s, bytes / peak bandwidth). The frozen base
GEMMs (cuBLAS) are the yardstick: "x base" is the layer's floor over the base's. Beside it,
PEFT-style LoRA of the same total rank ("cuBLAS twice": x A^T, then B, the scaling and the
add), the baseline the issue-13 target compares against. Sparse modes run the same GEMMs
as soft mode (expand.py explains why), so their floors equal soft's. No GPU is needed:
this is arithmetic, not a measurement.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from moa.cli.bench import LAYER_CASES
from moa.config import parse_experts
from moa_kernels.layout import ExpertLayout
from moa_kernels.triton.kernel_utils import align16

# dense bf16 tensor-core FLOP/s and HBM bytes/s, about (SXM parts)
GPUS = {"h100": (800e12, 3.35e12), "h200": (800e12, 4.8e12)}
DATA = 2  # bf16 bytes per element


@dataclass
class Row:
    op: str
    flops: float
    bytes: float

    def floor_us(self, peak_flops: float, peak_bytes: float) -> float:
        return max(self.flops / peak_flops, self.bytes / peak_bytes) * 1e6


def plan_rows(case, tokens: int, features: int) -> tuple[list[Row], list[Row]]:
    """(base rows, the plan's rows) of one forward + backward (x requires grad)."""
    t, d_in, d_out, b = tokens, features, features, DATA
    layout = ExpertLayout.from_specs(parse_experts(list(case.experts)), d_in, d_out)
    router = case.router
    experts = layout.num_experts
    first = (experts if router.kind == "linear" else 2 * router.hidden_factor * experts) + \
        router.uses_threshold
    h = align16(layout.expand_columns)
    s = align16(h + first)
    k = align16(layout.expand_columns + layout.num_adapters)
    gemm = 2 * t * d_in * d_out
    base = [Row("base fwd (cuBLAS)", gemm, b * (t * d_in + d_in * d_out + t * d_out)),
            Row("base dx (cuBLAS)", gemm, b * (t * d_out + d_in * d_out + t * d_in))]
    rows = [
        Row("shrink h = x W^T + b (cuBLAS)", 2 * t * d_in * s, b * (t * d_in + s * d_in + t * s)),
        Row("gate kernel u", 6 * t * k, b * (t * h + 2 * t * k) + 4 * t * experts),
        Row("expand y + u B^T (cuBLAS addmm)", 2 * t * k * d_out,
            b * (2 * t * d_out + k * d_out + t * k)),
        Row("du = dy B (cuBLAS)", 2 * t * d_out * k, b * (t * d_out + d_out * k + t * k)),
        Row("dB = dy^T u (cuBLAS)", 2 * t * d_out * k, b * (t * d_out + t * k + d_out * k)),
        Row("gate grad kernel dh, dg", 2 * t * k * 16 + 8 * t * k,
            b * (t * k + 2 * t * h) + 8 * t * experts),
        Row("dx += dh W (cuBLAS, beta = 1)", 2 * t * s * d_in,
            b * (t * s + s * d_in + 2 * t * d_in)),
        Row("dW = dh^T x, db (cuBLAS)", 2 * t * s * d_in, b * (t * s + t * d_in + s * d_in)),
    ]
    return base, rows


def peft_rows(case, tokens: int, features: int) -> list[Row]:
    """PEFT-style LoRA with the same total rank R (the experts' columns stacked, no gates):
    forward x A^T and (x A^T) B^T (cuBLAS), the scaling and the add into the base output
    (elementwise passes); backward dB, d(x A^T), dA, dx (cuBLAS) and autograd's dx add."""
    t, d_in, d_out, b = tokens, features, features, DATA
    layout = ExpertLayout.from_specs(parse_experts(list(case.experts)), d_in, d_out)
    r = layout.expand_columns
    return [Row("x A^T", 2 * t * d_in * r, b * (t * d_in + r * d_in + t * r)),
            Row("(x A^T) B^T", 2 * t * r * d_out, b * (t * r + r * d_out + t * d_out)),
            Row("scale, add", 2 * t * d_out, b * 5 * t * d_out),
            Row("dB", 2 * t * r * d_out, b * (t * d_out + t * r + r * d_out)),
            Row("d(x A^T)", 2 * t * r * d_out, b * (2 * t * d_out + r * d_out + t * r)),
            Row("dA", 2 * t * r * d_in, b * (t * r + t * d_in + r * d_in)),
            Row("dx, add", 2 * t * r * d_in, b * (t * r + r * d_in + 4 * t * d_in))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--features", type=int, default=2048)
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    args = parser.parse_args()
    peak_flops, peak_bytes = GPUS[args.gpu]
    print(f"{args.gpu.upper()} roofline: {peak_flops / 1e12:.0f} TFLOP/s bf16, "
          f"{peak_bytes / 1e12:.2f} TB/s; T = {args.tokens}, in = out = {args.features}, "
          f"bf16\n")
    for case in LAYER_CASES:
        base, rows = plan_rows(case, args.tokens, args.features)
        print(f"{'case':9s} {'op':34s} {'GFLOP':>8s} {'MB':>8s} {'floor us':>9s}")
        for row in base + rows:
            print(f"{case.name:9s} {row.op:34s} {row.flops / 1e9:8.2f} {row.bytes / 1e6:8.2f} "
                  f"{row.floor_us(peak_flops, peak_bytes):9.2f}")
        base_floor = sum(r.floor_us(peak_flops, peak_bytes) for r in base)
        total = base_floor + sum(r.floor_us(peak_flops, peak_bytes) for r in rows)
        forward = base[0].floor_us(peak_flops, peak_bytes) + sum(
            r.floor_us(peak_flops, peak_bytes) for r in rows[:3])
        peft = base_floor + sum(r.floor_us(peak_flops, peak_bytes)
                                for r in peft_rows(case, args.tokens, args.features))
        print(f"{case.name:9s} fwd+bwd {total:.2f} us = {total / base_floor:.2f} x base; "
              f"forward {forward:.2f} us = "
              f"{forward / base[0].floor_us(peak_flops, peak_bytes):.2f} x base; "
              f"PEFT-style cuBLAS twice {peft:.2f} us = {peft / base_floor:.2f} x base "
              f"({peft / total:.2f} x the plan)\n")


if __name__ == "__main__":
    main()
