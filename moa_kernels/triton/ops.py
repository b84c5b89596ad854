"""The autograd glue: each kernel family as a torch.library custom op (moa::...), with a
fake implementation for tracing and a registered backward that calls its own custom op.

    moa::shrink          x [T, in], W [S, in], b [S]?         -> h [T, S] fp32
    moa::grouped_shrink  x, W [R, in], b [R], plan of groups  -> H [T, R] fp32
    moa::gated_expand    y [T, out], h [T, R], g [T, E], ...   -> y + sum_e g_e delta_e

torch.compile sees three opaque ops (and their backward ops) instead of Triton launches,
so it traces a model using them without graph breaks; eager mode pays one Python
dispatch per op.
"""

from typing import Optional

import torch

from moa_kernels.triton import expand, shrink, sparse
from moa_kernels.triton.plan import PairList

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------
# dense shrink
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("moa::shrink", mutates_args=())
def shrink_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:  # noqa: UP045
    return shrink.shrink_forward(x, weight, bias)


@shrink_op.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@torch.library.custom_op("moa::shrink_backward", mutates_args=())
def shrink_backward_op(grad: Tensor, x: Tensor, weight: Tensor, need_x: bool,
                       need_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    return shrink.shrink_backward(grad, x, weight, need_x, need_weight)


@shrink_backward_op.register_fake
def _(grad, x, weight, need_x, need_weight):
    return _fake_shrink_grads(grad, x, weight, need_x, need_weight)


def _fake_shrink_grads(grad, x, weight, need_x, need_weight):
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    dw = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    db = grad.new_empty(weight.shape[0] if need_weight else 0)
    return dx, dw, db


def _shrink_setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _shrink_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = shrink_backward_op(grad.contiguous(), x, weight, need_x, need_w or need_b)
    return (dx if need_x else None, dw if need_w else None,
            db.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None)


shrink_op.register_autograd(_shrink_backward, setup_context=_shrink_setup)


# ---------------------------------------------------------------------------------------
# grouped (sparse) shrink
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("moa::grouped_shrink", mutates_args=())
def grouped_shrink_op(x: Tensor, weight: Tensor, bias: Tensor, token_index: Tensor,
                      offsets: Tensor, active: Tensor, group_meta: Tensor,
                      max_rank: int) -> Tensor:
    return sparse.grouped_shrink_forward(x, weight, bias, PairList(token_index, offsets, active),
                                         group_meta, max_rank)


@grouped_shrink_op.register_fake
def _(x, weight, bias, token_index, offsets, active, group_meta, max_rank):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)


@torch.library.custom_op("moa::grouped_shrink_backward", mutates_args=())
def grouped_shrink_backward_op(grad: Tensor, x: Tensor, weight: Tensor, token_index: Tensor,
                               offsets: Tensor, active: Tensor, group_meta: Tensor,
                               max_rank: int, need_x: bool, need_weight: bool
                               ) -> tuple[Tensor, Tensor, Tensor]:
    return sparse.grouped_shrink_backward(grad, x, weight,
                                          PairList(token_index, offsets, active), group_meta,
                                          max_rank, need_x, need_weight)


@grouped_shrink_backward_op.register_fake
def _(grad, x, weight, token_index, offsets, active, group_meta, max_rank, need_x,
      need_weight):
    return _fake_shrink_grads(grad, x, weight, need_x, need_weight)


def _grouped_setup(ctx, inputs, output):
    x, weight, bias, token_index, offsets, active, group_meta, max_rank = inputs
    ctx.save_for_backward(x, weight, token_index, offsets, active, group_meta)
    ctx.max_rank, ctx.bias_dtype = max_rank, bias.dtype


def _grouped_backward(ctx, grad):
    x, weight, token_index, offsets, active, group_meta = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx, dw, db = grouped_shrink_backward_op(grad.contiguous(), x, weight, token_index,
                                            offsets, active, group_meta, ctx.max_rank,
                                            need_x, need_w or need_b)
    return (dx if need_x else None, dw if need_w else None,
            db.to(ctx.bias_dtype) if need_b else None, None, None, None, None, None)


grouped_shrink_op.register_autograd(_grouped_backward, setup_context=_grouped_setup)


# ---------------------------------------------------------------------------------------
# gated expand
# ---------------------------------------------------------------------------------------

@torch.library.custom_op("moa::gated_expand", mutates_args=())
def gated_expand_op(y: Tensor, hidden: Tensor, gates: Tensor, expand_weight: Tensor,
                    expand_bias: Tensor, expert_meta: Tensor, expert_scale: Tensor,
                    group_meta: Tensor, max_rank: int, active: Optional[Tensor],  # noqa: UP045
                    token_index: Optional[Tensor], offsets: Optional[Tensor]  # noqa: UP045
                    ) -> Tensor:
    return expand.gated_expand_forward(y, hidden, gates, expand_weight, expand_bias,
                                       expert_meta, expert_scale, active)


@gated_expand_op.register_fake
def _(y, hidden, gates, expand_weight, expand_bias, expert_meta, expert_scale, group_meta,
      max_rank, active, token_index, offsets):
    return torch.empty_like(y)


@torch.library.custom_op("moa::gated_expand_backward", mutates_args=())
def gated_expand_backward_op(grad: Tensor, hidden: Tensor, gates: Tensor, expand_weight: Tensor,
                             expand_bias: Tensor, expert_meta: Tensor, expert_scale: Tensor,
                             group_meta: Tensor, max_rank: int,
                             active: Optional[Tensor],  # noqa: UP045
                             token_index: Optional[Tensor],  # noqa: UP045
                             offsets: Optional[Tensor]  # noqa: UP045
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return expand.gated_expand_backward(grad, hidden, gates, expand_weight, expand_bias,
                                        expert_meta, expert_scale, group_meta, max_rank,
                                        active, token_index, offsets)


@gated_expand_backward_op.register_fake
def _(grad, hidden, gates, expand_weight, expand_bias, expert_meta, expert_scale, group_meta,
      max_rank, active, token_index, offsets):
    return (hidden.new_empty(hidden.shape, dtype=torch.float32),
            gates.new_empty(gates.shape, dtype=torch.float32), torch.empty_like(expand_weight),
            torch.empty_like(expand_bias))


def _expand_setup(ctx, inputs, output):
    (y, hidden, gates, expand_weight, expand_bias, expert_meta, expert_scale, group_meta,
     max_rank, active, token_index, offsets) = inputs
    ctx.save_for_backward(hidden, gates, expand_weight, expand_bias, expert_meta,
                          expert_scale, group_meta, active, token_index, offsets)
    ctx.max_rank, ctx.hidden_dtype, ctx.gates_dtype = max_rank, hidden.dtype, gates.dtype


def _expand_backward(ctx, grad):
    (hidden, gates, expand_weight, expand_bias, expert_meta, expert_scale, group_meta, active,
     token_index, offsets) = ctx.saved_tensors
    grads = [None] * 12
    needs = ctx.needs_input_grad
    if not any(needs[1:5]):
        return grad, *grads[1:]
    d_hidden, d_gates, d_weight, d_bias = gated_expand_backward_op(
        grad.contiguous(), hidden, gates, expand_weight, expand_bias, expert_meta,
        expert_scale, group_meta, ctx.max_rank, active, token_index, offsets)
    grads[0] = grad if needs[0] else None
    grads[1] = d_hidden.to(ctx.hidden_dtype) if needs[1] else None
    grads[2] = d_gates.to(ctx.gates_dtype) if needs[2] else None
    grads[3] = d_weight if needs[3] else None
    grads[4] = d_bias if needs[4] else None
    return tuple(grads)


gated_expand_op.register_autograd(_expand_backward, setup_context=_expand_setup)
