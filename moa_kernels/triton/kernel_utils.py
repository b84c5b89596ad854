"""Small helpers shared by the kernels: the adapter activations (and their derivatives)
over the packed column ranges, and tile choices on the host side.

Activations (moa_kernels.activations' table): the packed column space (plan.py) orders the
expert columns as COLUMN_ORDER, identity | silu | gelu | relu, so each activation covers one
column range given as constexprs (`SILU`, `GELU`, `RELU`: the first column of each class; a
class is empty when its start equals the next one's). The kernels walk the columns in
blocks whose start is a constexpr too, so each block evaluates only the activations whose
range meets it, with no select where one class covers the whole block: a LoRA-only block
is the identity.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moa_kernels.activations import GELU, IDENTITY, RELU, SILU, Activation

# The order of the packed expert columns: the activations `activate` evaluates, identity
# first, then those of its SILU, GELU, RELU constexprs (each the start of its range).
COLUMN_ORDER: tuple[Activation, ...] = (IDENTITY, SILU, GELU, RELU)

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Token rows per program of the gate kernels: they are elementwise over [T, k_width] tiles
# (no tensor-core work), so the tile only has to give each thread a few 16-byte loads; 32
# rows x 64 columns is 16 fp32 values per thread at 4 warps. Retune on a GPU with do_bench.
BLOCK_T = 32
# Column tile of the gate kernels (a power of two; k_width is a multiple of 16).
MAX_BLOCK_COLUMNS = 64


_OUT_DTYPE_AVAILABLE: dict[torch.device, bool] = {}


def mm_fp32(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
            ) -> torch.Tensor:
    """a @ b (+ bias) [M, N] in fp32 from fp16 / bf16 (or fp32) operands, accumulated in
    fp32 and never rounded to the operands' dtype: cuBLAS's fp32-output GEMM
    (`out_dtype`, CUDA) where this torch has it, else the operands cast to fp32 (the CPU
    and the interpreter; on a GPU a fallback that copies the operands).

    Whether the device has the fp32-output GEMM at all is probed once per device; a call
    it refuses (a shape or layout cuBLAS does not take) falls back for that call only, so
    one odd GEMM does not send every later one on the device to the slow path."""
    if a.dtype == torch.float32:
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    if out_dtype_available(a.device):
        try:
            out = mm_out_fp32(a, b)
            return out if bias is None else out.add_(bias)
        except (TypeError, RuntimeError, NotImplementedError):
            pass  # this call's shape or layout: the fallback below
    out = torch.mm(a.float(), b.float())
    return out if bias is None else out.add_(bias)


def mm_out_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.mm with an fp32 output from fp16 / bf16 operands (raises where the device or
    this call's shape or layout does not have it)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def out_dtype_available(device: torch.device) -> bool:
    """Whether torch.mm(..., out_dtype=torch.float32) runs on device (CUDA only; probed
    once per device on a 16 x 16 bf16 GEMM)."""
    if device.type != "cuda":
        return False
    if device not in _OUT_DTYPE_AVAILABLE:
        try:
            probe = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
            works = mm_out_fp32(probe, probe).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            works = False
        _OUT_DTYPE_AVAILABLE[device] = works
    return _OUT_DTYPE_AVAILABLE[device]


def align16(n: int) -> int:
    """n rounded up to a multiple of 16 (16 elements: 16-byte aligned rows in every dtype,
    and the K granularity of the tensor cores)."""
    return -(-int(n) // 16) * 16


def block_columns(width: int) -> int:
    """The column tile for a packed width (a power of two, 16 to MAX_BLOCK_COLUMNS)."""
    return max(16, min(MAX_BLOCK_COLUMNS, triton.next_power_of_2(max(int(width), 1))))


@triton.jit
def _select(a, value, cols, LO: tl.constexpr, HI: tl.constexpr, C0: tl.constexpr,
            BLOCK: tl.constexpr):
    """value on the columns [LO, HI) of the block [C0, C0 + BLOCK), a elsewhere."""
    if (LO <= C0) & (HI >= C0 + BLOCK):
        out = value
    else:
        out = tl.where(((cols >= LO) & (cols < HI))[None, :], value, a)
    return out


@triton.jit
def activate(h, cols, C0: tl.constexpr, BLOCK: tl.constexpr, SILU: tl.constexpr,
             GELU: tl.constexpr, RELU: tl.constexpr, STOP: tl.constexpr):
    """act(h) for an fp32 tile h [M, BLOCK] of the packed columns cols = C0 + arange(BLOCK):
    identity below SILU, silu in [SILU, GELU), gelu in [GELU, RELU), relu in [RELU, STOP).
    Only the classes that meet this block are evaluated (all constexpr)."""
    a = h
    if (SILU < GELU) & (SILU < C0 + BLOCK) & (GELU > C0):
        a = _select(a, h * tl.sigmoid(h), cols, SILU, GELU, C0, BLOCK)
    if (GELU < RELU) & (GELU < C0 + BLOCK) & (RELU > C0):
        a = _select(a, 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476)), cols, GELU,
                    RELU, C0, BLOCK)
    if (RELU < STOP) & (RELU < C0 + BLOCK) & (STOP > C0):
        a = _select(a, tl.maximum(h, 0.0), cols, RELU, STOP, C0, BLOCK)
    return a


@triton.jit
def activate_grad(h, cols, C0: tl.constexpr, BLOCK: tl.constexpr, SILU: tl.constexpr,
                  GELU: tl.constexpr, RELU: tl.constexpr, STOP: tl.constexpr):
    """d act(h) / d h over the same ranges (relu: 0 at h = 0, as torch)."""
    d = tl.full(h.shape, 1.0, tl.float32)
    if (SILU < GELU) & (SILU < C0 + BLOCK) & (GELU > C0):
        sig = tl.sigmoid(h)
        d = _select(d, sig * (1.0 + h * (1.0 - sig)), cols, SILU, GELU, C0, BLOCK)
    if (GELU < RELU) & (GELU < C0 + BLOCK) & (RELU > C0):
        dgelu = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476)) + \
            h * tl.exp(-0.5 * h * h) * 0.3989422804014327
        d = _select(d, dgelu, cols, GELU, RELU, C0, BLOCK)
    if (RELU < STOP) & (RELU < C0 + BLOCK) & (STOP > C0):
        d = _select(d, tl.where(h > 0.0, 1.0, 0.0), cols, RELU, STOP, C0, BLOCK)
    return d
