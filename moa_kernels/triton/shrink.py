"""Shrink: h = x @ W^T + b over the packed shrink rows, with the base layer's GEMM beside
it, and the backward. All plain GEMMs, so all cuBLAS (torch.mm / addmm).

W [S, in] = [A packed (h_width rows, plan.py); router first layer (F rows, when fused);
zero rows to a multiple of 16], so x is read once for every expert and the router and h
[T, S] has 16-aligned rows for the gate kernels. The packed A is cached per version of
shrink_weight; the router's first layer arrives as its blocks (W1, W3, the threshold row:
parameters), so W costs one concatenation per call when a router is fused (none in the
paper layout, whose MoALinears take their gates from a layer router), made in the forward
op and kept for the backward op (which otherwise takes the cached packed A).

With a plain linear base (base_weight given) the op also computes y = x Wb^T + bb, so that
its backward can add the experts' dx into the base's dx in the same GEMM (addmm_, beta = 1)
instead of autograd adding two [T, in] tensors (one pass over dx saved: 2 b T in bytes).

Why cuBLAS: the shrink is a GEMM with N = S <= a few hundred: its arithmetic intensity is
about S FLOP per byte of x, below the H100's ridge (~270) for every preset, so it is bound
by reading x once, which cuBLAS does at full bandwidth with its own split-K and tile
choices; nothing is fused into it that a bias vector would not express. The backward's
dx = dh @ W and dW = dh^T @ x are plain GEMMs too (dW: cuBLAS splits the T reduction
deterministically; db = column sums of dh in fp32).

h is written in fp32 (cuBLAS's fp32-output GEMM where torch has it: the adapters'
pre-activations and the router logits are never rounded to bf16); its gradient is
rounded to the data dtype once, as the operand of the two backward GEMMs.

FLOPs and bytes per call (T tokens, S rows, b bytes per element of the data):
  forward  h = x W^T + b:   2 T in S FLOPs;   b (T in + S in) + 4 T S bytes
  dx = dh W (+ base dx):    2 T S in FLOPs;   b (T S + S in) + 2 b T in bytes (beta = 1)
  dW = dh^T x, db:          2 S T in FLOPs;   b (T S + T in + S in) + 4 T S bytes
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moa_kernels.triton.kernel_utils import align16, mm_fp32
from moa_kernels.triton.plan import (
    KernelLayout,
    pack_shrink,
    pack_shrink_bias,
    unpack_shrink_rows,
)

_ZEROS: dict[tuple, torch.Tensor] = {}


def _zeros(rows: int, columns: int | None, like: torch.Tensor,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """A cached block of zeros [rows, columns] ([rows] for columns None), like's dtype or
    `dtype`, never written: padding of W and b, absent router biases."""
    dtype = like.dtype if dtype is None else dtype
    key = (rows, columns, dtype, like.device)
    if key not in _ZEROS:
        shape = (rows,) if columns is None else (rows, columns)
        _ZEROS[key] = like.new_zeros(shape, dtype=dtype)
    return _ZEROS[key]


def shrink_width(meta: KernelLayout | None, router_rows: int) -> int:
    """S: the columns of h (expert part, router part, padding to 16)."""
    return align16((meta.h_width if meta is not None else 0) + router_rows)


def stacked_weight(x: torch.Tensor, meta: KernelLayout | None, shrink_weight,
                   router_weights) -> torch.Tensor:
    """W [S, in] in x's dtype (see the module docstring): the packed A (cached per
    version), the router's first-layer blocks (cast), zero rows to 16: one concatenation."""
    parts = []
    if meta is not None:
        parts.append(pack_shrink(meta, shrink_weight, x.dtype))
    parts += [w.to(x.dtype) for w in router_weights]
    rows = sum(p.shape[0] for p in parts)
    if rows % 16:
        parts.append(_zeros(align16(rows) - rows, x.shape[1], parts[0]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def stacked_bias(x: torch.Tensor, meta: KernelLayout | None, full_bias, router_weights,
                 router_biases, router_bias_flags) -> torch.Tensor | None:
    """b [S] in fp32, or None when every row's bias is zero. router_biases: the biases of
    the router blocks whose flag is 1, in order."""
    expert_bias = full_bias is not None and meta is not None
    if not expert_bias and not router_biases:
        return None
    parts = []
    if meta is not None:
        parts.append(pack_shrink_bias(meta, full_bias, torch.float32) if expert_bias else
                     _zeros(meta.h_width, None, x, torch.float32))
    biases = iter(router_biases)
    for weight, flag in zip(router_weights, router_bias_flags):
        parts.append(next(biases).float() if flag else
                     _zeros(weight.shape[0], None, x, torch.float32))
    rows = sum(p.shape[0] for p in parts)
    if rows % 16:
        parts.append(_zeros(align16(rows) - rows, None, x, torch.float32))
    return torch.cat(parts)


def shrink_forward(x: torch.Tensor, meta: KernelLayout | None, shrink_weight, full_bias,
                   router_weights, router_biases, router_bias_flags, base_weight, base_bias
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, W): y = x Wb^T + bb [T, out] (an empty tensor without base_weight), h [T, S]
    in fp32 (accumulated in fp32 and kept so: the adapters' pre-activations and the router
    logits are not rounded to x's dtype), and the W [S, in] used (for the backward).

    Args:
        x: [T, in]; meta: the packed space, or None (no expert rows: a router alone);
        shrink_weight [R, in] and full_bias [R] or None; router_weights: the router's
        first-layer blocks [F_i, in] (any float dtype), router_biases: the biases of the
        blocks flagged 1 in router_bias_flags; base_weight [out, in] or None, base_bias
        [out] or None.
    """
    weight = stacked_weight(x, meta, shrink_weight, router_weights)
    bias = stacked_bias(x, meta, full_bias, router_weights, router_biases, router_bias_flags)
    h = mm_fp32(x, weight.t(), bias)
    y = F.linear(x, base_weight, base_bias) if base_weight is not None else x.new_empty(0)
    return y, h, weight


def shrink_backward(grad_h: torch.Tensor, grad_y: torch.Tensor | None, x: torch.Tensor,
                    weight: torch.Tensor, meta: KernelLayout | None, router_rows: int,
                    base_weight: torch.Tensor | None, need: list[bool]
                    ) -> list[torch.Tensor | None]:
    """Gradients of shrink_forward from grad_h [T, S] (fp32) and grad_y [T, out] (or None):
    grad_h is rounded to x's dtype for the cuBLAS GEMMs, as their operands; db sums the fp32
    grad_h.

    need: which of (x, shrink_weight, full_bias, router_weight, router_bias, base_weight,
    base_bias) need a gradient. Returns them in that order (None where not needed); the
    weight gradients in x's dtype, the biases' in fp32.
    """
    need_x, need_w, need_b, need_rw, need_rb, need_bw, need_bb = need
    grad_bias = grad_h.sum(0, dtype=torch.float32) if need_b or need_rb else None
    grad_h = grad_h.to(x.dtype)
    result: list[torch.Tensor | None] = [None] * 7
    if need_x:
        if grad_y is not None and base_weight is not None:
            dx = torch.mm(grad_y, base_weight.to(grad_y.dtype))
            result[0] = dx.addmm_(grad_h, weight)
        else:
            result[0] = torch.mm(grad_h, weight)
    # (fresh tensors, not views of one: a custom op's outputs may not alias each other)
    width = meta.h_width if meta is not None else 0
    if need_w or need_rw:
        grad_weight = torch.mm(grad_h.t(), x)
        if need_w:
            result[1] = _fresh(unpack_shrink_rows(meta, grad_weight[:width]), grad_weight)
        if need_rw:
            result[3] = grad_weight[width:width + router_rows].clone()
    if grad_bias is not None:
        if need_b:
            result[2] = _fresh(unpack_shrink_rows(meta, grad_bias[:width]), grad_bias)
        if need_rb:
            result[4] = grad_bias[width:width + router_rows].clone()
    if (need_bw or need_bb) and grad_y is not None:
        if need_bw:
            result[5] = torch.mm(grad_y.t(), x)
        if need_bb:
            result[6] = grad_y.sum(0, dtype=torch.float32)
    return result


def _fresh(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """tensor, copied if it is a view of base."""
    return tensor.clone() if tensor._base is base or tensor is base else tensor
