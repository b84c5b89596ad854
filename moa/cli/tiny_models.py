"""The one builder of the small Llama models the applications make from a config (random
weights, nothing downloaded): `moa demo`'s default model, the embedded text model of `moa
train` / `moa evaluate` / `moa compare` (moa/cli/loading.py), and `moa bench`'s models.
Each caller describes the model it needs as a TinyLlama; the same description and seed give
the same weights, bit for bit, on every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TinyLlama:
    """A small LlamaForCausalLM to build from a config.

    vocab, hidden, intermediate, layers, heads, kv_heads, max_positions: the config's sizes.
    tied: the output head is the input embedding matrix. head_scale: the output head's
    weights are multiplied by it after the initializer: at the initializer's std 0.02 the
    frozen head caps every logit near +-1.3 (the final RMSNorm's output has norm
    sqrt(hidden)), so no adapter could make a confident prediction; a trained model's head
    is larger. bos_token, eos_token, pad_token: the config's special token ids (and the
    generation config's end and padding tokens); LlamaConfig's own are 1, 2 and none.
    name: the config's name_or_path (recorded in the adapters trained on the model), or
    None to leave it empty."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int
    tied: bool = False
    head_scale: float = 1.0
    bos_token: int | None = 1
    eos_token: int | None = 2
    pad_token: int | None = None
    name: str | None = None


def build_tiny_llama(spec: TinyLlama, seed: int):
    """The model `spec` describes, on the CPU in eval mode (a frozen base, as from_pretrained
    gives one; float32). The global torch RNG is seeded with `seed` first (fork it around
    the call to leave it as it was); every weight is then drawn by transformers' initializer
    in order, so the same spec and seed give the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden,
                         intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                         num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                         max_position_embeddings=spec.max_positions,
                         tie_word_embeddings=spec.tied, bos_token_id=spec.bos_token,
                         eos_token_id=spec.eos_token, pad_token_id=spec.pad_token)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if spec.head_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(spec.head_scale)
    if spec.name is not None:
        model.config._name_or_path = spec.name
    model.generation_config.eos_token_id = spec.eos_token
    model.generation_config.pad_token_id = spec.pad_token
    return model


__all__ = ["TinyLlama", "build_tiny_llama"]
