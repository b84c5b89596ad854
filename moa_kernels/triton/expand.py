"""Gated expand: y_out = y + sum_e (g_e * s_e * act(h[:, rows_e])) @ B_e^T + g_ad * b_up,
and its backward. Also the plain segmented GEMM that the sparse shrink's dx reuses.

Why the gating is here and not in the shrink epilogue: the router's first layer is computed
by the same shrink GEMM as the experts' A x, so the gates exist only after it. The expand
kernel therefore applies activation, gate and scaling in its operand prologue
(from the fp32 pre-activation h, which the backward needs anyway), so no activated copy
of h is stored.

Forward `_segmented_kernel` (GATED=True), token-major:
  grid (cdiv(T, BLOCK_M), cdiv(out, BLOCK_N)). K loop over experts e, then over e's ragged
  expand columns [col_start_e, col_stop_e) in BLOCK_K steps: load h[t, row_start_e + j]
  (hydra heads read their shared rows), u = act(h) * g[t, e] * s_e, acc += u @ B[:, cols]^T;
  then acc += g[t, e] * b_up[adapter_e]. Epilogue: out = y + acc, one read and one write
  of the [T, out] tile. Sparse (ACTIVE mask given): an expert with no active token in the
  tile is skipped; inactive rows of an active tile are zeroed. The combine over experts is
  this fixed-order register sum: deterministic, no atomics, no [N, out] buffer.
  With GATED=False the same kernel is dx = sum_g dH[:, rows_g] @ W_g (sparse shrink).
Backward:
  `_expand_grad_kernel` grid (G, cdiv(T, BLOCK_M)): per token tile and shrink group, per
  rank chunk, per expert of the group: du = dy @ B[:, cols] (loop over out), then
  dg[t, e] += s_e <du, act(h)> (+ <dy, b_up> for adapters) = <delta_e(x_t), dy_t>, and
  dH = act'(h) * sum_e du * g * s (hydra heads summed in registers). act is recomputed
  from h. Each program owns its dg entries and dH block: deterministic.
  `_expand_weight_grad_kernel` grid (E, cdiv(out, BLOCK_N), cdiv(max_rank, BLOCK_R)):
  dB[:, cols_e] = dy^T u_e and db_up = dy^T g_e, looping over all tokens (dense) or over
  e's active pairs from the plan (sparse, rows gathered in the loads).
  Nothing of size [T, E, out] is ever formed.
FLOPs and bytes per call (C expand columns, A adapters, b bytes/element, h fp32):
  forward:          2 T C out + 2 T A out FLOPs; 2 b T out + 4 T R + b C out bytes
  dh, dg:           2 T C out FLOPs (+2 T A out); b T out x (rank chunks) + 8 T R bytes
  dB, db_up:        2 T C out FLOPs; b T out x (rank chunks) + 4 T R + b C out bytes
  (sparse: T becomes the active pairs per expert, at tile granularity in the forward)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moa_kernels.triton.kernel_utils import (
    BLOCK_R,
    activate,
    activate_grad,
    block,
    dot_dtype,
    precision,
)


def segmented_matmul(lhs: torch.Tensor, rhs: torch.Tensor, segments: torch.Tensor,
                     active: torch.Tensor | None, *, out_dtype: torch.dtype,
                     data_dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum_s lhs[t, lhs_start_s + j] @ rhs[rhs_start_s + j], j < len_s.

    Args:
        lhs: [T, L] fp32; rhs: [K, N]; segments: [S, 8] int32 (rhs_start, rhs_stop,
        lhs_start, ...); active: [T, S] int8 (sparse tile skipping) or None.
    Returns:
        [T, N] out_dtype.
    """
    tokens, n = lhs.shape[0], rhs.shape[1]
    out = torch.empty(tokens, n, device=lhs.device, dtype=out_dtype)
    if tokens == 0 or n == 0:
        return out
    _launch_segmented(lhs, rhs, rhs.stride(0), rhs.stride(1), out, out, segments, active,
                      None, None, None, gated=False, data_dtype=data_dtype)
    return out


def gated_expand_forward(y: torch.Tensor, hidden: torch.Tensor, gates: torch.Tensor,
                         expand_weight: torch.Tensor, expand_bias: torch.Tensor,
                         expert_meta: torch.Tensor, expert_scale: torch.Tensor,
                         active: torch.Tensor | None) -> torch.Tensor:
    """y + sum_e g_e delta_e, with delta_e read from the pre-activation hidden.

    Args:
        y: [T, out] base output; hidden: [T, >= R] fp32 pre-activation (+ bias) shrink
        output; gates: [T, E]; expand_weight: [out, C]; expand_bias: [N_ad, out];
        expert_meta: [E, 8] int32; expert_scale: [E] fp32; active: [T, E] int8 or None.
    Returns:
        [T, out] in y's dtype (a new tensor: y is read once in the epilogue).
    """
    out = torch.empty_like(y)
    if y.shape[0] == 0 or y.shape[1] == 0:
        return out
    _launch_segmented(hidden, expand_weight, expand_weight.stride(1), expand_weight.stride(0),
                      y, out, expert_meta, active, gates, expert_scale, expand_bias,
                      gated=True, data_dtype=expand_weight.dtype)
    return out


def gated_expand_backward(grad: torch.Tensor, hidden: torch.Tensor, gates: torch.Tensor,
                          expand_weight: torch.Tensor, expand_bias: torch.Tensor,
                          expert_meta: torch.Tensor, expert_scale: torch.Tensor,
                          group_meta: torch.Tensor, max_rank: int,
                          active: torch.Tensor | None, token_index: torch.Tensor | None,
                          offsets: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of gated_expand_forward from grad [T, out] (the y gradient is grad).

    Returns d hidden [T, R] fp32 (pre-activation), d gates [T, E] fp32, d expand_weight
    [out, C] and d expand_bias [N_ad, out] in their dtypes. Sparse (active, token_index
    [>= N] int32 and offsets [E + 1] int64 of the expert plan given): inactive pairs get
    zero gradients and the weight gradients loop over active pairs only.
    """
    tokens, features = grad.shape
    rows = hidden.shape[1]
    experts = expert_meta.shape[0]
    grad_hidden = torch.zeros(tokens, rows, device=grad.device, dtype=torch.float32)
    grad_gates = torch.zeros(tokens, experts, device=grad.device, dtype=torch.float32)
    grad_weight = torch.empty_like(expand_weight)
    grad_bias = torch.zeros(expand_bias.shape, device=grad.device, dtype=expand_bias.dtype)
    sparse = active is not None
    data_dtype = expand_weight.dtype
    if tokens == 0:
        grad_weight.zero_()
        return grad_hidden, grad_gates, grad_weight, grad_bias
    block_m, block_n = block(tokens), block(features)
    bias_arg = expand_bias if expand_bias.numel() else grad_weight
    # groups on the fast grid axis: the programs of one token tile run together, so the
    # re-reads of its dy tile (one per expert and rank chunk) mostly hit L2
    _expand_grad_kernel[(group_meta.shape[0], triton.cdiv(tokens, block_m))](
        grad, hidden, gates, expand_weight, bias_arg, grad_hidden, grad_gates,
        active if sparse else gates, expert_meta, expert_scale, group_meta, tokens, features,
        grad.stride(0), grad.stride(1), hidden.stride(0), gates.stride(0),
        expand_weight.stride(0), expand_weight.stride(1), expand_bias.stride(0) or 1,
        grad_hidden.stride(0), SPARSE=sparse, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_R=BLOCK_R, DOT_DTYPE=dot_dtype(data_dtype), PRECISION=precision(data_dtype))
    block_m = block(tokens, 32) if sparse else block(tokens)
    grid = (experts, triton.cdiv(features, block_n), triton.cdiv(max_rank, BLOCK_R))
    _expand_weight_grad_kernel[grid](
        grad, hidden, gates, grad_weight, grad_bias if expand_bias.numel() else grad_weight,
        token_index if sparse else grad, offsets if sparse else grad, expert_meta,
        expert_scale, tokens, features, grad.stride(0), grad.stride(1), hidden.stride(0),
        gates.stride(0), grad_weight.stride(0), grad_weight.stride(1),
        grad_bias.stride(0) if expand_bias.numel() else 1, SPARSE=sparse,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=BLOCK_R, DOT_DTYPE=dot_dtype(data_dtype),
        PRECISION=precision(data_dtype))
    return grad_hidden, grad_gates, grad_weight, grad_bias


def _launch_segmented(lhs, rhs, stride_rk, stride_rn, base, out, segments, active, gates,
                      scale, up_bias, *, gated, data_dtype):
    tokens, features = out.shape
    block_m, block_n = block(tokens), block(features)
    has_up_bias = gated and up_bias is not None and up_bias.numel() > 0
    grid = (triton.cdiv(tokens, block_m), triton.cdiv(features, block_n))
    _segmented_kernel[grid](
        lhs, rhs, base, out, gates if gated else lhs, active if active is not None else lhs,
        scale if gated else lhs, segments, up_bias if has_up_bias else lhs,
        tokens, features, segments.shape[0],
        lhs.stride(0), lhs.stride(1), stride_rk, stride_rn, base.stride(0), out.stride(0),
        gates.stride(0) if gated else 0, active.stride(0) if active is not None else 0,
        up_bias.stride(0) if has_up_bias else 0,
        GATED=gated, HAS_BASE=gated, SPARSE=active is not None, HAS_UP_BIAS=has_up_bias,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_R, DOT_DTYPE=dot_dtype(data_dtype),
        PRECISION=precision(data_dtype))


# ---------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------

@triton.jit
def _segmented_kernel(lhs_ptr, rhs_ptr, base_ptr, out_ptr, gates_ptr, active_ptr, scale_ptr,
                      meta_ptr, up_bias_ptr, M, N, num_segments, stride_lm, stride_lk,
                      stride_rk, stride_rn, stride_bm, stride_om, stride_gm, stride_am,
                      stride_ub, GATED: tl.constexpr, HAS_BASE: tl.constexpr,
                      SPARSE: tl.constexpr, HAS_UP_BIAS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows_m = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(num_segments):
        k_start = tl.load(meta_ptr + s * 8)
        k_stop = tl.load(meta_ptr + s * 8 + 1)
        lhs_start = tl.load(meta_ptr + s * 8 + 2)
        run = k_start < k_stop
        keep = mask_m
        if SPARSE:
            flags = tl.load(active_ptr + rows_m * stride_am + s, mask=mask_m, other=0)
            keep = mask_m & (flags != 0)
            run = run & (tl.max(keep.to(tl.int32), axis=0) > 0)
        if run:
            if GATED:
                code = tl.load(meta_ptr + s * 8 + 3)
                gate = tl.load(gates_ptr + rows_m * stride_gm + s, mask=keep,
                               other=0.0).to(tl.float32)
                weight = gate * tl.load(scale_ptr + s)
            for k0 in range(k_start, k_stop, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < k_stop
                lhs = tl.load(lhs_ptr + rows_m[:, None] * stride_lm +
                              (lhs_start + offs_k - k_start)[None, :] * stride_lk,
                              mask=keep[:, None] & mask_k[None, :], other=0.0)
                lhs = lhs.to(tl.float32)
                if GATED:
                    lhs = tl.where(mask_k[None, :], activate(lhs, code) * weight[:, None], 0.0)
                rhs = tl.load(rhs_ptr + offs_k.to(tl.int64)[:, None] * stride_rk +
                              offs_n.to(tl.int64)[None, :] * stride_rn,
                              mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(lhs.to(DOT_DTYPE), rhs.to(DOT_DTYPE), acc,
                             input_precision=PRECISION)
            if HAS_UP_BIAS:
                adapter = tl.load(meta_ptr + s * 8 + 4)
                if adapter >= 0:
                    up = tl.load(up_bias_ptr + adapter.to(tl.int64) * stride_ub + offs_n,
                                 mask=mask_n, other=0.0).to(tl.float32)
                    acc += gate[:, None] * up[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BASE:
        acc += tl.load(base_ptr + rows_m[:, None] * stride_bm + offs_n[None, :], mask=mask,
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + rows_m[:, None] * stride_om + offs_n[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expand_grad_kernel(dy_ptr, h_ptr, gates_ptr, w_ptr, up_bias_ptr, dh_ptr, dg_ptr,
                        active_ptr, expert_ptr, scale_ptr, group_ptr, M, N, stride_dym,
                        stride_dyn, stride_hm, stride_gm, stride_wn, stride_wc, stride_ub,
                        stride_dhm, SPARSE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    group = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows_m = offs_m.to(tl.int64)
    row_start = tl.load(group_ptr + group * 8)
    row_stop = tl.load(group_ptr + group * 8 + 1)
    expert_start = tl.load(group_ptr + group * 8 + 5)
    expert_stop = tl.load(group_ptr + group * 8 + 6)
    code = tl.load(group_ptr + group * 8 + 7)
    for r0 in range(0, row_stop - row_start, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < row_stop - row_start
        mask_mr = mask_m[:, None] & mask_r[None, :]
        h = tl.load(h_ptr + rows_m[:, None] * stride_hm + (row_start + offs_r)[None, :],
                    mask=mask_mr, other=0.0).to(tl.float32)
        activated = activate(h, code)
        grad_act = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for e in range(expert_start, expert_stop):
            keep = mask_m
            run = True
            if SPARSE:
                flags = tl.load(active_ptr + rows_m * stride_gm + e, mask=mask_m, other=0)
                keep = mask_m & (flags != 0)
                run = tl.max(keep.to(tl.int32), axis=0) > 0
            if run:
                col_start = tl.load(expert_ptr + e * 8)
                adapter = tl.load(expert_ptr + e * 8 + 4)
                scale = tl.load(scale_ptr + e)
                gate = tl.load(gates_ptr + rows_m * stride_gm + e, mask=keep,
                               other=0.0).to(tl.float32)
                cols = (col_start + offs_r).to(tl.int64)
                with_bias = (adapter >= 0) & (r0 == 0)
                grad_u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                bias_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for n0 in range(0, N, BLOCK_N):
                    offs_n = n0 + tl.arange(0, BLOCK_N)
                    mask_n = offs_n < N
                    dy = tl.load(dy_ptr + rows_m[:, None] * stride_dym +
                                 offs_n[None, :] * stride_dyn,
                                 mask=keep[:, None] & mask_n[None, :], other=0.0)
                    w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn +
                                cols[None, :] * stride_wc,
                                mask=mask_n[:, None] & mask_r[None, :], other=0.0)
                    grad_u = tl.dot(dy.to(DOT_DTYPE), w.to(DOT_DTYPE), grad_u,
                                    input_precision=PRECISION)
                    if with_bias:
                        up = tl.load(up_bias_ptr + adapter.to(tl.int64) * stride_ub + offs_n,
                                     mask=mask_n, other=0.0).to(tl.float32)
                        bias_dot += tl.sum(dy.to(tl.float32) * up[None, :], axis=1)
                grad_gate = tl.sum(grad_u * activated, axis=1) * scale + bias_dot
                dg_ptrs = dg_ptr + rows_m * stride_gm + e
                # the previous rank chunk's partial sum may have been stored by another
                # thread of this program: make it visible before reading it back
                tl.debug_barrier()
                previous = tl.load(dg_ptrs, mask=keep, other=0.0)
                tl.store(dg_ptrs, previous + grad_gate, mask=keep)
                grad_act += grad_u * (gate * scale)[:, None]
        grad_h = grad_act * activate_grad(h, code)
        tl.store(dh_ptr + rows_m[:, None] * stride_dhm + (row_start + offs_r)[None, :],
                 grad_h, mask=mask_mr)


@triton.jit
def _expand_weight_grad_kernel(dy_ptr, h_ptr, gates_ptr, dw_ptr, db_ptr, token_ptr,
                               offsets_ptr, expert_ptr, scale_ptr, M, N, stride_dym,
                               stride_dyn, stride_hm, stride_gm, stride_wn, stride_wc,
                               stride_db, SPARSE: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    chunk = tl.program_id(2)
    col_start = tl.load(expert_ptr + e * 8)
    col_stop = tl.load(expert_ptr + e * 8 + 1)
    row_start = tl.load(expert_ptr + e * 8 + 2)
    if col_start + chunk * BLOCK_R >= col_stop:
        return
    code = tl.load(expert_ptr + e * 8 + 3)
    adapter = tl.load(expert_ptr + e * 8 + 4)
    scale = tl.load(scale_ptr + e)
    offs_r = chunk * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < col_stop - col_start
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    with_bias = (adapter >= 0) & (chunk == 0)
    if SPARSE:
        start = tl.load(offsets_ptr + e)
        stop = tl.load(offsets_ptr + e + 1)
    else:
        start = 0
        stop = M
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(start, stop, BLOCK_M):
        pairs = p0 + tl.arange(0, BLOCK_M)
        mask_m = pairs < stop
        if SPARSE:
            tokens = tl.load(token_ptr + pairs, mask=mask_m, other=0).to(tl.int64)
        else:
            tokens = pairs.to(tl.int64)
        dy = tl.load(dy_ptr + tokens[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        h = tl.load(h_ptr + tokens[:, None] * stride_hm + (row_start + offs_r)[None, :],
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        gate = tl.load(gates_ptr + tokens * stride_gm + e, mask=mask_m, other=0.0)
        gate = gate.to(tl.float32)
        u = tl.where(mask_r[None, :], activate(h, code) * (gate * scale)[:, None], 0.0)
        acc = tl.dot(tl.trans(dy).to(DOT_DTYPE), u.to(DOT_DTYPE), acc,
                     input_precision=PRECISION)
        if with_bias:
            bias_acc += tl.sum(dy.to(tl.float32) * gate[:, None], axis=0)
    cols = (col_start + offs_r).to(tl.int64)
    tl.store(dw_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + cols[None, :] * stride_wc,
             acc.to(dw_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_r[None, :])
    if with_bias:
        tl.store(db_ptr + adapter.to(tl.int64) * stride_db + offs_n,
                 bias_acc.to(db_ptr.dtype.element_ty), mask=mask_n)
