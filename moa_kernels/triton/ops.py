"""The autograd glue: each op family as a torch.library custom op (moa::...), with a fake
implementation for tracing and a registered backward that calls its own custom op.

    moa::shrink         x [T, in], expert rows, router rows, base  -> y [T, out] (or empty),
                                                                      h [T, S]
    moa::gated_expand   y [T, out], h [T, h_width], g [T, E], ...  -> y + sum_e g_e delta_e,
                                                                      u [T, k_width]

The layout enters as `code` and `scales` (plan.layout_code: plain ints and floats, so a
constant under torch.compile); the packed weights are looked up (cached per parameter
version) inside the ops, where the tensors are real. torch.compile sees opaque ops
(and their backward ops) instead of Triton launches and cuBLAS calls, so it traces a
model using them without graph breaks; eager mode pays one Python dispatch per op.
"""

from typing import Optional

import torch

from moa_kernels.triton import expand, grouped, shrink
from moa_kernels.triton.grouped_layout import GroupedLayout, grouped_widths
from moa_kernels.triton.plan import KernelLayout, code_widths

Tensor = torch.Tensor


def _meta(code, scales, device) -> KernelLayout | None:
    return KernelLayout.of(code, scales, device) if code else None


def _flags(mask: int, count: int) -> list[int]:
    """The bits of mask as count 0 / 1 flags (bit i: block i)."""
    return [(mask >> i) & 1 for i in range(count)]


# ---------------------------------------------------------------------------------------
# shrink (with the base GEMM beside it)
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("moa::shrink", mutates_args=())
def shrink_op(x: Tensor, shrink_weight: Optional[Tensor], full_bias: Optional[Tensor],  # noqa: UP045
              router_weights: list[Tensor], router_biases: list[Tensor],
              router_bias_mask: int, base_weight: Optional[Tensor],  # noqa: UP045
              base_bias: Optional[Tensor], code: list[int],  # noqa: UP045
              scales: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    """(y, h, W): W the stacked weight the backward reuses where it is made here (router
    blocks present), else an empty tensor (the backward takes the cached packed A).
    router_bias_mask: bit i set where router block i has a bias (in router_biases)."""
    y, h, weight = shrink.shrink_forward(
        x, _meta(code, scales, x.device), shrink_weight, full_bias, router_weights,
        router_biases, _flags(router_bias_mask, len(router_weights)), base_weight, base_bias)
    return y, h, weight if router_weights else x.new_empty(0)


@shrink_op.register_fake
def _(x, shrink_weight, full_bias, router_weights, router_biases, router_bias_mask,
      base_weight, base_bias, code, scales):
    width = code_widths(code)["h_width"] if code else 0
    rows = sum(w.shape[0] for w in router_weights)
    y = x.new_empty(x.shape[0], base_weight.shape[0]) if base_weight is not None else \
        x.new_empty(0)
    weight = x.new_empty(shrink.align16(width + rows), x.shape[1]) if router_weights else \
        x.new_empty(0)
    return y, x.new_empty(x.shape[0], shrink.align16(width + rows), dtype=torch.float32), \
        weight


@torch.library.custom_op("moa::shrink_backward", mutates_args=())
def shrink_backward_op(grad_h: Tensor, grad_y: Optional[Tensor], x: Tensor,  # noqa: UP045
                       shrink_weight: Optional[Tensor], weight: Tensor,  # noqa: UP045
                       base_weight: Optional[Tensor],  # noqa: UP045
                       code: list[int], scales: list[float], router_rows: int,
                       need: list[bool]
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    meta = _meta(code, scales, x.device)
    if not weight.numel():  # no router blocks: the packed A (cached) is the whole W
        weight = shrink.stacked_weight(x, meta, shrink_weight, [])
    grads = shrink.shrink_backward(grad_h, grad_y, x, weight, meta, router_rows, base_weight,
                                   need)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@shrink_backward_op.register_fake
def _(grad_h, grad_y, x, shrink_weight, weight, base_weight, code, scales, router_rows, need):
    rows = code_widths(code)["rows"] if code else 0
    shapes = [x.shape, (rows, x.shape[1]), (rows,), (router_rows, x.shape[1]), (router_rows,),
              None if base_weight is None else base_weight.shape,
              None if base_weight is None else base_weight.shape[:1]]
    dtypes = [x.dtype, x.dtype, torch.float32, x.dtype, torch.float32, x.dtype, torch.float32]
    return tuple(x.new_empty(shape, dtype=dtype) if wanted and shape is not None else
                 x.new_empty(0) for shape, dtype, wanted in zip(shapes, dtypes, need))


def _shrink_setup(ctx, inputs, output):
    x, shrink_weight, full_bias, router_weights, router_biases, router_bias_mask, \
        base_weight, base_bias, code, scales = inputs
    ctx.save_for_backward(x, shrink_weight, output[2], base_weight)
    ctx.code, ctx.scales = code, scales
    ctx.dtypes = [None if t is None else t.dtype
                  for t in (x, shrink_weight, full_bias, base_weight, base_bias)]
    ctx.router = [(w.shape[0], w.dtype) for w in router_weights]
    ctx.router_bias_dtypes = [b.dtype for b in router_biases]
    ctx.router_bias_flags = _flags(router_bias_mask, len(router_weights))
    ctx.has_base = base_weight is not None


def _shrink_backward(ctx, grad_y, grad_h, _grad_weight):
    x, shrink_weight, weight, base_weight = ctx.saved_tensors
    needs = ctx.needs_input_grad  # x, shrink_weight, full_bias, [router W], [router b], ...
    need_router = any(needs[3]) if isinstance(needs[3], (list, tuple)) else bool(needs[3])
    need_router_bias = any(needs[4]) if isinstance(needs[4], (list, tuple)) else \
        bool(needs[4])
    need = [bool(needs[0]), bool(needs[1]) and ctx.dtypes[1] is not None,
            bool(needs[2]) and ctx.dtypes[2] is not None, need_router and bool(ctx.router),
            need_router_bias and bool(ctx.router_bias_dtypes),
            bool(needs[6]) and ctx.dtypes[3] is not None,
            bool(needs[7]) and ctx.dtypes[4] is not None]
    rows = sum(r for r, _ in ctx.router)
    d_x, d_shrink, d_bias, d_router, d_router_bias, d_base, d_base_bias = shrink_backward_op(
        grad_h.contiguous(), grad_y.contiguous() if ctx.has_base else None, x,
        shrink_weight, weight, base_weight, ctx.code, ctx.scales, rows, need)
    router_grads = [None] * len(ctx.router)
    if need[3]:
        router_grads = [g.to(dtype) for g, (_, dtype) in
                        zip(d_router.split([r for r, _ in ctx.router]), ctx.router)]
    router_bias_grads = [None] * len(ctx.router_bias_dtypes)
    if need[4]:
        pieces = d_router_bias.split([r for r, _ in ctx.router])
        present = [g for g, flag in zip(pieces, ctx.router_bias_flags) if flag]
        router_bias_grads = [g.to(dtype) for g, dtype in
                             zip(present, ctx.router_bias_dtypes)]
    return (d_x.to(ctx.dtypes[0]) if need[0] else None,
            d_shrink.to(ctx.dtypes[1]) if need[1] else None,
            d_bias.to(ctx.dtypes[2]) if need[2] else None, router_grads, router_bias_grads,
            None, d_base.to(ctx.dtypes[3]) if need[5] else None,
            d_base_bias.to(ctx.dtypes[4]) if need[6] else None, _no_grad(ctx.code),
            _no_grad(ctx.scales))


def _no_grad(argument):
    """The gradient of a non-tensor argument in the structure register_autograd compares
    with the inputs' (with tensor-list inputs it flattens them: an empty list is a node,
    a list of numbers a leaf)."""
    return [] if isinstance(argument, list) and not argument else None


shrink_op.register_autograd(_shrink_backward, setup_context=_shrink_setup)


# ---------------------------------------------------------------------------------------
# gated expand
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("moa::gated_expand", mutates_args=())
def gated_expand_op(y: Tensor, hidden: Tensor, gates: Tensor,
                    active: Optional[Tensor], expand_weight: Tensor,  # noqa: UP045
                    expand_bias: Tensor, code: list[int], scales: list[float]
                    ) -> tuple[Tensor, Tensor]:
    return expand.gated_expand_forward(y, hidden, gates, active, expand_weight, expand_bias,
                                       KernelLayout.of(code, scales, y.device))


@gated_expand_op.register_fake
def _(y, hidden, gates, active, expand_weight, expand_bias, code, scales):
    return torch.empty_like(y), y.new_empty(y.shape[0], code_widths(code)["k_width"])


@torch.library.custom_op("moa::gated_expand_backward", mutates_args=())
def gated_expand_backward_op(grad: Tensor, hidden: Tensor, gates: Tensor,
                             active: Optional[Tensor], u: Tensor,  # noqa: UP045
                             expand_weight: Tensor, expand_bias: Tensor, code: list[int],
                             scales: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return expand.gated_expand_backward(grad, hidden, gates, active, u, expand_weight,
                                        expand_bias, KernelLayout.of(code, scales, grad.device))


@gated_expand_backward_op.register_fake
def _(grad, hidden, gates, active, u, expand_weight, expand_bias, code, scales):
    return (hidden.new_empty(hidden.shape[0], code_widths(code)["h_width"]),
            gates.new_empty(gates.shape, dtype=torch.float32), torch.empty_like(expand_weight),
            torch.empty_like(expand_bias))


def _expand_setup(ctx, inputs, output):
    y, hidden, gates, active, expand_weight, expand_bias, code, scales = inputs
    ctx.save_for_backward(hidden, gates, active, output[1], expand_weight, expand_bias)
    ctx.code, ctx.scales = code, scales
    ctx.dtypes = (hidden.dtype, gates.dtype)


def _expand_backward(ctx, grad, _grad_u):
    hidden, gates, active, u, expand_weight, expand_bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = [None] * 8
    grads[0] = grad if needs[0] else None
    if any(needs[1:3]) or any(needs[4:6]):
        d_hidden, d_gates, d_weight, d_bias = gated_expand_backward_op(
            grad.contiguous(), hidden, gates, active, u, expand_weight, expand_bias, ctx.code,
            ctx.scales)
        grads[1] = d_hidden.to(ctx.dtypes[0]) if needs[1] else None
        grads[2] = d_gates.to(ctx.dtypes[1]) if needs[2] else None
        grads[4] = d_weight if needs[4] else None
        grads[5] = d_bias if needs[5] else None
    return tuple(grads)


gated_expand_op.register_autograd(_expand_backward, setup_context=_expand_setup)


# ---------------------------------------------------------------------------------------
# grouped sparse plan (MOA_TRITON_SPARSE=grouped; grouped.py)
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("moa::grouped_mixture", mutates_args=())
def grouped_mixture_op(y: Tensor, x: Tensor, gates: Tensor, active: Tensor,
                       shrink_weight: Tensor, full_bias: Optional[Tensor],  # noqa: UP045
                       expand_weight: Tensor, expand_bias: Tensor, code: list[int],
                       scales: list[float]
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return grouped.grouped_forward(y, x, gates, active, shrink_weight, full_bias,
                                   expand_weight, expand_bias,
                                   GroupedLayout.of(code, scales, x.device))


@grouped_mixture_op.register_fake
def _(y, x, gates, active, shrink_weight, full_bias, expand_weight, expand_bias, code,
      scales):
    ctx = torch.library.get_ctx()
    pairs, k_max = ctx.new_dynamic_size(), ctx.new_dynamic_size()
    widths = grouped_widths(code)
    index = dict(dtype=torch.int64)
    return (torch.empty_like(y), x.new_empty(pairs, **index), x.new_empty(pairs, **index),
            x.new_empty(widths["experts"] + 1, **index), x.new_empty(x.shape[0], k_max, **index),
            x.new_empty(pairs, widths["w_max"], dtype=torch.float32),
            x.new_empty(pairs, widths["w_max"]))


@torch.library.custom_op("moa::grouped_mixture_backward", mutates_args=())
def grouped_mixture_backward_op(grad: Tensor, x: Tensor, gates: Tensor, token_index: Tensor,
                                pair_flat: Tensor, offsets: Tensor, pos: Tensor, h: Tensor,
                                u: Tensor, shrink_weight: Tensor, expand_weight: Tensor,
                                expand_bias: Tensor, code: list[int], scales: list[float],
                                need: list[bool]
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = grouped.grouped_backward(grad, x, gates, token_index, pair_flat, offsets, pos, h,
                                     u, shrink_weight, expand_weight, expand_bias,
                                     GroupedLayout.of(code, scales, x.device), need)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@grouped_mixture_backward_op.register_fake
def _(grad, x, gates, token_index, pair_flat, offsets, pos, h, u, shrink_weight,
      expand_weight, expand_bias, code, scales, need):
    shapes = [x.shape, gates.shape, shrink_weight.shape, shrink_weight.shape[:1],
              expand_weight.shape, expand_bias.shape]
    dtypes = [x.dtype, torch.float32, shrink_weight.dtype, torch.float32,
              expand_weight.dtype, expand_bias.dtype]
    return tuple(x.new_empty(shape, dtype=dtype) if wanted else x.new_empty(0)
                 for shape, dtype, wanted in zip(shapes, dtypes, need))


def _grouped_setup(ctx, inputs, output):
    y, x, gates, active, shrink_weight, full_bias, expand_weight, expand_bias, code, \
        scales = inputs
    ctx.save_for_backward(x, gates, *output[1:], shrink_weight, expand_weight, expand_bias)
    ctx.code, ctx.scales = code, scales
    ctx.dtypes = (x.dtype, gates.dtype, None if full_bias is None else full_bias.dtype)


def _grouped_backward(ctx, grad, *_unused):
    x, gates, token_index, pair_flat, offsets, pos, h, u, shrink_weight, expand_weight, \
        expand_bias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    # inputs: y, x, gates, active, shrink_weight, full_bias, expand_weight, expand_bias
    need = [bool(needs[1]), bool(needs[2]), bool(needs[4]),
            bool(needs[5]) and ctx.dtypes[2] is not None, bool(needs[6]), bool(needs[7])]
    grads = [None] * 10
    grads[0] = grad if needs[0] else None
    if any(need):
        d_x, d_gates, d_weight, d_bias, d_expand, d_expand_bias = grouped_mixture_backward_op(
            grad.contiguous(), x, gates, token_index, pair_flat, offsets, pos, h, u,
            shrink_weight, expand_weight, expand_bias, ctx.code, ctx.scales, need)
        grads[1] = d_x if need[0] else None
        grads[2] = d_gates.to(ctx.dtypes[1]) if need[1] else None
        grads[4] = d_weight if need[2] else None
        grads[5] = d_bias.to(ctx.dtypes[2]) if need[3] else None
        grads[6] = d_expand if need[4] else None
        grads[7] = d_expand_bias if need[5] else None
    return tuple(grads)


grouped_mixture_op.register_autograd(_grouped_backward, setup_context=_grouped_setup)
