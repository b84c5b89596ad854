"""Sparse (grouped) shrink over a routing plan: h[t, rows_g] = x[t] @ W_g^T + b_g for the
active (token, group) pairs only, and its backward.

Forward `_grouped_shrink_kernel`:
  grid (G * cdiv(T, BLOCK_M), cdiv(max_rank, BLOCK_R)); program (g, tile, rank chunk)
  takes pairs [offsets[g] + tile * BLOCK_M, ...) of group g, gathers their x rows inside
  the loads (token_index; no gathered copy of x), walks `in` in BLOCK_K steps and stores
  h + bias into the token-major H [T, R] (fp32, zero where a pair is inactive, so the
  shared expand kernel reads it like the dense h). Tiles past a group's count and rank
  chunks past its rank exit at once: the grid is sized without a host sync.
Backward:
  dW, db `_grouped_weight_grad_kernel`: grid (G, cdiv(max_rank, BLOCK_R), cdiv(in, BLOCK_K));
  each program loops over its group's active pairs (gathered dh and x rows) and owns its
  [BLOCK_R, BLOCK_K] block of dW exclusively: deterministic, no atomics. db rides along in
  the programs of the first in-block.
  dx: the segmented token-major GEMM of expand.py, dx[t] = sum over groups g active on
  some token of the tile of dH[t, rows_g] @ W_g (tiles with no active token skip g).
FLOPs and bytes per call (N_g active (token, group) pairs, r_g ranks, b bytes/element):
  forward: 2 in sum_g N_g r_g FLOPs; b (in sum_g N_g + R in) + 4 sum_g N_g r_g bytes
  dW, db:  2 in sum_g N_g r_g FLOPs; same bytes, plus b R in written
  dx:      2 in R T_act FLOPs (T_act: tokens in tiles where the group is active)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moa_kernels.triton.expand import segmented_matmul
from moa_kernels.triton.kernel_utils import BLOCK_R, block, dot_dtype, precision
from moa_kernels.triton.plan import PairList

BLOCK_M_PAIRS = 32  # pairs per tile; small so that a sparse expert wastes little of a tile


def grouped_shrink_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           pairs: PairList, group_meta: torch.Tensor,
                           max_rank: int) -> torch.Tensor:
    """H [T, R] fp32: x @ weight^T + bias on active (token, group) pairs, 0 elsewhere.

    Args:
        x: [T, in]; weight: [R, in]; bias: [R] (zeros for rows without a bias).
        pairs: the plan over shrink groups; group_meta: [G, 8] int32 (see plan.py).
    """
    tokens, features = x.shape
    groups = group_meta.shape[0]
    out = torch.zeros(tokens, weight.shape[0], device=x.device, dtype=torch.float32)
    if tokens == 0:
        return out
    tiles = triton.cdiv(tokens, BLOCK_M_PAIRS)
    grid = (groups * tiles, triton.cdiv(max_rank, BLOCK_R))
    _grouped_shrink_kernel[grid](
        x, weight, bias, out, pairs.token_index, pairs.offsets, group_meta, features, tiles,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        BLOCK_M=BLOCK_M_PAIRS, BLOCK_R=BLOCK_R, BLOCK_K=block(features),
        DOT_DTYPE=dot_dtype(x.dtype), PRECISION=precision(x.dtype))
    return out


def grouped_shrink_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            pairs: PairList, group_meta: torch.Tensor, max_rank: int,
                            need_x: bool, need_weight: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of grouped_shrink_forward from grad [T, R] fp32 (0 on inactive pairs).

    Returns dx [T, in] (x.dtype), dW [R, in] (weight.dtype), db [R] fp32; empty tensors
    for gradients not needed.
    """
    tokens, features = x.shape
    dx = x.new_empty(0)
    if need_x:
        dx = segmented_matmul(grad, weight, group_meta, pairs.active, out_dtype=x.dtype,
                              data_dtype=x.dtype)
    dw, db = weight.new_empty(0), grad.new_empty(0)
    if need_weight:
        dw = torch.empty_like(weight)
        db = torch.empty(weight.shape[0], device=x.device, dtype=torch.float32)
        block_k = block(features)
        grid = (group_meta.shape[0], triton.cdiv(max_rank, BLOCK_R),
                triton.cdiv(features, block_k))
        _grouped_weight_grad_kernel[grid](
            grad, x, dw, db, pairs.token_index, pairs.offsets, group_meta, features,
            grad.stride(0), x.stride(0), x.stride(1), dw.stride(0), dw.stride(1),
            BLOCK_M=BLOCK_M_PAIRS, BLOCK_R=BLOCK_R, BLOCK_K=block_k,
            DOT_DTYPE=dot_dtype(x.dtype), PRECISION=precision(x.dtype))
    return dx, dw, db


# ---------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------

@triton.jit
def _grouped_shrink_kernel(x_ptr, w_ptr, bias_ptr, h_ptr, token_ptr, offsets_ptr, meta_ptr,
                           K, tiles, stride_xm, stride_xk, stride_wr, stride_wk, stride_hm,
                           BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                           PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    group = pid // tiles
    tile = pid % tiles
    chunk = tl.program_id(1)
    pair_start = tl.load(offsets_ptr + group) + tile * BLOCK_M
    pair_stop = tl.load(offsets_ptr + group + 1)
    row_start = tl.load(meta_ptr + group * 8)
    row_stop = tl.load(meta_ptr + group * 8 + 1)
    if (pair_start >= pair_stop) | (row_start + chunk * BLOCK_R >= row_stop):
        return
    pairs = pair_start + tl.arange(0, BLOCK_M)
    mask_m = pairs < pair_stop
    tokens = tl.load(token_ptr + pairs, mask=mask_m, other=0).to(tl.int64)
    rows = row_start + chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < row_stop
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xs = tl.load(x_ptr + tokens[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        ws = tl.load(w_ptr + rows.to(tl.int64)[None, :] * stride_wr +
                     offs_k[:, None] * stride_wk, mask=mask_k[:, None] & mask_r[None, :],
                     other=0.0)
        acc = tl.dot(xs.to(DOT_DTYPE), ws.to(DOT_DTYPE), acc, input_precision=PRECISION)
    acc += tl.load(bias_ptr + rows, mask=mask_r, other=0.0).to(tl.float32)[None, :]
    tl.store(h_ptr + tokens[:, None] * stride_hm + rows[None, :], acc,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _grouped_weight_grad_kernel(dh_ptr, x_ptr, dw_ptr, db_ptr, token_ptr, offsets_ptr,
                                meta_ptr, K, stride_dhm, stride_xm, stride_xk, stride_wr,
                                stride_wk, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
                                PRECISION: tl.constexpr):
    group = tl.program_id(0)
    chunk = tl.program_id(1)
    pid_k = tl.program_id(2)
    row_start = tl.load(meta_ptr + group * 8)
    row_stop = tl.load(meta_ptr + group * 8 + 1)
    if row_start + chunk * BLOCK_R >= row_stop:
        return
    pair_start = tl.load(offsets_ptr + group)
    pair_stop = tl.load(offsets_ptr + group + 1)
    rows = row_start + chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < row_stop
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for p0 in range(pair_start, pair_stop, BLOCK_M):
        pairs = p0 + tl.arange(0, BLOCK_M)
        mask_m = pairs < pair_stop
        tokens = tl.load(token_ptr + pairs, mask=mask_m, other=0).to(tl.int64)
        dh = tl.load(dh_ptr + tokens[:, None] * stride_dhm + rows[None, :],
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        xs = tl.load(x_ptr + tokens[:, None] * stride_xm +
                     offs_k.to(tl.int64)[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        bias_acc += tl.sum(dh, axis=0)
        acc = tl.dot(tl.trans(dh).to(DOT_DTYPE), xs.to(DOT_DTYPE), acc,
                     input_precision=PRECISION)
    tl.store(dw_ptr + rows.to(tl.int64)[:, None] * stride_wr + offs_k[None, :] * stride_wk,
             acc.to(dw_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_k[None, :])
    if pid_k == 0:
        tl.store(db_ptr + rows, bias_acc, mask=mask_r)
