"""Gated expand: out = y + sum_e g_e delta_e = y + u @ B^T over the packed column space
(plan.py), and its backward.

Plan (T tokens, K = k_width packed columns, out features, b bytes per element):
  forward   u = `_gate_kernel`(h, g, active)            [T, K]: u[t, c] = act_c(h[t, c])
                                                         * g[t, e_c] * s_c (bias column:
                                                         g), 0 where (t, e_c) is inactive
            out = torch.addmm(y, u, B^T)                 cuBLAS, beta = 1: y read once
  backward  du = dy @ B                                  cuBLAS [T, K], fp32 out
            dB = dy^T @ u                                cuBLAS [out, K] (u saved: T K b)
            dh, dg = `_gate_grad_kernel`(du, h, g, active)
                                                         dg[t, e] = sum_{c of e} du act s,
                                                         dh = du g s act'(h)

Why cuBLAS does the GEMMs and Triton only the gating. Every GEMM here has an inner or
outer dimension of K <= a few hundred columns, so its arithmetic intensity is at most
about K / 2 FLOP per byte of the [T, out] operand it streams (y and out, or dy): below the
H100's ridge (~270 FLOP/byte at 800 TFLOP/s, 3 TB/s) for every layout with K < ~500, all
presets included. The expand is therefore bound by its passes over [T, out]: 2 b T out
bytes forward (read y, write out), 2 b T out backward (read dy twice), whatever kernel
runs it, and cuBLAS reaches the bandwidth at any shape and on any GPU. Fusing the gating
into the GEMM's operand prologue (the previous design) saved only the u round trip, 2 b T
K bytes (1 MB for L1: T = 2048, K = 80, bf16, against 16 MB of [T, out] passes), and cost
a hand-written GEMM: 252-255 registers, scalar loads of B and every activation evaluated
for every element in the sm_90 builds. The gate kernels are elementwise over [T, K] tiles
(plus a [32, 64] x [64, 16] fp32 one-hot dot for the per-expert sums of dg): few
registers, 16-byte loads along the packed rows, each activation computed only over its
own column range (constexpr).

Sparse modes use the same GEMMs with the inactive pairs' u set to exactly 0 (a skipped
pair adds exactly nothing, also for a non-finite expert: u is selected, not multiplied).
A grouped GEMM over the active pairs would save FLOPs that cost no time here and would
read dy once per active pair of a token (k times for top-k) and write and re-read
per-pair deltas of [k T, out]: more bytes, not fewer.

FLOPs and bytes per call (b bytes per element of the data; h, du, dh fp32, u in b; all
[T, K]-sized; E experts):
  forward:  2 T K out FLOPs;   2 b T out + b K out + (4 + 2 b) T K bytes
  backward: 4 T K out FLOPs;   2 b T out + 2 b K out + (16 + b) T K + 4 T E bytes
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moa_kernels.triton.kernel_utils import (
    BLOCK_T,
    activate,
    activate_grad,
    block_columns,
    mm_fp32,
)
from moa_kernels.triton.plan import KernelLayout, pack_expand, unpack_expand


def gated_expand_forward(y: torch.Tensor, hidden: torch.Tensor, gates: torch.Tensor,
                         active: torch.Tensor | None, expand_weight: torch.Tensor,
                         expand_bias: torch.Tensor, meta: KernelLayout
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """y + sum_e g_e delta_e, from the experts' pre-activations h.

    Args:
        y: [T, out] base output (the compute dtype); hidden: [T, >= h_width] the shrink
        output in packed order (plan.py), fp32, rows 16-aligned; gates:
        [T, E]; active: [T, E] bool (sparse modes) or None; expand_weight [out, C] and
        expand_bias [N_ad, out] (any float dtype: packed, cached, in y's dtype).
    Returns:
        out [T, out] in y's dtype (a new tensor) and u [T, k_width] (saved for backward).
    """
    tokens = y.shape[0]
    packed = pack_expand(meta, expand_weight, expand_bias, y.dtype)
    u = torch.empty(tokens, meta.k_width, device=y.device, dtype=y.dtype)
    if tokens:
        _launch_gate(_gate_kernel, meta, hidden, gates, active, u, u)
    return torch.addmm(y, u, packed.t()), u


def gated_expand_backward(grad: torch.Tensor, hidden: torch.Tensor, gates: torch.Tensor,
                          active: torch.Tensor | None, u: torch.Tensor,
                          expand_weight: torch.Tensor, expand_bias: torch.Tensor,
                          meta: KernelLayout
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of gated_expand_forward from grad [T, out] (the y gradient is grad).

    Returns d hidden [T, h_width] (hidden's dtype; 0 on inactive pairs and padding),
    d gates [T, E] fp32 (0 on inactive pairs), d expand_weight [out, C] and d expand_bias
    [N_ad, out] in their tensors' dtypes.
    """
    packed = pack_expand(meta, expand_weight, expand_bias, grad.dtype)
    grad_u = mm_fp32(grad, packed)
    grad_packed = torch.mm(grad.t(), u)
    tokens = grad.shape[0]
    grad_hidden = torch.empty(tokens, meta.h_width, device=grad.device, dtype=hidden.dtype)
    grad_gates = torch.empty(tokens, meta.num_experts, device=grad.device,
                             dtype=torch.float32)
    if tokens:
        _launch_gate(_gate_grad_kernel, meta, hidden, gates, active, grad_u, grad_hidden,
                     grad_gates)
    grad_weight, grad_bias = unpack_expand(meta, grad_packed)
    return (grad_hidden, grad_gates, grad_weight.to(expand_weight.dtype),
            grad_bias.to(expand_bias.dtype))


def _launch_gate(kernel, meta: KernelLayout, hidden, gates, active, source, target,
                 grad_gates=None):
    """One launch of a gate kernel. source: u (forward: written) or du (backward: read);
    target: u (forward) or dh (backward)."""
    tokens = hidden.shape[0]
    block_c = block_columns(meta.k_width)
    sparse = active is not None
    flags = active.view(torch.uint8) if sparse else gates
    common = dict(COLUMNS=meta.columns, BIAS_STOP=meta.columns + meta.adapters,
                  K_WIDTH=meta.k_width, H_WIDTH=meta.h_width, SILU=meta.act_starts[0],
                  GELU=meta.act_starts[1], RELU=meta.act_starts[2], SPARSE=sparse,
                  BLOCK_T=BLOCK_T, BLOCK_C=block_c)
    if grad_gates is None:
        kernel[(triton.cdiv(tokens, BLOCK_T),)](
            hidden, gates, flags, meta.column_expert, meta.column_scale, target, tokens,
            hidden.stride(0), gates.stride(0), flags.stride(0), target.stride(0), **common)
    else:
        kernel[(triton.cdiv(tokens, BLOCK_T),)](
            source, hidden, gates, flags, meta.column_expert, meta.column_scale, target,
            grad_gates, tokens, meta.num_experts, source.stride(0), hidden.stride(0),
            gates.stride(0), flags.stride(0), target.stride(0), grad_gates.stride(0),
            E_PAD=meta.experts_pad, **common)


# ---------------------------------------------------------------------------------------
# jit kernels
# ---------------------------------------------------------------------------------------

@triton.jit
def _gate_kernel(h_ptr, gates_ptr, active_ptr, expert_ptr, scale_ptr, u_ptr, T, stride_h,
                 stride_g, stride_a, stride_u, COLUMNS: tl.constexpr, BIAS_STOP: tl.constexpr,
                 K_WIDTH: tl.constexpr, H_WIDTH: tl.constexpr, SILU: tl.constexpr,
                 GELU: tl.constexpr, RELU: tl.constexpr, SPARSE: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """u[t, c] = act_c(h[t, c]) * g[t, e_c] * s_c (bias columns: g), 0 where inactive."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_rows = rows < T
    rows = rows.to(tl.int64)
    for c0 in tl.static_range(0, K_WIDTH, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        is_expert = cols < COLUMNS
        used = cols < BIAS_STOP
        expert = tl.load(expert_ptr + cols, mask=used, other=0)
        scale = tl.load(scale_ptr + cols, mask=used, other=0.0)
        keep = in_rows[:, None] & used[None, :]
        if c0 < COLUMNS:
            h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :],
                        mask=in_rows[:, None] & is_expert[None, :], other=0.0)
            a = activate(h.to(tl.float32), cols, c0, BLOCK_C, SILU, GELU, RELU, COLUMNS)
            if c0 + BLOCK_C > COLUMNS:
                a = tl.where(is_expert[None, :], a, 1.0)
        else:
            a = tl.full((BLOCK_T, BLOCK_C), 1.0, tl.float32)
        gate = tl.load(gates_ptr + rows[:, None] * stride_g + expert[None, :], mask=keep,
                       other=0.0).to(tl.float32)
        if SPARSE:
            flags = tl.load(active_ptr + rows[:, None] * stride_a + expert[None, :],
                            mask=keep, other=0)
            keep = keep & (flags != 0)
        u = tl.where(keep, a * gate * scale[None, :], 0.0)
        tl.store(u_ptr + rows[:, None] * stride_u + cols[None, :],
                 u.to(u_ptr.dtype.element_ty), mask=in_rows[:, None] & (cols < K_WIDTH)[None, :])


@triton.jit
def _gate_grad_kernel(du_ptr, h_ptr, gates_ptr, active_ptr, expert_ptr, scale_ptr, dh_ptr,
                      dg_ptr, T, E, stride_du, stride_h, stride_g, stride_a, stride_dh,
                      stride_dg, COLUMNS: tl.constexpr, BIAS_STOP: tl.constexpr,
                      K_WIDTH: tl.constexpr, H_WIDTH: tl.constexpr, SILU: tl.constexpr,
                      GELU: tl.constexpr, RELU: tl.constexpr, SPARSE: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, E_PAD: tl.constexpr):
    """dg[t, e] = sum_{c of e} du act s and dh = du g s act'(h), 0 where inactive; one
    program owns its token rows of dg and dh (deterministic, no atomics). The per-expert
    sums are a [BLOCK_T, BLOCK_C] x [BLOCK_C, E_PAD] fp32 dot with the one-hot column owner
    matrix (IEEE: exact products, fp32 sums). Column blocks start at multiples of 16, so a
    block starting below COLUMNS is one with expert columns, and any other lies past
    H_WIDTH (bias columns only)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_rows = rows < T
    rows = rows.to(tl.int64)
    experts = tl.arange(0, E_PAD)
    grad_gates = tl.zeros((BLOCK_T, E_PAD), dtype=tl.float32)
    for c0 in tl.static_range(0, K_WIDTH, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        is_expert = cols < COLUMNS
        used = cols < BIAS_STOP
        expert = tl.load(expert_ptr + cols, mask=used, other=0)
        scale = tl.load(scale_ptr + cols, mask=used, other=0.0)
        keep = in_rows[:, None] & used[None, :]
        grad_u = tl.load(du_ptr + rows[:, None] * stride_du + cols[None, :], mask=keep,
                         other=0.0).to(tl.float32)
        gate = tl.load(gates_ptr + rows[:, None] * stride_g + expert[None, :], mask=keep,
                       other=0.0).to(tl.float32)
        if SPARSE:
            flags = tl.load(active_ptr + rows[:, None] * stride_a + expert[None, :],
                            mask=keep, other=0)
            keep = keep & (flags != 0)
        if c0 < COLUMNS:
            h = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :],
                        mask=in_rows[:, None] & is_expert[None, :], other=0.0).to(tl.float32)
            a = activate(h, cols, c0, BLOCK_C, SILU, GELU, RELU, COLUMNS)
            if c0 + BLOCK_C > COLUMNS:
                a = tl.where(is_expert[None, :], a, 1.0)
            d = grad_u * gate * scale[None, :] * activate_grad(h, cols, c0, BLOCK_C, SILU,
                                                                GELU, RELU, COLUMNS)
            dh = tl.where(keep & is_expert[None, :], d, 0.0)
            tl.store(dh_ptr + rows[:, None] * stride_dh + cols[None, :],
                     dh.to(dh_ptr.dtype.element_ty),
                     mask=in_rows[:, None] & (cols < H_WIDTH)[None, :])
        else:
            a = tl.full((BLOCK_T, BLOCK_C), 1.0, tl.float32)
        v = tl.where(keep, grad_u * a * scale[None, :], 0.0)
        owner = ((expert[:, None] == experts[None, :]) & used[:, None]).to(tl.float32)
        grad_gates = tl.dot(v, owner, grad_gates, input_precision="ieee")
    tl.store(dg_ptr + rows[:, None] * stride_dg + experts[None, :], grad_gates,
             mask=in_rows[:, None] & (experts < E)[None, :])
