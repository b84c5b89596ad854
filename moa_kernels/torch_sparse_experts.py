"""Step 3 of the torch backend's sparse path (torch_ops.moa_linear, on the CPU, for many
tokens and few active pairs): the experts run on their active tokens only.

    SparseExperts   y [T, out] + sum over the active pairs (t, e) of g[t, e] delta_e(x[t]),
                    as a new tensor: per expert, its active rows of x (a RoutingPlan's
                    contiguous slice) gathered into one workspace reused across experts,
                    its shrink and expand, and index_add into a copy of y (sequential:
                    deterministic on the CPU)

FLOPs: 2 N (in + out) r over the N active pairs (r the expert's rank). Bytes (b per
element): x rows gathered once per pair, [N, out] added into y's copy; scratch at most
[max count, in], never [N, in]. Saved: the experts' hiddens [N, r] (through saved-tensor
hooks); the backward re-gathers x instead of saving the gathered rows, and hands its dx
pieces to BaseAndShrink (an InputGradLink), which adds them into the dx it allocates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from moa_kernels.activations import activation_by_name


def _expert_weights(slot, layout, shrink_weight, shrink_bias, expand_weight, expand_bias):
    rows, columns = slice(*slot.shrink), slice(*slot.expand)
    down_bias = None
    if slot.adapter_index is not None:
        down_bias = shrink_bias[slot.shrink[0] - layout.bias_start:
                                slot.shrink[1] - layout.bias_start]
    up_bias = expand_bias[slot.adapter_index] if slot.adapter_index is not None else None
    return rows, columns, shrink_weight[rows], down_bias, expand_weight[:, columns], up_bias


class SparseExperts(torch.autograd.Function):
    """y [T, out] + sum over active pairs (t, e) of g[t, e] delta_e(x[t]), as a new tensor
    (one copy of y, then index_add per expert into the copy; y is never modified).

    Works expert by expert on the plan's contiguous slices. The gathered rows of each expert
    go into one workspace per call, reused across experts: at most [max count, in] of
    scratch, never the [N, in] of all pairs.
    """

    @staticmethod
    def forward(ctx, y, x, shrink_weight, shrink_bias, expand_weight, expand_bias, gates,
                plan, layout, link=None):
        sorted_gates = gates[plan.token_index, plan.expert_index]
        y = y.clone()
        largest = max(plan.counts_host, default=0)
        x_rows = x.new_empty(largest, x.shape[1])
        out_rows = y.new_empty(largest, y.shape[1])
        hiddens = []
        start = 0
        for slot, count in zip(layout.slots, plan.counts_host):
            stop = start + count
            tokens = plan.token_index[start:stop]
            _, _, down, down_bias, up, up_bias = _expert_weights(
                slot, layout, shrink_weight, shrink_bias, expand_weight, expand_bias)
            hidden = F.linear(torch.index_select(x, 0, tokens, out=x_rows[:count]), down,
                              down_bias)
            gate = sorted_gates[start:stop, None]
            u = activation_by_name(slot.activation).function(hidden) * (gate * slot.scaling)
            out = torch.mm(u, up.t(), out=out_rows[:count])
            if up_bias is not None:
                out.addmm_(gate, up_bias[None])
            y.index_add_(0, tokens, out)
            hiddens.append(hidden)
            start = stop
        ctx.plan, ctx.layout, ctx.link = plan, layout, link
        ctx.save_for_backward(x, shrink_weight, shrink_bias, expand_weight, expand_bias,
                              sorted_gates, *hiddens)
        ctx.gates_shape = gates.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, shrink_weight, shrink_bias, expand_weight, expand_bias, sorted_gates, *hiddens = \
            ctx.saved_tensors
        plan, layout, link = ctx.plan, ctx.layout, ctx.link
        if link is not None:
            # A partial backward (inputs= or autograd.grad on expert or router tensors) can
            # stop before BaseAndShrink; its pieces must not leak into the next pass.
            link.pieces = []
        input_grad = ctx.needs_input_grad[1] or (link is not None and x.requires_grad)
        grad_shrink_weight = torch.zeros_like(shrink_weight)
        grad_shrink_bias = torch.zeros_like(shrink_bias)
        # Kept transposed [C, out] so each expert's columns are a contiguous row block.
        grad_expand_weight_t = expand_weight.new_zeros(expand_weight.shape[::-1])
        grad_expand_bias = torch.zeros_like(expand_bias)
        grad_x = torch.zeros_like(x) if input_grad and link is None else None
        sorted_grad_gates = sorted_gates.new_empty(plan.num_pairs)
        largest = max(plan.counts_host, default=0)
        x_rows = x.new_empty(largest, x.shape[1])
        grad_rows = grad_y.new_empty(largest, grad_y.shape[1])
        start = 0
        for slot, count, hidden in zip(layout.slots, plan.counts_host, hiddens):
            stop = start + count
            tokens = plan.token_index[start:stop]
            rows, columns, down, _, up, up_bias = _expert_weights(
                slot, layout, shrink_weight, shrink_bias, expand_weight, expand_bias)
            grad_out = torch.index_select(grad_y, 0, tokens, out=grad_rows[:count])
            gate = sorted_gates[start:stop, None]
            activated = activation_by_name(slot.activation).function(hidden)
            grad_activated_scaled = grad_out @ up  # d loss / d (gate * scaling * act)
            grad_expand_weight_t[columns].addmm_(activated.t() * (gate.t() * slot.scaling),
                                                 grad_out)
            grad_gate = (grad_activated_scaled * activated).sum(1) * slot.scaling
            if up_bias is not None:
                grad_gate += grad_out @ up_bias
                grad_expand_bias[slot.adapter_index] += grad_out.t() @ gate[:, 0]
            sorted_grad_gates[start:stop] = grad_gate
            grad_hidden = activation_by_name(slot.activation).derivative(
                grad_activated_scaled * (gate * slot.scaling), hidden)
            x_slice = torch.index_select(x, 0, tokens, out=x_rows[:count])
            grad_shrink_weight[rows].addmm_(grad_hidden.t(), x_slice)
            if slot.adapter_index is not None:
                grad_shrink_bias[slot.shrink[0] - layout.bias_start:
                                 slot.shrink[1] - layout.bias_start] += grad_hidden.sum(0)
            if input_grad and link is not None:
                link.pieces.append((tokens, grad_hidden, down))
            elif input_grad:
                grad_x.index_add_(0, tokens, torch.mm(grad_hidden, down, out=x_rows[:count]))
            start = stop
        grad_gates = sorted_gates.new_zeros(ctx.gates_shape)
        grad_gates[plan.token_index, plan.expert_index] = sorted_grad_gates
        return (grad_y, grad_x, grad_shrink_weight, grad_shrink_bias, grad_expand_weight_t.t(),
                grad_expand_bias, grad_gates, None, None, None)
