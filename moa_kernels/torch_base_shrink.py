"""Step 1 of the torch backend (torch_ops.moa_linear): the GEMMs over x, for the base and
for the stacked shrink rows (every expert's A / W_down and the router's first layer).

    stack_rows(pieces, dtype)        weight blocks (or bias pieces and counts of zero rows)
                                     stacked in one cat, per call
    split_rows(grad, layout, needs)  the gradient of a stack split back into its pieces
    stacked_linear(x, W blocks, bias pieces, splits)
                                     x @ [W_1; ...; W_n]^T + b as one GEMM, its output
                                     returned as separate [T, split] tensors
    BaseAndShrink                    (x [T, in]) -> (x Wb^T + bb [T, out], the splits of
                                     x @ W^T + b [T, S]): two GEMMs that share the saved x
    InputGradLink                    carries the sparse experts' dx pieces into
                                     BaseAndShrink's backward (one dx buffer, no add pass)

FLOPs and bytes (T tokens, S stacked rows, b bytes per element): forward 2 T in (out + S)
FLOPs, x read once per GEMM, y [T, out] and h [T, S] written; saved: x [T, in] (or an
InputRecipe's tensors) and the stacked W [S, in]. Backward: dx = dy Wb + dh W as one GEMM
and one in-place addmm into it (no [T, in] sum pass); dW = dh^T x split into the blocks;
db the column sums of dh.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from moa_kernels.autograd_apply import apply_function

# Blocks of zeros standing in for absent biases in a stacked bias, per (rows, dtype,
# device): constants, never written (a cat copies them).
_ZEROS: dict[tuple, torch.Tensor] = {}


def _zeros(rows: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (rows, dtype, device)
    zeros = None if torch.compiler.is_compiling() else _ZEROS.get(key)
    if zeros is None:
        zeros = torch.zeros(rows, dtype=dtype, device=device)
        if not torch.compiler.is_compiling():
            _ZEROS[key] = zeros
    return zeros


def stack_rows(pieces, dtype: torch.dtype) -> torch.Tensor:
    """The pieces stacked along rows in `dtype` (one cat; a single piece already in dtype
    as it is): tensors [r_i, ...] (cast) and, for a 1-D stack, counts of zero rows (absent
    biases). No graph: for autograd Functions' forwards, whose backward splits the gradient
    (`split_rows`) and reuses the stack saved by the forward, and for no-grad calls.

    Made once per call, not kept across calls by parameter version: the version counter
    does not see every change of a parameter (`tensor.data` writes, as DeepSpeed's
    optimizers make them; FSDP2's all-gather into the unsharded parameters preserves their
    versions), and a stale stack would train silently wrong."""
    tensors = [p for p in pieces if isinstance(p, torch.Tensor)]
    if len(pieces) == 1 and tensors and tensors[0].dtype == dtype:
        return tensors[0]
    device = tensors[0].device
    return torch.cat([p.to(dtype) if isinstance(p, torch.Tensor) else _zeros(p, dtype, device)
                      for p in pieces])


def _piece_layout(pieces) -> tuple[tuple[int, torch.dtype | None], ...]:
    """(rows, dtype) of each piece, dtype None for a count of zero rows."""
    return tuple((p.shape[0], p.dtype) if isinstance(p, torch.Tensor) else (p, None)
                 for p in pieces)


def split_rows(grad: torch.Tensor, layout, needs) -> list[torch.Tensor | None]:
    """The rows of grad [S, ...] of each piece (`_piece_layout`) that is a tensor whose
    `needs` entry is true, in its dtype (views where the dtype matches); None elsewhere."""
    result, start = [], 0
    for (rows, dtype), wanted in zip(layout, needs):
        result.append(grad[start:start + rows].to(dtype) if dtype is not None and wanted
                      else None)
        start += rows
    return result


def _has_bias(pieces) -> bool:
    return any(isinstance(p, torch.Tensor) for p in pieces)


def _grad_of_outputs(grads, splits, tokens: int, like: torch.Tensor) -> torch.Tensor:
    """The gradient [T, S] of the whole GEMM output from its split outputs' (zeros, like
    `like`, for None)."""
    if len(grads) == 1 and grads[0] is not None:
        return grads[0]
    return torch.cat([g if g is not None else like.new_zeros(tokens, size)
                      for g, size in zip(grads, splits)], dim=1)


def stacked_linear(x: torch.Tensor, weights, bias_pieces, splits) -> tuple[torch.Tensor, ...]:
    """x @ [W_1; ...; W_n]^T + b as one GEMM over the stacked blocks, its output [T, S]
    returned as separate tensors of `splits` columns each (so their gradients need no
    slicing back into one).

    Args:
        x: [T, in]; weights: the blocks W_i [r_i, in] (parameters, any float dtype: stacked
            in x's dtype, `stack_rows`); bias_pieces: the bias over the same S rows, as
            tensors and counts of zero rows; splits: column counts summing to S.
    Returns:
        a tuple of [T, split] tensors in x's dtype.
    """
    return apply_function(_StackedLinear, x, tuple(splits), len(weights), *weights, *bias_pieces)


class _StackedLinear(torch.autograd.Function):
    """(x [T, in], splits, n, W_1 .. W_n, bias pieces) -> the splits of x W^T + b; saves x
    and the stacked W (backward: dx = dh W, dW = dh^T x split into the blocks, db = the
    column sums of dh)."""

    @staticmethod
    def traced(x, splits, count, *pieces):
        weights, bias_pieces = pieces[:count], pieces[count:]
        weight = torch.cat([w.to(x.dtype) for w in weights])
        bias = None
        if _has_bias(bias_pieces):
            bias = torch.cat([p.to(x.dtype) if isinstance(p, torch.Tensor) else
                              x.new_zeros(p) for p in bias_pieces])
        return F.linear(x, weight, bias).split(list(splits), dim=1)

    @staticmethod
    def forward(ctx, x, splits, count, *pieces):
        weights, bias_pieces = pieces[:count], pieces[count:]
        weight = stack_rows(weights, x.dtype)
        bias = stack_rows(bias_pieces, x.dtype) if _has_bias(bias_pieces) else None
        ctx.save_for_backward(x, weight)
        ctx.splits, ctx.count, ctx.piece_layout = splits, count, _piece_layout(pieces)
        ctx.set_materialize_grads(False)  # an unused split's gradient: zeros only if needed
        return F.linear(x, weight, bias).split(list(splits), dim=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        if all(g is None for g in grads):  # (grads are not materialised: nothing used)
            return (None,) * (3 + len(ctx.piece_layout))
        x, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_h = _grad_of_outputs(grads, ctx.splits, x.shape[0], x)
        grad_x = grad_h @ weight if needs[0] else None
        return (grad_x, None, None, *_piece_grads(ctx, grad_h, x, needs[3:]))


def _piece_grads(ctx, grad_h, x, needs) -> list:
    """The gradients of the weight blocks, then of the bias pieces, from dh [T, S]."""
    count, layout = ctx.count, ctx.piece_layout
    grads = [None] * len(layout)
    if x is not None and any(needs[:count]):
        grads[:count] = split_rows(grad_h.t() @ x, layout[:count], needs[:count])
    if any(needs[count:]):
        grads[count:] = split_rows(grad_h.sum(0), layout[count:], needs[count:])
    return grads


class InputGradLink:
    """Carries the sparse experts' input-gradient pieces from `SparseExperts.backward` to
    `BaseAndShrink.backward` (which autograd always runs later: its outputs feed the
    experts). pieces: (token_index [n], grad_hidden [n, r], shrink rows [r, in]) per expert.
    """

    def __init__(self) -> None:
        self.pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add_into(self, grad_x: torch.Tensor) -> None:
        if self.pieces:
            workspace = grad_x.new_empty(max(t.numel() for t, _, _ in self.pieces),
                                         grad_x.shape[1])
            for tokens, grad_hidden, down in self.pieces:
                rows = torch.mm(grad_hidden, down, out=workspace[:tokens.numel()])
                grad_x.index_add_(0, tokens, rows)
        self.pieces = []


class BaseAndShrink(torch.autograd.Function):
    """(x [T, in]) -> (base(x) [T, out], the splits of x @ W^T + b [T, S]), W and b the
    stacked blocks (`stacked_linear`'s arguments: splits, count, weight blocks, bias pieces).

    Saves x, or with an `InputRecipe` its tensors (x is then recomputed in the backward, and
    only where a weight gradient needs it: dx needs no x), and the stacked W."""

    @staticmethod
    def traced(x, base_weight, base_bias, link, recipe, splits, count, *pieces):
        return (F.linear(x, base_weight, base_bias),
                *_StackedLinear.traced(x, splits, count, *pieces))

    @staticmethod
    def forward(ctx, x, base_weight, base_bias, link, recipe, splits, count, *pieces):
        weights, bias_pieces = pieces[:count], pieces[count:]
        weight = stack_rows(weights, x.dtype)
        bias = stack_rows(bias_pieces, x.dtype) if _has_bias(bias_pieces) else None
        if recipe is None:
            ctx.save_for_backward(x, base_weight, weight)
        else:
            ctx.save_for_backward(None, base_weight, weight, *recipe.tensors)
            ctx.recompute, ctx.x_shape = recipe.function, x.shape
        ctx.link, ctx.splits, ctx.count = link, splits, count
        ctx.piece_layout = _piece_layout(pieces)
        ctx.set_materialize_grads(False)
        ctx.has_base_bias = base_bias is not None
        return (F.linear(x, base_weight, base_bias),
                *F.linear(x, weight, bias).split(list(splits), dim=1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, *grads_h):
        if grad_y is None and all(g is None for g in grads_h):
            return (None,) * (7 + len(ctx.piece_layout))
        x, base_weight, weight, *recipe_tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if x is None and (needs[1] or any(needs[7:7 + ctx.count])):
            x = ctx.recompute(*recipe_tensors).reshape(ctx.x_shape)
        grad_x = grad_base_weight = grad_base_bias = None
        tokens = grad_y.shape[0] if grad_y is not None else \
            next(g.shape[0] for g in grads_h if g is not None)
        grad_h = _grad_of_outputs(grads_h, ctx.splits, tokens, weight)
        if needs[0]:
            # The big GEMM allocates dx; the skinny one accumulates into it in place.
            if grad_y is not None:
                grad_x = grad_y @ base_weight
                grad_x.addmm_(grad_h, weight)
            else:
                grad_x = grad_h @ weight
            if ctx.link is not None:
                ctx.link.add_into(grad_x)
        if grad_y is not None and needs[1]:
            grad_base_weight = grad_y.t() @ x
        if grad_y is not None and needs[2] and ctx.has_base_bias:
            grad_base_bias = grad_y.sum(0)
        return (grad_x, grad_base_weight, grad_base_bias, None, None, None, None,
                *_piece_grads(ctx, grad_h, x, needs[7:]))
