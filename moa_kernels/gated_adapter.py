"""The parallel adapter's fused op (docs/DESIGN.md section 4): out + g * adapter(x) as an
autograd Function that saves little. T tokens, M input and N output features, K the
bottleneck.

`gated_adapter(out, x, gate, W_down, b_down, W_up, b_up, activation)`:
  forward: h = x W_down^T + b_down [T, K]; y = out + (act(h) * g) W_up^T (one GEMM with out
           as its addend), then y += g b_up in place (y is this op's own tensor).
  saves:   x [T, M] (the only big one: d W_down = dh^T x needs it), h, act(h) and
           act(h) g [T, K] each (K is small: two launches fewer than recomputing them),
           g [T, 1]; with an `InputRecipe` (moa.modules.parallel_adapter: x is a norm's
           output) the recipe's tensors instead of x, recomputed in the backward.
  backward: G = dy W_up [T, K]; dg = <G, act(h)> + dy . b_up; d W_up = dy^T (act(h) g),
           d b_up = dy^T g; dh = G * g * act'(h): act' is recomputed from h, and the
           adapter's output W_up act(h) + b_up [T, N] is never stored (dg needs only G).
Without grad mode the forward runs directly (decoding: no autograd bookkeeping); under
torch.compile its `traced` twin (plain ops: the compiler derives the backward and picks
what to save), as in moa_kernels/torch_ops.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moa_kernels.activations import activation_by_name
from moa_kernels.autograd_apply import InputRecipe, apply_function
from moa_kernels.fusable import fusable_addmm, fusable_linear
from moa_kernels.torch_gated_expand import row_dot


def gated_adapter(out: torch.Tensor, x: torch.Tensor, gate: torch.Tensor,
                  down_weight: torch.Tensor, down_bias: torch.Tensor, up_weight: torch.Tensor,
                  up_bias: torch.Tensor, activation: str,
                  input_recipe: InputRecipe | None = None) -> torch.Tensor:
    """out + g * (W_up act(W_down x + b_down) + b_up), a new tensor.

    Args:
        out: [..., N] what the adapter's output is added to (any float dtype).
        x: [..., M] the adapter input; gate: [..., 1]; down_weight [K, M], down_bias [K],
            up_weight [N, K], up_bias [N]: all in one compute dtype.
        activation: a name in moa_kernels.activations' table.
        input_recipe: how x is recomputed bitwise (any shape of x's numel): then its tensors
            are saved instead of x, and x is recomputed in the backward for d W_down.
    Returns:
        [..., N] in out's dtype.
    """
    leading = out.shape[:-1]
    y = apply_function(_GatedAdapter, out.reshape(-1, out.shape[-1]),
                       x.reshape(-1, x.shape[-1]), gate.reshape(-1, 1), down_weight,
                       down_bias, up_weight, up_bias, activation, input_recipe)
    return y.reshape(*leading, out.shape[-1])


class _GatedAdapter(torch.autograd.Function):
    """(out [T, N], x [T, M], gate [T, 1], weights) -> out + gated adapter output [T, N]."""

    @staticmethod
    def traced(out, x, gate, down_weight, down_bias, up_weight, up_bias, activation,
               recipe=None):
        hidden = fusable_linear(x, down_weight, down_bias)
        gated = activation_by_name(activation).function(hidden) * gate
        # decoding: a reduction fused with the gating before and the add into out after
        return out + fusable_addmm(gate * up_bias, gated, up_weight).to(out.dtype)

    @staticmethod
    def forward(ctx, out, x, gate, down_weight, down_bias, up_weight, up_bias, activation,
                recipe=None):
        hidden = F.linear(x, down_weight, down_bias)
        activated = activation_by_name(activation).function(hidden)
        gated = activated * gate
        if out.dtype == gated.dtype:
            y = torch.addmm(out, gated, up_weight.t()).addcmul_(gate, up_bias)
        else:
            y = out + torch.addmm(gate * up_bias, gated, up_weight.t()).to(out.dtype)
        ctx.activation = activation
        if recipe is None:
            ctx.save_for_backward(x, gate, hidden, activated, gated, down_weight, up_weight,
                                  up_bias)
        else:
            ctx.save_for_backward(None, gate, hidden, activated, gated, down_weight, up_weight,
                                  up_bias, *recipe.tensors)
            ctx.recompute, ctx.x_shape = recipe.function, x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, gate, hidden, activated, gated, down_weight, up_weight, up_bias, *recipe_tensors = \
            ctx.saved_tensors
        activation = ctx.activation
        grad = grad_y.to(hidden.dtype)
        grad_activated_gated = grad @ up_weight  # G = dy W_up [T, K]
        # dg = <G, act(h)> + dy . b_up per token: a batched dot, then dy b_up added
        grad_gate = torch.addmv(row_dot(grad_activated_gated, activated), grad, up_bias)
        grad_gate = grad_gate[:, None]
        grad_up_weight = grad.t() @ gated
        grad_up_bias = grad.t() @ gate[:, 0]
        grad_hidden = activation_by_name(activation).derivative(grad_activated_gated * gate,
                                                                 hidden)
        needs = ctx.needs_input_grad
        grad_x = grad_hidden @ down_weight if needs[1] else None
        grad_down_weight = None
        if needs[3]:
            if x is None:
                x = ctx.recompute(*recipe_tensors).reshape(ctx.x_shape)
            grad_down_weight = grad_hidden.t() @ x
        grad_down_bias = grad_hidden.sum(0) if needs[4] else None
        return (grad_y, grad_x, grad_gate, grad_down_weight, grad_down_bias, grad_up_weight,
                grad_up_bias, None, None)


