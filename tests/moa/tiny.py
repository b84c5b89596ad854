"""Tiny random-weight transformers models for the model-level tests (CPU, seconds)."""

from __future__ import annotations

import inspect

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moa import MoAModel

VOCAB = 97


def llama_config(**overrides) -> LlamaConfig:
    """hidden 64, 2 layers, 4 query heads and 2 KV heads of 16 (GQA), intermediate 96."""
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  attention_dropout=0.0)
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """The same random weights for the same seed, in eval mode."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(**overrides)).eval()


def token_batch(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length),
                         generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb(moa: MoAModel, seed: int = 2, scale: float = 0.05) -> None:
    """Move every MoA tensor off its initial value (LoRA B, prompt gates start at zero), so
    that the adapters change the outputs and tests see their effect."""
    generator = torch.Generator().manual_seed(seed)
    for _, param in moa.moa_named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        param.add_(scale * noise.to(param.dtype))


def cache_keyword(moa: MoAModel) -> str:
    """The name under which the base model's forward takes and returns its KV cache:
    transformers 5.25 renamed past_key_values to cache (and warns that the old name goes in
    5.40); the pinned 5.23 knows only the old one."""
    parameters = inspect.signature(moa.get_base_model().forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
