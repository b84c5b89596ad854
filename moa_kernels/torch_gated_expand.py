"""Step 3 of the torch backend's dense path (torch_ops.moa_linear): the gated expand.

    GatedExpand   y [T, out] + [u, g_ad] @ [B_stack, up_biases]^T as a new tensor, where
                  u = act(h) * g * scaling per expand column [T, C] (h [T, R] the shrink
                  output, pre-activation) and g_ad [T, N_ad] the adapters' gates (their
                  up-biases); with `active` [T, E] (a sparse mode, masked) the skipped
                  pairs' u and every gradient they would get are selected to exactly 0
    columns_of / rows_of   [T, R] -> [T, C] (the shrink row each column reads: hydra heads
                  share rows) and its adjoint, as slices and repeats (no scatter)
    row_dot       per-row dot products as one batched GEMM (also gated_adapter.py's)

Fusion: the activations, gating and scaling are one elementwise pass building u; the GEMM
reads y as its addend (no pass of its own) and the adapters' gated up-biases are a second
GEMM accumulated into its output. FLOPs: 2 T out (C + N_ad). Bytes (b per element): y and
the output [T, out], h [T, R] and u [T, C]. Saved: h [T, R], u [T, C] (C is the experts'
summed rank, small beside the layer's width: one op less in the backward than recomputing
it), the gates and B; the backward recomputes the activations and their derivatives
(autograd's own kernels, one op each) from h, so nothing of size [T, out] or [T, E, out] is
stored; the per-expert gate gradients are one
small GEMM with the layout's gate map (no scatter). Under torch.compile `traced` (the
gathers as GEMMs with the layout's maps, or slices) runs instead.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from moa_kernels.activations import activation_by_name
from moa_kernels.fusable import fusable_addmm
from moa_kernels.layout import ExpertLayout

# 0-dim zeros for torch.where, per (dtype, device): constants, never written.
_ZEROS: dict[tuple, torch.Tensor] = {}



def _activate(hidden: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """act(hidden) per activation segment; hidden itself when every segment is identity."""
    if not layout.activation_segments:
        return hidden
    pieces, start = [], 0
    for segment in layout.activation_segments:
        pieces.append(hidden[:, start:segment.start])
        pieces.append(activation_by_name(segment.activation).function(
            hidden[:, segment.start:segment.stop]))
        start = segment.stop
    pieces.append(hidden[:, start:])
    return torch.cat(pieces, dim=1)


def _activation_backward(hidden: torch.Tensor, grad: torch.Tensor,
                         layout: ExpertLayout) -> torch.Tensor:
    """d loss / d hidden from d loss / d act(hidden) [T, R] (modified in place), the
    activations' derivatives recomputed from hidden."""
    for segment in layout.activation_segments:
        rows = slice(segment.start, segment.stop)
        grad[:, rows] = activation_by_name(segment.activation).derivative(
            grad[:, rows], hidden[:, rows])
    return grad


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_j a[t, j] b[t, j] per row t, [T], for a, b [T, K]: one batched GEMM of T
    [1, K] x [K, 1] products (a product and a sum would be two passes)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def columns_of(activated: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """[T, R] -> [T, C]: the shrink row each expand column reads (column_source), as slices
    and repeats per column block (their autograd backward is a sum, not a scatter)."""
    pieces = [activated[:, start:stop] if heads == 1 else
              activated[:, start:stop].repeat(1, heads)
              for start, stop, heads in layout.column_blocks]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def rows_of(grad_columns: torch.Tensor, layout: ExpertLayout) -> torch.Tensor:
    """[T, C] -> [T, R]: per shrink row, the sum of the columns that read it (the adjoint
    of `columns_of`; hydra heads summed in head order)."""
    pieces, column = [], 0
    for start, stop, heads in layout.column_blocks:
        width = (stop - start) * heads
        block = grad_columns[:, column:column + width]
        pieces.append(block if heads == 1 else
                      block.reshape(block.shape[0], heads, stop - start).sum(1))
        column += width
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A cached 0-dim zero of like's dtype and device (never written), for torch.where."""
    key = ((), like.dtype, like.device)
    zero = None if torch.compiler.is_compiling() else _ZEROS.get(key)
    if zero is None:
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        if not torch.compiler.is_compiling():
            _ZEROS[key] = zero
    return zero


def _active_columns(active: torch.Tensor, layout: ExpertLayout, index) -> torch.Tensor:
    """Which expand columns run, [T, C] bool ([T, 1] for one expert: it broadcasts), from
    active [T, E]."""
    return active if layout.num_experts == 1 else \
        active.index_select(1, index["column_expert"])


def _expand_operands(hidden, gates, layout, traced=False, active=None, u=None):
    """u [T, C] (the gated, scaled expert activations; exactly 0 on the columns of pairs
    that `active` [T, E] skips, when given), the adapters' gates [T, N_ad] (None without
    adapters: they multiply the up-biases), and the parts the backward needs. traced: the
    gathers as small GEMMs with the layout's maps and as slices and repeats of the shared
    rows (their autograd backward is a GEMM or a sum, not a scatter). u: the forward's u,
    saved (the backward then does not compute it again)."""
    index = layout.index_tensors(hidden.device)
    activated = _activate(hidden, layout)
    columns = activated
    if layout.has_shared_shrink:
        columns = columns_of(activated, layout) if traced else \
            activated.index_select(1, index["column_source"])
    columns_count = layout.expand_columns
    if layout.num_experts == 1:  # [T, 1] broadcasts over the columns: no gather
        column_gates = gates if layout.unit_scaling else gates * layout.slots[0].scaling
    elif traced:
        column_gates = gates @ index["gate_map"][:columns_count].to(gates.dtype).t()
    else:
        column_gates = gates.index_select(1, index["column_expert"])
        if not layout.unit_scaling:
            column_gates = column_gates * index["column_scale"].to(gates.dtype)
    if u is None:
        u = columns * column_gates
        if active is not None:  # selected, not multiplied: 0 * inf would reach the output
            u = torch.where(_active_columns(active, layout, index), u, _zero(u))
    adapter_gates = None
    if layout.num_adapters:  # (0 on skipped pairs already: the gates are)
        adapter_gates = gates @ index["gate_map"][columns_count:].to(gates.dtype).t() \
            if traced else gates.index_select(1, index["adapter_experts"])
    return u, adapter_gates, columns, column_gates, index


class GatedExpand(torch.autograd.Function):
    """y [T, out] + gated expand of hidden [T, R] (pre-activation), as a new tensor (the
    GEMM reads y as its addend: no pass of its own, and y is never modified). The adapters'
    gated up-biases are a second GEMM accumulated into that output (no concatenation of
    u with the adapters' gates, nor of B with the up-biases, forward or backward).

    active [T, E] bool (sparse modes, eagerly): the skipped pairs' u is selected to exactly
    0, and so is every gradient they would get (their gates', their hidden rows'), also for
    a non-finite expert: a skipped pair adds nothing and learns nothing."""

    @staticmethod
    def traced(y, hidden, gates, expand_weight, expand_bias, layout, active=None):
        u, adapter_gates, *_ = _expand_operands(hidden, gates, layout, traced=True,
                                                active=active)
        weight = expand_weight
        if adapter_gates is not None:  # one GEMM (decoding: one reduction) for both
            u = torch.cat([u, adapter_gates], dim=1)
            weight = torch.cat([expand_weight, expand_bias.t()], dim=1)
        # decoding: a reduction fused with the gating before and the op reading y after
        return fusable_addmm(y, u, weight)

    @staticmethod
    def forward(ctx, y, hidden, gates, expand_weight, expand_bias, layout, active=None):
        u, adapter_gates, *_ = _expand_operands(hidden, gates, layout, active=active)
        y = torch.addmm(y, u, expand_weight.t())
        if adapter_gates is not None:
            y.addmm_(adapter_gates, expand_bias)
        ctx.layout = layout
        ctx.save_for_backward(hidden, gates, expand_weight, expand_bias, active, u)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        hidden, gates, expand_weight, expand_bias, active, u = ctx.saved_tensors
        layout = ctx.layout
        u, adapter_gates, columns, column_gates, index = _expand_operands(
            hidden, gates, layout, active=active, u=u)
        grad_u = grad_y @ expand_weight
        grad_expand_weight = grad_y.t() @ u
        grad_expand_bias = None
        running = None
        if active is not None:  # a skipped pair's columns give its gate nothing
            running = _active_columns(active, layout, index)
            columns = torch.where(running, columns, _zero(columns))
        if layout.num_experts == 1 and adapter_gates is None:
            # one expert: its gate's gradient is a row dot (one batched GEMM)
            grad_gates = row_dot(grad_u, columns).unsqueeze(1)
            if not layout.unit_scaling:
                grad_gates = grad_gates * layout.slots[0].scaling
        else:
            # Per-expert sums over its columns as one small GEMM with the layout's gate map.
            gate_map = index["gate_map"].to(gates.dtype)
            grad_gates = (grad_u * columns) @ gate_map[:layout.expand_columns]
            if adapter_gates is not None:
                grad_adapter_gates = grad_y @ expand_bias.t()
                if active is not None:
                    grad_adapter_gates = torch.where(
                        active.index_select(1, index["adapter_experts"]), grad_adapter_gates,
                        _zero(grad_adapter_gates))
                grad_gates.addmm_(grad_adapter_gates, gate_map[layout.expand_columns:])
        if adapter_gates is not None:
            grad_expand_bias = adapter_gates.t() @ grad_y
        grad_activated = grad_u * column_gates
        if running is not None:
            grad_activated = torch.where(running, grad_activated, _zero(grad_activated))
        if layout.has_shared_shrink:  # hydra heads: sum the columns that read a row
            grad_activated = rows_of(grad_activated, layout)
        grad_hidden = _activation_backward(hidden, grad_activated, layout)
        if active is not None and layout.activation_segments:
            # act'(h) of a skipped pair's h (perhaps non-finite) must not reach its rows
            rows = running if not layout.has_shared_shrink else \
                (active.to(torch.float32) @ index["row_owner"]) > 0
            grad_hidden = torch.where(rows, grad_hidden, _zero(grad_hidden))
        return (grad_y, grad_hidden, grad_gates, grad_expand_weight, grad_expand_bias, None,
                None)
