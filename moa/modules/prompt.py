"""The prompt expert (docs/DESIGN.md section 4): prompt tuning as an attention expert.

`PromptExpert` (attribute `moa_prompt` of the attention module, Llama, Mistral, Qwen2 and
Qwen3 families): P [L, hidden] learned vectors; K_p = k_proj(P), V_p = v_proj(P) with the
frozen projections (no rotary); per head h, o_p = gate_h * softmax(q K_p^T / sqrt(D)) V_p
with q the attention's post-rotary query; g * o_p is added to the o_proj input, g the layer
router's prompt gate.

The prompt expert needs the post-rotary query, which the attention module never exposes. It
is rebuilt from what the module does expose, with three hooks (`attach_prompt`): a pre-hook
on the attention module keeps `position_embeddings` (cos, sin); a forward hook on `q_norm`
(Qwen3) or `q_proj` (the others) keeps the query before rotary, the q_proj LoRA included; a
pre-hook on `o_proj` (`PromptOutputHook`) rotates it (the family's rotate-half rotary on the
query alone, `rotate_half_query`, or the family's own `apply_rotary_pos_emb`) and adds the
prompt output. Where the attention kernel saved that very query for its backward, it is
taken from there instead (`attention_saved_query`). Nothing of the attention forward is
copied, so a new attention backend or cache type does not change the wiring.

`prompt_key_cache` (MoAModel.generate) keeps what is fixed over one generate call: the
prompt keys and values, and every MoA module's casts of its weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from moa.families import GENERIC, ModelFamily, rotary_function
from moa.modules.dispatch import Hook, autocast_off, compute_dtype, is_plain_linear
from moa.modules.layer_router import LayerRouter
from moa.modules.linear import MoALinear
from moa.modules.parallel_adapter import ParallelAdapter
from moa.modules.router import MoARouter
from moa_kernels.prompt_attention import prompt_attention, prompt_attention_recipe, prompt_expert


def _frozen(linear: nn.Module) -> nn.Module:
    return linear.base if isinstance(linear, MoALinear) else linear


def frozen_projection(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """base(x) in x's dtype for a frozen projection: a plain nn.Linear's weights are cast to
    x's dtype; any other base (quantized, hooked) is called as a module."""
    if is_plain_linear(base):
        return F.linear(x, base.weight.to(x.dtype),
                        None if base.bias is None else base.bias.to(x.dtype))
    return base(x).to(x.dtype)


class CapturedAttentionInputs:
    """The pre-rotary query and the position embeddings (cos, sin) of the attention call
    in progress, as the prompt expert's hooks capture them."""

    __slots__ = ("query", "position_embeddings")

    def __init__(self) -> None:
        self.query: torch.Tensor | None = None
        self.position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None


class PromptExpert(nn.Module):
    """Prompt tuning as an attention expert (docs/DESIGN.md section 4).

    prompt [L, hidden] init N(0, 1); gate [num_heads] init 0 (so it adds nothing at first).
    The query is taken after the rotary embedding and the prompt keys have none, so its
    output depends on absolute positions: with left padding pass position_ids that skip
    the padding (generate does).
    """

    def __init__(self, attention: nn.Module, length: int, hidden_size: int, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.length, self.hidden_size = length, hidden_size
        self.head_dim = attention.head_dim
        self.num_heads = attention.config.num_attention_heads
        self.num_kv_heads = attention.config.num_key_value_heads
        self.prompt = nn.Parameter(torch.empty(length, hidden_size, device=device, dtype=dtype))
        self.gate = nn.Parameter(torch.zeros(self.num_heads, device=device, dtype=dtype))
        if self.prompt.device.type != "meta":
            nn.init.normal_(self.prompt)
        self.active = True
        self.cache_keys_values = False  # on only inside MoAModel.generate (prompt_key_cache)
        # (dtype, keys, values, {batch: the two expanded}) while cache_keys_values
        self._keys_values = None
        # what the hooks capture of the current attention call (a plain object: storing
        # into it costs no nn.Module attribute machinery, twice per layer and token)
        self.captured = CapturedAttentionInputs()

    def keys_and_gated_values(self, k_proj: nn.Module, v_proj: nn.Module,
                              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt keys times head_dim^-0.5 [H, L, D] and values times the per-head gate
        [H, L, D], KV heads repeated for grouped-query attention (query head h reads KV
        head h // groups).

        They depend only on the prompt, the gate and the frozen projections, so within one
        `generate` call without grad mode (see prompt_key_cache) they are computed once."""
        caching = self.cache_keys_values and not torch.is_grad_enabled()
        cached = self._keys_values
        if caching and cached is not None and cached[0] == dtype:
            return cached[1], cached[2]
        if torch.compiler.is_compiling():
            caching = False  # read a cache filled eagerly, write none inside a graph
        prompt = self.prompt.to(dtype)
        keys, values = frozen_projection(k_proj, prompt), frozen_projection(v_proj, prompt)
        groups = self.num_heads // self.num_kv_heads
        keys = keys.view(self.length, self.num_kv_heads, self.head_dim).transpose(0, 1)
        values = values.view(self.length, self.num_kv_heads, self.head_dim).transpose(0, 1)
        keys = keys.repeat_interleave(groups, dim=0) * self.head_dim ** -0.5  # [H, L, D]
        values = values.repeat_interleave(groups, dim=0) * self.gate.to(dtype)[:, None, None]
        if caching:
            self._keys_values = (dtype, keys, values, {})
        return keys, values

    def _batched_keys_values(self, keys, values, batch: int):
        """keys and values expanded to [B, H, L, D]; the views are kept with the cached
        keys while decoding (one expand per generate call, not per token)."""
        cached = self._keys_values
        expanded = cached[3] if cached is not None and cached[1] is keys else None
        if expanded is not None and batch in expanded:
            return expanded[batch]
        pair = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
        if expanded is not None and not torch.compiler.is_compiling():
            expanded[batch] = pair
        return pair

    def add_output(self, x: torch.Tensor, query: torch.Tensor, gate: torch.Tensor,
                   k_proj: nn.Module, v_proj: nn.Module, *, with_recipe: bool = False):
        """x + gate * o_p as a new tensor of x's dtype, for the post-rotary query
        [B, H, S, D], x [B, S, H * D] (the o_proj input) and the router's gate [B, S, 1]:
        one fused op (moa_kernels/prompt_attention.py) that saves the query, the prompt keys,
        values and the gate, not o_p, for the backward. Computes in the query's dtype
        (autocast's, when autocast is on). with_recipe: return (output, the InputRecipe
        that recomputes it)."""
        dtype = compute_dtype(query)
        if query.dtype != dtype:
            query = query.to(dtype)
        if gate.dtype != dtype:
            gate = gate.to(dtype)
        with autocast_off(query):
            if torch.is_grad_enabled() and is_plain_linear(k_proj) and is_plain_linear(v_proj):
                # training: one op for the keys, values and the attention (their graph
                # would be a dozen small ops and their gradients as many)
                y, keys, gated_values = prompt_expert(
                    x, query, gate, self.prompt, self.gate, k_proj.weight, k_proj.bias,
                    v_proj.weight, v_proj.bias, self.num_kv_heads)
                operands = (x, query, keys, gated_values, gate)
            else:
                keys, gated_values = self.keys_and_gated_values(k_proj, v_proj, dtype)
                if not torch.is_grad_enabled():
                    keys, gated_values = self._batched_keys_values(keys, gated_values,
                                                                   query.shape[0])
                operands = (x, query, keys, gated_values, gate)
                y = prompt_attention(*operands)
            return (y, prompt_attention_recipe(*operands)) if with_recipe else y

    def output(self, query: torch.Tensor, k_proj: nn.Module, v_proj: nn.Module) -> torch.Tensor:
        """o_p [B, S, H * D] for the post-rotary query [B, H, S, D] (before g_prompt)."""
        batch, heads, tokens, head_dim = query.shape
        zeros = query.new_zeros(batch, tokens, heads * head_dim)
        return self.add_output(zeros, query, query.new_ones(batch, tokens, 1), k_proj, v_proj)

    # ---- hooks ---------------------------------------------------------------------------

    def attention_pre_hook(self, module: nn.Module, args, kwargs) -> None:
        if self.active:
            self.captured.position_embeddings = kwargs.get(
                "position_embeddings", args[1] if len(args) > 1 else None)

    def query_hook(self, module: nn.Module, args, output) -> None:
        if self.active:
            self.captured.query = output

    def extra_repr(self) -> str:
        return f"length={self.length}, hidden_size={self.hidden_size}, heads={self.num_heads}"



def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (checkpointing, offloading) are on; True where this torch
    cannot say."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


# How many autograd nodes back from the attention output its attention node is looked for
# (view, copy, transpose: the reshapes between an attention kernel and o_proj).
ATTENTION_NODE_DEPTH = 4
# How many autograd nodes back from the attention's query the captured pre-rotary query is
# looked for (the rotary's add and multiply, the head transpose and view: 4 for Llama).
ROTARY_NODE_DEPTH = 6


def attention_saved_query(attention_output: torch.Tensor, captured_query: torch.Tensor,
                          shape: torch.Size) -> torch.Tensor | None:
    """The post-rotary query [B, H, S, D] (`shape`) the attention kernel saved for its own
    backward, where its metadata show it is the query the prompt expert would rebuild from
    `captured_query` (the q_proj or q_norm output before the rotary): else None.

    Saving that tensor rather than a rebuilt copy costs the prompt expert's backward nothing
    (the kernel keeps it until its own backward, which runs later), and the expert need not
    rebuild the query at all. Looked for only in grad mode, eagerly, with no saved-tensor
    hooks active (reading a saved tensor under checkpointing or offloading hooks would
    unpack it), a few nodes up the graph of the attention output (o_proj's input): a node
    that saved a `query` (the fused attention kernels do; eager attention saves none under
    that name). It is taken when it is the output of an add (the rotary's last op, q cos +
    rotate_half(q) sin) computed, within ROTARY_NODE_DEPTH autograd nodes, from this very
    captured query, with the expected shape: the family's rotary on the captured query,
    which is what the expert rebuilds. Nothing is read of its values (a comparison would
    synchronise the host with an accelerator at every layer); a query changed between the
    rotary and the kernel (scaled, cast, copied) has another last op and is not taken."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or \
            attention_output.grad_fn is None or captured_query.grad_fn is None or \
            saved_tensor_hooks_active():
        return None
    nodes, seen = [attention_output.grad_fn], set()
    for _ in range(ATTENTION_NODE_DEPTH):
        following = []
        for node in nodes:
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if hasattr(node, "_saved_query"):
                saved = node._saved_query
                if saved.shape == shape and type(saved.grad_fn).__name__ == "AddBackward0" \
                        and _reaches(saved.grad_fn, captured_query.grad_fn, ROTARY_NODE_DEPTH):
                    return saved
                return None
            following += [next_node for next_node, _ in node.next_functions]
        nodes = following
    return None


def _reaches(start, target, depth: int) -> bool:
    """Whether autograd node `target` is `start` or among its inputs' nodes within `depth`
    steps back."""
    nodes, seen = [start], set()
    for _ in range(depth + 1):
        following = []
        for node in nodes:
            if node is target:
                return True
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            following += [next_node for next_node, _ in node.next_functions]
        nodes = following
    return False


def rotate_half_query(query: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      operands: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> torch.Tensor:
    """query [B, H, S, D] under transformers' rotate-half rotary embedding, q cos +
    rotate_half(q) sin for cos and sin [B, S, D], bitwise equal to it: rotate_half(q) =
    cat(-q2, q1) is roll(q, D / 2) times -1 on the first half of D and +1 on the second,
    and that sign is folded into sin (sign flips and a roll are exact). So the query alone
    takes 4 ops (the family's function with an empty key takes 18). operands: the
    `rotary_operands(cos, sin)`, shared by every layer of one forward, or None."""
    cos4, signed_sin4 = rotary_operands(cos, sin) if operands is None else operands
    return query * cos4 + query.roll(query.shape[-1] // 2, -1) * signed_sin4


def rotary_operands(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos [B, 1, S, D], sin [B, 1, S, D] times -1 on the first half of D), for
    rotate_half_query."""
    head_dim = sin.shape[-1]
    signs = torch.ones(head_dim, dtype=sin.dtype, device=sin.device)
    signs[:head_dim // 2].fill_(-1.0)  # (a fill: an item assignment copies a host scalar)
    return cos.unsqueeze(1), sin.unsqueeze(1) * signs


class PromptOutputHook(Hook):
    """Forward pre-hook (with_kwargs) on o_proj: rebuilds the post-rotary query from what the
    prompt expert captured and adds g_index * o_p to the o_proj input [B, S, H * D]."""

    def __init__(self, prompt: PromptExpert, attention: nn.Module, router: LayerRouter,
                 index: int, who: str, family: ModelFamily = GENERIC) -> None:
        self.prompt, self.attention, self.router = prompt, attention, router
        self.index, self.who, self.family = index, who, family
        self.rotary = rotary_function(family, attention)  # looked up once

    def _rotary_operands(self, cos: torch.Tensor, sin: torch.Tensor):
        """rotary_operands(cos, sin), computed once per forward for all layers (kept in the
        model's RoutingContext, eagerly: under torch.compile they are fused anyway)."""
        context = self.router.context
        if context is None or torch.compiler.is_compiling():
            return rotary_operands(cos, sin)
        kept = context.rotary
        if kept is None or kept[0] is not cos or kept[1] is not sin:
            kept = context.rotary = (cos, sin, rotary_operands(cos, sin))
        return kept[2]

    def __call__(self, module: nn.Module, args, kwargs):
        prompt, attention = self.prompt, self.attention
        if not prompt.active:
            return None
        captured = prompt.captured
        query, position_embeddings = captured.query, captured.position_embeddings
        captured.query = captured.position_embeddings = None
        if query is None or position_embeddings is None:
            raise RuntimeError(f"{self.who}: the prompt expert did not see this forward's "
                               "query and position embeddings")
        key = None if args else list(kwargs)[0]  # o_proj's input, by any keyword name
        x = args[0] if args else kwargs[key]
        batch, tokens = x.shape[:2]
        pre_rotary = query.reshape(batch, tokens, -1, prompt.head_dim).transpose(1, 2)
        query = attention_saved_query(x, query, pre_rotary.shape)
        if query is None:  # rebuilt: the family's rotary on the captured query
            cos, sin = position_embeddings
            if self.family.rotate_half:
                query = rotate_half_query(pre_rotary, cos, sin, self._rotary_operands(cos, sin))
            else:  # the family's rotary rotates a key too: give it none (zero heads)
                query, _ = self.rotary(pre_rotary, pre_rotary[:, :0], cos, sin)
        gate = self.router.gates_for(self.index, self.index + 1, x, self.who)
        # o_proj's shrink needs its input for d A: it recomputes it (module.next_input_recipe)
        # from what the attention and this expert save anyway.
        recompute = isinstance(module, MoALinear) and torch.is_grad_enabled() and \
            not torch.compiler.is_compiling()
        x = prompt.add_output(x, query, gate, _frozen(getattr(attention, self.family.key)),
                              _frozen(getattr(attention, self.family.value)),
                              with_recipe=recompute)
        if recompute:
            x, recipe = x
            module.next_input_recipe = (x, recipe)
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, key: x}


@contextmanager
def prompt_key_cache(model: nn.Module) -> Iterator[None]:
    """Inside (MoAModel.generate), what is fixed over the call is computed once and reused
    while grad mode is off (the weights cannot change during one `generate`): every prompt
    expert's keys and values, and every MoA module's casts and concatenations of its weights
    (`generate_cache`, see moa.modules.dispatch.generate_cached). Everything is dropped on exit."""
    prompts = [m for m in model.modules() if isinstance(m, PromptExpert)]
    cached = [m for m in model.modules()
              if isinstance(m, (MoALinear, MoARouter, ParallelAdapter, LayerRouter))]
    for prompt in prompts:
        prompt.cache_keys_values = True
    for module in cached:
        module.generate_cache = {}
    try:
        yield
    finally:
        for prompt in prompts:
            prompt.cache_keys_values = False
            prompt._keys_values = None
        for module in cached:
            module.generate_cache = None
            if isinstance(module, LayerRouter):
                module.state.shrink_input = module.state.shrink_outputs = None


def attach_prompt(attention: nn.Module, prompt: PromptExpert, router: LayerRouter,
                  index: int, name: str, family: ModelFamily = GENERIC) -> list:
    """Register the prompt expert's three hooks (where `family` says the attention keeps
    its query, query norm and output projection); returns their handles."""
    query_module = getattr(attention, family.query_norm or family.query)
    return [
        attention.register_forward_pre_hook(prompt.attention_pre_hook, with_kwargs=True),
        query_module.register_forward_hook(prompt.query_hook),
        getattr(attention, family.output).register_forward_pre_hook(
            PromptOutputHook(prompt, attention, router, index, f"prompt expert of {name}",
                             family), with_kwargs=True),
    ]


__all__ = ["CapturedAttentionInputs", "PromptExpert", "PromptOutputHook", "attach_prompt",
           "attention_saved_query", "frozen_projection", "prompt_key_cache",
           "rotary_operands", "rotate_half_query", "saved_tensor_hooks_active"]
