"""The prompt expert's fused ops (docs/DESIGN.md section 4): the prompt attention added to
the o_proj input, as autograd Functions that save little. H heads of D, L prompt tokens.

`prompt_attention(x, q, keys, values, gate)`:
  forward: o = softmax(q keys^T) values [B, H, S, D] (one fused attention call; keys
           pre-scaled by D^-0.5, values gated per head); y = x + g * o laid out as x
           [B, S, H * D].
  saves:   q [B, H, S, D] (d keys = dS^T q needs it; moa.modules.prompt passes the
           attention kernel's own saved query, so it costs nothing), g [B, S, 1] and the
           [H, L, D] keys and values. `prompt_attention_recipe` recomputes y for o_proj,
           which then saves no [B, S, H * D] input of its own.
  backward: P = softmax(q keys^T) [B, H, S, L] and o = P values are recomputed (L-long dot
           products), so neither o, its [B, S, H * D] copy nor P is stored;
           dP = g dy values^T, dS = P (dP - <dP, P>).
`prompt_expert(x, q, gate, prompt, head_gate, k and v projections)`: the same with the
prompt's keys and values made inside (one op for a training step).
Without grad mode the forwards run directly (decoding: no autograd bookkeeping); under
torch.compile their `traced` twins (plain ops: the compiler derives the backward and picks
what to save), as in moa_kernels/torch_ops.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moa_kernels.autograd_apply import InputRecipe, apply_function
from moa_kernels.fusable import fusable_attention


def prompt_attention(x: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + g * concat_h softmax(q_h keys_h^T) values_h, a new tensor.

    Args:
        x: [B, S, H * D] what the prompt output is added to (the o_proj input).
        query: [B, H, S, D] the attention's post-rotary query, in the compute dtype.
        keys: [H, L, D] the prompt keys times D^-0.5, or [B, H, L, D] (the same expanded
            over the batch); values: the prompt values times the per-head gate, shaped as
            keys; gate: [B, S, 1] the router's prompt gate.
    Returns:
        [B, S, H * D] in x's dtype.
    """
    return apply_function(_PromptAttentionOverKeys, x, query, keys, values, gate)


def prompt_expert(x: torch.Tensor, query: torch.Tensor, gate: torch.Tensor,
                  prompt: torch.Tensor, head_gate: torch.Tensor, k_weight: torch.Tensor,
                  k_bias: torch.Tensor | None, v_weight: torch.Tensor,
                  v_bias: torch.Tensor | None, kv_heads: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x + g * prompt attention, the prompt's keys and values made inside: one op for the
    whole prompt expert of a training step (`prompt_attention` takes keys and values made
    outside, as decoding keeps them over a generate call).

    Args:
        x: [B, S, H * D] the o_proj input; query: [B, H, S, D] the post-rotary query, in the
            compute dtype; gate: [B, S, 1] the router's prompt gate, in the compute dtype.
        prompt: [L, hidden] the prompt vectors; head_gate: [H] the per-head gate; k_weight,
            v_weight: [KV * D, hidden] and k_bias, v_bias: [KV * D] or None, the frozen key
            and value projections (any float dtype: cast to the query's).
        kv_heads: KV (query head h reads KV head h // (H / KV)).
    Returns:
        (y [B, S, H * D] in x's dtype, keys [H, L, D] times D^-0.5, values [H, L, D] times
        the head gate): keys and values carry no gradient; with x, query and gate they
        recompute y bitwise (`prompt_attention_recipe`).
    """
    return apply_function(_PromptAttention, x, query, gate, prompt, head_gate, k_weight,
                          k_bias, v_weight, v_bias, kv_heads)


def prompt_attention_recipe(x: torch.Tensor, query: torch.Tensor, keys: torch.Tensor,
                            values: torch.Tensor, gate: torch.Tensor) -> InputRecipe:
    """How `prompt_attention(x, query, keys, values, gate)`'s output is recomputed bitwise
    (the same ops on the same tensors), for the o_proj that reads it: x is the attention
    kernel's own output and the query its own saved query (moa.modules.prompt), so saving these
    instead of the output costs nothing."""
    return InputRecipe(_prompt_output, (x, query, keys, values, gate))


def _prompt_output(x, query, keys, values, gate):
    batch, heads, tokens, head_dim = query.shape
    out = F.scaled_dot_product_attention(query, _batched(keys, batch),
                                         _batched(values, batch), scale=1.0)
    out = out.transpose(1, 2)  # [B, S, H, D] (a view)
    x4 = x.reshape(batch, tokens, heads, head_dim)
    if x.dtype == query.dtype:
        y = torch.addcmul(x4, gate[..., None], out)
    else:
        y = x4 + (gate[..., None] * out).to(x.dtype)
    return y.reshape(batch, tokens, heads * head_dim)



# the prompt attention
# ---------------------------------------------------------------------------------------

# The scale tensors [KV, G, 1, 1] of the prompt keys (D^-0.5 for each of the G query heads
# that read a KV head: multiplying by it repeats and scales in one op, its strides making
# the product's layout [H, L, D]), kept per (KV, G, D, dtype, device): constants, never
# written.
_KEY_SCALES: dict[tuple, torch.Tensor] = {}


def _key_scale(kv_heads: int, groups: int, head_dim: int, like: torch.Tensor) -> torch.Tensor:
    key = (kv_heads, groups, head_dim, like.dtype, like.device)
    scale = None if torch.compiler.is_compiling() else _KEY_SCALES.get(key)
    if scale is None:
        scale = torch.full((kv_heads, groups, 1, 1), head_dim ** -0.5, dtype=like.dtype,
                           device=like.device)
        if not torch.compiler.is_compiling():
            _KEY_SCALES[key] = scale
    return scale


def prompt_keys_values(prompt: torch.Tensor, head_gate: torch.Tensor, k_weight: torch.Tensor,
                       k_bias: torch.Tensor | None, v_weight: torch.Tensor,
                       v_bias: torch.Tensor | None, kv_heads: int, heads: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys [H, L, D] times D^-0.5, values [H, L, D] times the head gate, the values
    [L, KV * D] before it) for prompt [L, hidden], all in one dtype: four ops (two GEMMs,
    two broadcasting products that also repeat the KV heads)."""
    length, groups = prompt.shape[0], heads // kv_heads
    keys = F.linear(prompt, k_weight, k_bias)
    values = F.linear(prompt, v_weight, v_bias)
    head_dim = keys.shape[1] // kv_heads

    def per_kv_head(t):  # [L, KV * D] -> [KV, 1, L, D] (a view)
        return t.view(length, kv_heads, head_dim).transpose(0, 1).unsqueeze(1)

    gate = head_gate.view(kv_heads, groups, 1, 1)
    keys = (_key_scale(kv_heads, groups, head_dim, keys) * per_kv_head(keys)).reshape(
        heads, length, head_dim)
    gated = (gate * per_kv_head(values)).reshape(heads, length, head_dim)
    return keys, gated, values


def _batched(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    return tensor if tensor.dim() == 4 else tensor.expand(batch, -1, -1, -1)


class _PromptAttentionOverKeys(torch.autograd.Function):
    """(x [B, S, H * D], q [B, H, S, D], keys, values [H, L, D] or [B, H, L, D], gate
    [B, S, 1]) -> x + g * prompt attention output, laid out as x."""

    @staticmethod
    def traced(x, query, keys, values, gate):
        batch, heads, tokens, head_dim = query.shape
        out = fusable_attention(query, _batched(keys, batch), _batched(values, batch))
        out = (gate[..., None] * out.transpose(1, 2)).to(x.dtype)
        return x + out.reshape(batch, tokens, heads * head_dim)

    @staticmethod
    def forward(ctx, x, query, keys, values, gate):
        ctx.save_for_backward(query, keys, values, gate)
        return _prompt_output(x, query, keys, values, gate)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        query, keys, values, gate = ctx.saved_tensors
        if keys.dim() == 3:  # [H, L, D], shared by the batch
            return (grad_y, *_attention_grads(grad_y, query, keys, values, gate,
                                              ctx.needs_input_grad[1]))
        batch, heads, tokens, head_dim = query.shape  # keys and values [B, H, L, D]
        probs = torch.softmax(query @ keys.transpose(2, 3), dim=-1)  # [B, H, S, L]
        grad_out = grad_y.to(query.dtype).reshape(batch, tokens, heads, head_dim)
        grad_out = grad_out.transpose(1, 2)  # [B, H, S, D]
        grad_gate = (grad_out * (probs @ values)).sum(dim=(1, 3))[..., None]  # [B, S, 1]
        grad_out = grad_out * gate[:, None]  # d loss / d o
        grad_values = probs.transpose(2, 3) @ grad_out  # [B, H, L, D]
        grad_probs = grad_out @ values.transpose(2, 3)  # [B, H, S, L]
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(-1, keepdim=True))
        grad_query = grad_scores @ keys
        grad_keys = grad_scores.transpose(2, 3) @ query
        return grad_y, grad_query, grad_keys, grad_values, grad_gate


class _PromptAttention(torch.autograd.Function):
    """(x, query, gate, prompt, head_gate, k_weight, k_bias, v_weight, v_bias, kv_heads) ->
    (x + g * prompt attention output, keys, gated values); see `prompt_expert`.

    Saves the query (the attention kernel's own, shared), the gate, the prompt and the
    projections, and the [H, L, D] keys and values. The backward works per head over all
    B * S query rows at once ([H, B * S, D], a view of the query's [B, S, H, D] memory):
    P = softmax(q keys^T) and o = P values recomputed, dg = <dy, o>, do = g dy,
    d values = P^T do, dS = softmax'(do values^T), dq = dS keys, d keys = dS^T q; then the
    head gate's and the prompt's gradients through the repeat and the two projections."""

    @staticmethod
    def traced(x, query, gate, prompt, head_gate, k_weight, k_bias, v_weight, v_bias,
               kv_heads):
        dtype = query.dtype
        keys, values, _ = prompt_keys_values(
            prompt.to(dtype), head_gate.to(dtype), k_weight.to(dtype),
            None if k_bias is None else k_bias.to(dtype), v_weight.to(dtype),
            None if v_bias is None else v_bias.to(dtype), kv_heads, query.shape[1])
        y = _PromptAttentionOverKeys.traced(x, query, keys, values, gate)
        return y, keys.detach(), values.detach()

    @staticmethod
    def forward(ctx, x, query, gate, prompt, head_gate, k_weight, k_bias, v_weight, v_bias,
                kv_heads):
        dtype = query.dtype
        cast = [t if t is None or t.dtype == dtype else t.to(dtype)
                for t in (prompt, head_gate, k_weight, k_bias, v_weight, v_bias)]
        keys, values, ungated = prompt_keys_values(*cast, kv_heads, query.shape[1])
        y = _prompt_output(x, query, keys, values, gate)
        prompt_c, head_gate_c, k_weight_c, _, v_weight_c, _ = cast
        ctx.save_for_backward(query, gate, prompt_c, head_gate_c, k_weight_c, v_weight_c,
                              keys, values, ungated)
        ctx.kv_heads = kv_heads
        ctx.dtypes = (prompt.dtype, head_gate.dtype, k_weight.dtype,
                      None if k_bias is None else k_bias.dtype, v_weight.dtype,
                      None if v_bias is None else v_bias.dtype)
        ctx.mark_non_differentiable(keys, values)
        ctx.set_materialize_grads(False)  # (no zeros made for the keys' and values' grads)
        return y, keys, values

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, _grad_keys, _grad_values):
        if grad_y is None:  # (grads are not materialised: y unused)
            return (None,) * 10
        query, gate, prompt, head_gate, k_weight, v_weight, keys, values, ungated = \
            ctx.saved_tensors
        needs = ctx.needs_input_grad
        heads, length, head_dim = keys.shape
        kv_heads = ctx.kv_heads
        grad_query, grad_keys, grad_values, grad_gate = _attention_grads(
            grad_y, query, keys, values, gate, needs[1])
        grads = [None] * 6  # prompt, head gate, k weight, k bias, v weight, v bias
        if any(needs[3:9]):
            grads = _prompt_parameter_grads(
                needs[3:9], grad_keys, grad_values, prompt, head_gate, k_weight, v_weight,
                ungated, kv_heads, heads // kv_heads, length, head_dim)
            grads = [None if g is None else g.to(dtype)
                     for g, dtype in zip(grads, ctx.dtypes)]
        return (grad_y, grad_query, grad_gate if needs[2] else None, *grads, None)


def _attention_grads(grad_y, query, keys, values, gate, need_query: bool):
    """(d query or None, d keys, d values, d gate) of y = x + g * softmax(q keys^T) values
    laid out as x [B, S, H * D], for keys and values [H, L, D] shared by the batch. Per
    head over every query row at once ([H, B * S, D]: views of the [B, S, H, D] memory of
    the rotary's query and of dy): P and o = P values recomputed (L-long dot products),
    dg = <dy, o>, do = g dy, d values = P^T do, dS = softmax'(do values^T),
    dq = dS keys, d keys = dS^T q."""
    batch, heads, tokens, head_dim = query.shape
    rows = batch * tokens
    q = query.permute(1, 0, 2, 3).reshape(heads, rows, head_dim)
    dy = grad_y.to(query.dtype).reshape(batch, tokens, heads, head_dim)
    dy = dy.permute(2, 0, 1, 3).reshape(heads, rows, head_dim)
    probs = torch.softmax(torch.bmm(q, keys.transpose(1, 2)), dim=-1)  # [H, BS, L]
    out = torch.bmm(probs, values)
    grad_gate = (dy * out).sum(dim=(0, 2)).reshape(batch, tokens, 1)
    grad_out = dy * gate.reshape(1, rows, 1)
    grad_values = torch.bmm(probs.transpose(1, 2), grad_out)  # [H, L, D]
    grad_scores = torch._softmax_backward_data(
        torch.bmm(grad_out, values.transpose(1, 2)), probs, -1, probs.dtype)
    grad_query = None
    if need_query:
        grad_query = torch.bmm(grad_scores, keys).reshape(heads, batch, tokens, head_dim)
        grad_query = grad_query.permute(1, 0, 2, 3)
    grad_keys = torch.bmm(grad_scores.transpose(1, 2), q)
    return grad_query, grad_keys, grad_values, grad_gate


def _prompt_parameter_grads(needs, grad_keys, grad_values, prompt, head_gate, k_weight,
                            v_weight, ungated, kv_heads, groups, length, head_dim):
    """Gradients of (prompt, head gate, k weight, k bias, v weight, v bias) from those of
    the repeated keys and gated values [H, L, D] (None where not needed)."""
    per_group = (kv_heads, groups, length, head_dim)
    grad_values = grad_values.view(per_group)
    grad_head_gate = None
    if needs[1]:
        values4 = ungated.view(length, kv_heads, head_dim).transpose(0, 1).unsqueeze(1)
        grad_head_gate = (grad_values * values4).sum(dim=(2, 3)).reshape(-1)
    # summed over each KV head's query heads, laid out [L, KV, D] = [L, KV * D]
    gated = grad_values * head_gate.view(kv_heads, groups, 1, 1)
    grad_v = gated.permute(2, 0, 1, 3).sum(2).reshape(length, -1)
    grad_k = grad_keys.view(per_group).permute(2, 0, 1, 3).sum(2).reshape(length, -1)
    scale = head_dim ** -0.5  # the keys' scale, folded into the GEMMs
    grad_prompt = None
    if needs[0]:
        grad_prompt = torch.mm(grad_v, v_weight).addmm_(grad_k, k_weight, alpha=scale)
    grad_k_weight = torch.mm(grad_k.t(), prompt).mul_(scale) if needs[2] else None
    grad_k_bias = grad_k.sum(0).mul_(scale) if needs[3] else None
    grad_v_weight = torch.mm(grad_v.t(), prompt) if needs[4] else None
    grad_v_bias = grad_v.sum(0) if needs[5] else None
    return [grad_prompt, grad_head_gate, grad_k_weight, grad_k_bias, grad_v_weight,
            grad_v_bias]


__all__ = ["prompt_attention", "prompt_attention_recipe", "prompt_expert",
           "prompt_keys_values"]
