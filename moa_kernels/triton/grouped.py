"""Grouped sparse plan: the sparse modes as grouped GEMMs over the active (token, expert)
pairs sorted by expert, chosen with MOA_TRITON_SPARSE=grouped (the default, "masked", runs
the dense GEMMs of expand.py with the inactive pairs masked).

Pair plan (`PairPlan.of(active)`, torch ops): the N active pairs sorted by expert, then by
token (stable: `nonzero` of active^T is row-major); token_index [N], pair_flat [N]
(t * E + e: where a pair's gate gradient goes), offsets [E + 1] (expert e's pairs are
[offsets[e], offsets[e + 1])), and pos [T, k_max] (the pairs of each token in expert order,
-1 past its count: the combine's fixed order). Tiles of BLOCK_M pairs never straddle two
experts (`_tiles`: at most cdiv(N, BLOCK_M) + E tiles, found on the device from the
offsets). Building it reads N and k_max on the host: two host syncs per forward (the
nonzero, and k_max read by int()); the backward reuses the plan and syncs nothing.

The grouped column space (`GroupedLayout`) is in grouped_layout.py and the kernels, with
their grids, tiles, fusion, FLOPs and bytes, in grouped_kernels.py; this file holds the
pair plan, the tile choices and the forward and backward that launch the kernels.

Backward: du/dh/dg (gathered shrink of dy), dx = combine(dh A_g) (pair rows, then combine),
dA_g, db_g (weight-grad of dh and x), dBt_g (weight-grad of u and dy); dg scattered into
[T, E] at unique positions (index_put_, deterministic). Unpacking to the layout's stacked
gradients: hydra heads' rows summed in a fixed order, like plan.unpack_shrink_rows.


torch.compile: the ops are torch.library custom ops (moa::grouped_mixture and its
backward, ops.py) whose fake implementations give the pair buffers data-dependent sizes
(ctx.new_dynamic_size()), so a model traces with fullgraph=True (tested with aot_eager;
inductor ran once by hand on the CPU). The plan itself is meant for eager runs on a GPU:
its two host syncs stay inside the op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from moa_kernels.triton.grouped_kernels import (
    combine_kernel,
    gathered_shrink_kernel,
    pair_rows_kernel,
    pair_weight_grad_kernel,
)
from moa_kernels.triton.grouped_layout import GroupedLayout

SPARSE_PLANS = ("masked", "grouped")
SPARSE_PLAN_VARIABLE = "MOA_TRITON_SPARSE"

BLOCK_M = 64  # pairs per tile
BLOCK_N = 64  # columns of out / in per program (pair rows, combine, weight gradients)
BLOCK_K = 32  # K step of the gathered shrink loops
BLOCK_T = 32  # tokens per combine program
MAX_BLOCK_R = 32  # rank columns per step (see the module docstring)
GRAD_BLOCK_M = 32  # pairs per K step of the weight-gradient dots
PAIRS_PER_SPLIT = 512  # weight gradients: about this many pairs per split of an expert
MAX_SPLITS = 16


def sparse_plan() -> str:
    """The sparse kernel plan chosen by MOA_TRITON_SPARSE ("masked", the default, or
    "grouped"), read at call time (under torch.compile: at trace time, a constant)."""
    value = os.environ.get(SPARSE_PLAN_VARIABLE, "masked") or "masked"
    if value not in SPARSE_PLANS:
        raise ValueError(f"{SPARSE_PLAN_VARIABLE}={value!r}: allowed values are "
                         f"{', '.join(repr(p) for p in SPARSE_PLANS)}")
    return value


# every buffer a kernel writes is allocated by this (tests pre-fill them with NaN: an
# element a kernel forgets to write, and then reads or returns, shows)
_empty = torch.empty


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"



# ---------------------------------------------------------------------------------------
# the pair plan
# ---------------------------------------------------------------------------------------

@dataclass
class PairPlan:
    """The active pairs sorted by expert, then token (see the module docstring)."""

    token_index: torch.Tensor  # [N] int64
    pair_flat: torch.Tensor  # [N] int64: t * E + e
    offsets: torch.Tensor  # [E + 1] int64
    pos: torch.Tensor  # [T, k_max] int64, -1 past a token's count

    @classmethod
    def of(cls, active: torch.Tensor) -> PairPlan:
        """From active [T, E] bool."""
        tokens, experts = active.shape
        counts = active.sum(0)
        per_token = active.sum(1)
        k_max = int(per_token.max()) if tokens else 0
        pairs = active.t().nonzero()  # (expert, token), row-major: by expert, then token
        token_index = pairs[:, 1].contiguous()
        offsets = torch.zeros(experts + 1, dtype=torch.int64, device=active.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        # pair index of (t, e): offsets[e] + (active tokens of e before t)
        pair_id = offsets[:-1][None, :] + active.cumsum(0) - 1
        key = torch.where(active, torch.arange(experts, device=active.device), experts)
        order = torch.sort(key, dim=1, stable=True).indices[:, :k_max]
        chosen = pair_id.gather(1, order)
        pos = torch.where(active.gather(1, order), chosen, -1).contiguous()
        return cls(token_index, token_index * experts + pairs[:, 0], offsets, pos)


def _tiles(offsets: torch.Tensor, pairs: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_expert [n] int32, tile_start [n] int64) for n = cdiv(pairs, block) + E tiles:
    each tile holds up to `block` pairs of one expert; unused tiles get expert E (their
    programs return at once). On the device, from the offsets (no host sync)."""
    experts = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    per_expert = (counts + block - 1) // block
    last = torch.cumsum(per_expert, 0)
    ids = torch.arange(triton.cdiv(pairs, block) + experts, device=offsets.device)
    expert = torch.searchsorted(last, ids, right=True)
    clamped = expert.clamp(max=experts - 1)
    start = offsets[clamped] + (ids - (last[clamped] - per_expert[clamped])) * block
    return expert.to(torch.int32), start


def _block_m(dtype: torch.dtype) -> int:
    """Pairs per tile: 32 in fp32 (its IEEE dots run on the FMA units with operands in
    registers: 64 spilled in the unaligned builds), else BLOCK_M."""
    return 32 if dtype == torch.float32 else BLOCK_M


def _block_n(dtype: torch.dtype) -> int:
    """Columns of out / in per program of the dot kernels: 32 in fp32 (as _block_m), else
    BLOCK_N (the combine, elementwise, keeps BLOCK_N)."""
    return 32 if dtype == torch.float32 else BLOCK_N


def _splits(pairs: int, experts: int) -> int:
    return max(1, min(MAX_SPLITS, triton.cdiv(pairs, experts * PAIRS_PER_SPLIT)))


def _weight_grad_splits(tokens: int, experts: int) -> int:
    """The splits per expert of the weight gradients (the SPLITS constexpr): those of the
    largest pair count T x E, a fixed function of the call's static sizes. Taken from the
    active pair count, it would change with the routing and compile a new kernel at each
    new value during training; an expert has at most T pairs, so chunks of about
    PAIRS_PER_SPLIT pairs each are what the busiest expert can need."""
    return _splits(tokens * experts, experts)


def _block_r(meta: GroupedLayout) -> int:
    return max(16, min(MAX_BLOCK_R, triton.next_power_of_2(meta.w_max)))


def _dot_options(dtype: torch.dtype) -> dict:
    """fp32: IEEE dots (no TF32); bf16 under the interpreter: fp32 dots (triton 3.9's
    interpreter computes bf16 dots wrongly; compiled kernels use bf16 tensor cores)."""
    return {"IEEE": dtype == torch.float32,
            "UPCAST": dtype == torch.bfloat16 and _interpreted()}


# ---------------------------------------------------------------------------------------
# forward and backward
# ---------------------------------------------------------------------------------------

def grouped_forward(y: torch.Tensor, x: torch.Tensor, gates: torch.Tensor, active: torch.Tensor,
                    shrink_weight: torch.Tensor, full_bias: torch.Tensor | None,
                    expand_weight: torch.Tensor, expand_bias: torch.Tensor,
                    meta: GroupedLayout) -> tuple[torch.Tensor, ...]:
    """out = y + sum over active pairs of g_e delta_e(x).

    Args: y [T, out] (x's dtype), x [T, in] the adapters' input, gates [T, E], active
    [T, E] bool, the stacked expert tensors (any float dtype: packed in x's dtype) and
    full_bias [R] or None.
    Returns out [T, out] (new), and for the backward: token_index, pair_flat, offsets,
    pos (the PairPlan), H [N, w_max] fp32, U [N, w_max] in x's dtype.
    """
    plan = PairPlan.of(active)
    pairs = plan.token_index.numel()
    dtype = x.dtype
    h = _empty(pairs, meta.w_max, device=x.device, dtype=torch.float32)
    u = _empty(pairs, meta.w_max, device=x.device, dtype=dtype)
    if pairs == 0:
        return (y.clone(), plan.token_index, plan.pair_flat, plan.offsets, plan.pos, h, u)
    a_g = meta.pack_shrink(shrink_weight, dtype)
    b_g = meta.pack_bias(full_bias, x)
    bt_g = meta.pack_expand(expand_weight, expand_bias, dtype)
    tile_expert, tile_start = _tiles(plan.offsets, pairs, _block_m(dtype))
    gates = gates.contiguous()
    _launch_gathered(meta, tile_expert, tile_start, plan, x, a_g, b_g, gates, h, u, None)
    rows = _pair_rows(meta, tile_expert, tile_start, plan, u, bt_g)
    out = _combine(plan, rows, y)
    return out, plan.token_index, plan.pair_flat, plan.offsets, plan.pos, h, u


def grouped_backward(grad: torch.Tensor, x: torch.Tensor, gates: torch.Tensor,
                     token_index: torch.Tensor, pair_flat: torch.Tensor,
                     offsets: torch.Tensor, pos: torch.Tensor, h: torch.Tensor,
                     u: torch.Tensor, shrink_weight: torch.Tensor,
                     expand_weight: torch.Tensor, expand_bias: torch.Tensor,
                     meta: GroupedLayout, need: list[bool]) -> list[torch.Tensor | None]:
    """Gradients of grouped_forward's out from grad [T, out] (y's gradient is grad itself).

    need: which of (x, gates, shrink_weight, full_bias, expand_weight, expand_bias) need a
    gradient. Returns them in that order (None where not needed): dx in x's dtype, d gates
    [T, E] fp32 (0 on inactive pairs), the weights' in their tensors' dtypes, the bias's
    fp32.
    """
    need_x, need_g, need_w, need_b, need_ew, need_eb = need
    plan = PairPlan(token_index, pair_flat, offsets, pos)
    tokens, pairs, dtype = x.shape[0], token_index.numel(), x.dtype
    result: list[torch.Tensor | None] = [None] * 6
    grad = grad.to(dtype).contiguous()
    if pairs == 0:
        zeros = [x.new_zeros(x.shape), gates.new_zeros(gates.shape, dtype=torch.float32),
                 torch.zeros_like(shrink_weight), x.new_zeros(meta.rows, dtype=torch.float32),
                 torch.zeros_like(expand_weight), torch.zeros_like(expand_bias)]
        return [z if n else None for z, n in zip(zeros, need)]
    tile_expert, tile_start = _tiles(offsets, pairs, _block_m(dtype))
    bt_g = meta.pack_expand(expand_weight, expand_bias, dtype)
    dh = _empty(pairs, meta.w_max, device=x.device, dtype=dtype)
    dg_pairs = _empty(pairs, device=x.device, dtype=torch.float32)
    _launch_gathered(meta, tile_expert, tile_start, plan, grad, bt_g, None, gates, h, dh,
                     dg_pairs)
    if need_g:
        dg = torch.zeros(tokens * meta.num_experts, device=x.device, dtype=torch.float32)
        dg[pair_flat] = dg_pairs  # unique positions: deterministic
        result[1] = dg.view(tokens, meta.num_experts)
    if need_x:
        a_g = meta.pack_shrink(shrink_weight, dtype)
        rows = _pair_rows(meta, tile_expert, tile_start, plan, dh, a_g)
        result[0] = _combine(plan, rows, None)
    if need_w or need_b:
        grad_a, grad_b = _weight_grad(meta, plan, dh, x, with_bias=True)
        if need_w:
            result[2] = meta.unpack_rows(grad_a).to(shrink_weight.dtype)
        if need_b:
            result[3] = meta.unpack_rows(grad_b)
    if need_ew or need_eb:
        grad_bt, _ = _weight_grad(meta, plan, u, grad, with_bias=False)
        weight, bias = meta.unpack_expand(grad_bt)
        result[4] = weight.to(expand_weight.dtype) if need_ew else None
        result[5] = bias.to(expand_bias.dtype) if need_eb else None
    return result


def _launch_gathered(meta, tile_expert, tile_start, plan, source, weight, bias, gates, h,
                     target, dg_pairs):
    """Forward (dg_pairs None): h, u from x rows. Backward: dh, dg from dy rows."""
    backward = dg_pairs is not None
    width = source.shape[1]
    gathered_shrink_kernel[(tile_expert.numel(),)](
        source, weight, bias if bias is not None else h, gates, plan.token_index,
        plan.offsets, tile_expert, tile_start, meta.offset, meta.rank, meta.widths,
        meta.has_bias, meta.activation, meta.scale, h, target,
        dg_pairs if backward else h, meta.num_experts, width, source.stride(0),
        weight.stride(0), gates.stride(0), h.stride(0), target.stride(0),
        BACKWARD=backward, ANY_ACT=meta.any_activation, BLOCK_M=_block_m(source.dtype),
        BLOCK_K=BLOCK_K,
        BLOCK_R=_block_r(meta), **_dot_options(source.dtype))


def _pair_rows(meta, tile_expert, tile_start, plan, rows, weight) -> torch.Tensor:
    """P [N, D] = rows_p W_e over each pair's expert rows of weight [W, D]."""
    pairs, columns = rows.shape[0], weight.shape[1]
    out = _empty(pairs, columns, device=rows.device, dtype=rows.dtype)
    block_n = _block_n(rows.dtype)
    grid = (tile_expert.numel(), triton.cdiv(columns, block_n))
    pair_rows_kernel[grid](
        rows, weight, out, plan.offsets, tile_expert, tile_start, meta.offset, meta.widths,
        meta.num_experts, columns, rows.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=_block_m(rows.dtype), BLOCK_N=block_n, BLOCK_R=_block_r(meta),
        **_dot_options(rows.dtype))
    return out


def _combine(plan: PairPlan, rows: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """out[t] = y[t] (or 0) + sum_j rows[pos[t, j]], in rows' dtype."""
    tokens, k_max = plan.pos.shape
    columns = rows.shape[1]
    out = _empty(tokens, columns, device=rows.device, dtype=rows.dtype)
    if tokens:
        grid = (triton.cdiv(tokens, BLOCK_T), triton.cdiv(columns, BLOCK_N))
        combine_kernel[grid](
            rows, plan.pos, y if y is not None else out, out, tokens, columns, k_max,
            rows.stride(0), plan.pos.stride(0), y.stride(0) if y is not None else 0,
            out.stride(0), HAS_BASE=y is not None, BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N)
    return out


def _weight_grad(meta, plan, rows, data, *, with_bias: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum over each expert's pairs of rows_p^T data[t_p] [W, D] fp32, and with_bias the
    column sums of rows [W] fp32): split partials, then a fixed-order sum."""
    columns = data.shape[1]
    splits = _weight_grad_splits(data.shape[0], meta.num_experts)
    partial = _empty(splits, meta.width, columns, device=rows.device,
                          dtype=torch.float32)
    partial_bias = _empty(splits, meta.width, device=rows.device, dtype=torch.float32) \
        if with_bias else partial
    block_n = _block_n(rows.dtype)
    grid = (meta.num_experts, splits, triton.cdiv(columns, block_n))
    pair_weight_grad_kernel[grid](
        rows, data, partial, partial_bias, plan.token_index, plan.offsets, meta.offset,
        meta.widths, columns, rows.stride(0), data.stride(0), partial.stride(0),
        partial.stride(1), partial_bias.stride(0), SPLITS=splits, WITH_BIAS=with_bias,
        BLOCK_M=GRAD_BLOCK_M, BLOCK_N=block_n, BLOCK_R=_block_r(meta),
        **_dot_options(rows.dtype))
    return partial.sum(0), partial_bias.sum(0) if with_bias else None
