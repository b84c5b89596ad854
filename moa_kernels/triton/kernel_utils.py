"""Small helpers shared by every kernel family: dtype and tile choices on the host side,
and the adapter activations (with their derivatives) as jit functions.

Activation codes (int32, per expert or per shrink group, read from the layout metadata):
0 identity, 1 silu, 2 gelu (exact, erf form, as F.gelu), 3 relu. The kernels pick the
activation with `tl.where` on a runtime code, so one compiled kernel serves every layout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATION_CODES = {"identity": 0, "silu": 1, "gelu": 2, "relu": 3}

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Tile edges are clamped to [16, 64]: 16 is the smallest edge tl.dot accepts, 64 keeps a
# fp32 [64, 64] accumulator in registers at 4 warps. Retune on a GPU with do_bench.
MIN_BLOCK, MAX_BLOCK = 16, 64

# Rank chunk: the ragged rank dimension is walked in chunks of this many rows, so an
# expert of rank r costs ceil(r / BLOCK_R) chunks, never the largest rank of the layer.
BLOCK_R = 32


def block(dim: int, high: int = MAX_BLOCK) -> int:
    """A power-of-two tile edge covering `dim`, clamped to [MIN_BLOCK, high]."""
    return max(MIN_BLOCK, min(high, triton.next_power_of_2(max(int(dim), 1))))


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The tl dtype both operands of tl.dot are cast to (the data dtype; fp32 accumulates)."""
    return TL_DTYPES[dtype]


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 unless the user allowed TF32 for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@triton.jit
def activate(h, code):
    """act(h) for an fp32 tile h and a scalar activation code."""
    silu = h * tl.sigmoid(h)
    gelu = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    relu = tl.maximum(h, 0.0)
    return tl.where(code == 1, silu, tl.where(code == 2, gelu, tl.where(code == 3, relu, h)))


@triton.jit
def activate_grad(h, code):
    """d act(h) / d h for an fp32 tile h (relu: 0 at h = 0, as torch)."""
    sig = tl.sigmoid(h)
    dsilu = sig * (1.0 + h * (1.0 - sig))
    dgelu = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + \
        h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    drelu = tl.where(h > 0.0, 1.0, 0.0)
    return tl.where(code == 1, dsilu, tl.where(code == 2, dgelu,
                                               tl.where(code == 3, drelu, 1.0)))
