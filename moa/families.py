"""The model-family table: where a decoder layer keeps what the layer-level experts read.

One entry per family of pre-norm decoder layers. The layer router reads `input_norm` (its
output, or its input: the residual stream); the parallel adapter sits beside `mlp`; the
prompt expert sits in `attention`, reads the pre-rotary query from `query_norm` (when the
family has one) or `query`, computes its keys and values with the frozen `key` and `value`
projections, adds its output to the input of `output`, and rotates the query with the
function named `rotary` in the attention class's own module (so a family's rotary variant
is used as its authors wrote it), or, for the families whose `rotary` is transformers'
rotate-half embedding (`rotate_half`), with the same arithmetic on the query alone. A
family whose attention has no separate query, key and value projections (Phi-3's fused
qkv_proj) has `query=None`: no prompt expert.

A decoder layer of a class not in the table but with an `input_norm`-named module is read
with the Llama layout (`GENERIC`), as transformers' Llama-style families are.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelFamily:
    """Attribute names of one family's decoder layer and attention module."""

    name: str
    decoder_layers: tuple[str, ...]  # class names of its decoder layers
    attentions: tuple[str, ...]  # class names of its attention modules
    input_norm: str = "input_layernorm"
    attention: str = "self_attn"
    mlp: str = "mlp"
    query: str | None = "q_proj"  # None: no separate query projection, no prompt expert
    query_norm: str | None = None  # applied to the query before the rotary (Qwen3)
    key: str = "k_proj"
    value: str = "v_proj"
    output: str = "o_proj"
    rotary: str = "apply_rotary_pos_emb"
    # True where `rotary` is transformers' rotate-half embedding, q cos + rotate_half(q) sin
    # with cos and sin [B, S, D] unsqueezed at the head dimension: the prompt expert then
    # rotates its query alone, bitwise as `rotary` does (moa.modules.prompt.rotate_half_query)
    rotate_half: bool = True

    @property
    def supports_prompt(self) -> bool:
        return self.query is not None


FAMILIES: dict[str, ModelFamily] = {
    family.name: family for family in (
        ModelFamily("llama", ("LlamaDecoderLayer",), ("LlamaAttention",)),
        ModelFamily("mistral", ("MistralDecoderLayer",), ("MistralAttention",)),
        ModelFamily("qwen2", ("Qwen2DecoderLayer",), ("Qwen2Attention",)),
        ModelFamily("qwen3", ("Qwen3DecoderLayer",), ("Qwen3Attention",), query_norm="q_norm"),
        ModelFamily("gemma", ("GemmaDecoderLayer",), ("GemmaAttention",)),
        ModelFamily("gemma2", ("Gemma2DecoderLayer",), ("Gemma2Attention",)),
        ModelFamily("phi3", ("Phi3DecoderLayer",), ("Phi3Attention",), query=None),
    )
}

# A class outside the table: its rotary is called as written (with an empty key).
GENERIC = ModelFamily("llama-style", (), (), rotate_half=False)


def family_of(layer: nn.Module) -> ModelFamily | None:
    """The family of decoder layer `layer`: its table entry, GENERIC for another class with an
    input_layernorm, or None for a module that is no pre-norm decoder layer."""
    kind = type(layer).__name__
    for family in FAMILIES.values():
        if kind in family.decoder_layers:
            return family
    if isinstance(getattr(layer, GENERIC.input_norm, None), nn.Module):
        return GENERIC
    return None


def prompt_attention_classes() -> list[str]:
    """Attention classes the prompt expert supports (for error messages)."""
    return [kind for family in FAMILIES.values() if family.supports_prompt
            for kind in family.attentions]


def check_prompt_attention(family: ModelFamily, attention: nn.Module, name: str) -> None:
    """Raise a clear error unless the prompt expert can sit in `attention`."""
    kind = type(attention).__name__
    if not family.supports_prompt or kind not in family.attentions:
        raise ValueError(f"the prompt expert supports the attention modules "
                         f"{', '.join(prompt_attention_classes())} (moa/families.py); "
                         f"{name!r} is a {kind}. Set prompt_length=None for this model")
    for attribute in (family.query, family.key, family.value, family.output):
        if not isinstance(getattr(attention, attribute, None), nn.Module):
            raise ValueError(f"{name!r} ({kind}) has no {attribute!r} module, which the "
                             f"prompt expert reads ({family.name} family)")
    if not callable(getattr(sys.modules[type(attention).__module__], family.rotary, None)):
        raise ValueError(f"{kind} is in a module without {family.rotary}; the prompt expert "
                         "cannot rebuild its rotary query")


def rotary_function(family: ModelFamily, attention: nn.Module):
    """The family's rotary embedding function, from the attention class's module."""
    return getattr(sys.modules[type(attention).__module__], family.rotary)


__all__ = ["FAMILIES", "GENERIC", "ModelFamily", "check_prompt_attention", "family_of",
           "rotary_function"]
