"""The variants `moa compare` trains: a preset, a MoAConfig file or PEFT's LoRA (peft_lora),
each resolved from its --variants entry before any model loads, with its learning rate.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moa.cli.train import TrainOptions, load_moa_config
from moa.config import PRESETS

PEFT_LORA = "peft_lora"
BASE = "base"  # the base model's row: a name no variant may take
# PEFT's LoRA as users run it: r 16 with alpha 2r, on the `lora` preset's modules.
PEFT_LORA_RANK, PEFT_LORA_ALPHA = 16, 32


@dataclass(frozen=True)
class Variant:
    """One method compared: kind "preset" (source: the preset's name), "config" (source: a
    MoAConfig file) or "peft" (PEFT's LoRA); config: its settings as plain JSON values."""

    name: str
    kind: str
    source: str
    config: dict

    def train_options(self) -> dict:
        """The TrainOptions fields that select this variant's adapter."""
        if self.kind == "preset":
            return {"preset": self.source}
        if self.kind == "config":
            return {"moa_config": self.source}
        return {}


def _plain(value):
    """value as JSON would give it back (tuples as lists, ...)."""
    return json.loads(json.dumps(value))


def peft_lora_config():
    """PEFT's LoraConfig for the peft_lora variant."""
    from peft import LoraConfig

    from moa.config import MoAConfig

    return LoraConfig(r=PEFT_LORA_RANK, lora_alpha=PEFT_LORA_ALPHA, lora_dropout=0.0,
                      target_modules=list(MoAConfig.preset("lora").target_modules),
                      task_type="CAUSAL_LM")


def drop_stale_gguf_quantizer(base: torch.nn.Module) -> None:
    """transformers' GGUF loader dequantizes every weight to float as it loads a .gguf file
    (without a GGUF matmul kernel) but leaves its GGUF quantizer on the model, and the
    Trainer refuses to train a PeftModel over a quantizer that says it cannot train (a
    MoAModel passes that check as an adapter model). Where every parameter is a float
    tensor, the quantizer is removed as transformers removes one from a model dequantized
    at load."""
    from transformers.utils.quantization_config import QuantizationMethod

    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is None or \
            quantizer.quantization_config.quant_method != QuantizationMethod.GGUF:
        return
    if all(param.dtype.is_floating_point for param in base.parameters()):
        quantizer.remove_quantization_config(base)


def peft_lora_model(base: torch.nn.Module) -> torch.nn.Module:
    """base (frozen) with PEFT's LoRA injected: what the peft_lora variant trains."""
    from peft import get_peft_model

    drop_stale_gguf_quantizer(base)
    with warnings.catch_warnings():  # peft asks transformers for a deprecated property
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        return get_peft_model(base, peft_lora_config())


def resolve_variants(entries: Sequence[str]) -> list[Variant]:
    """Each --variants entry as a Variant. ValueError for an unknown name, a reserved or
    repeated name; FileNotFoundError for a missing MoAConfig file; a file that is no
    MoAConfig is a ValueError naming it."""
    from moa.config import MoAConfig

    allowed = (f"allowed: a preset ({', '.join(PRESETS)}), {PEFT_LORA}, or a MoAConfig "
               ".json/.yaml file")
    variants: list[Variant] = []
    for entry in entries:
        if entry == BASE:
            raise ValueError(f"{BASE!r} is not a variant to train: the base model is always "
                             "scored once, as its own row")
        if entry in PRESETS:
            variant = Variant(entry, "preset", entry,
                              _plain(MoAConfig.preset(entry).to_dict()))
        elif entry == PEFT_LORA:
            try:
                config = peft_lora_config()
            except ImportError:
                raise ValueError(f"the {PEFT_LORA} variant needs peft: pip install peft") \
                    from None
            variant = Variant(entry, "peft", entry, {
                "r": config.r, "lora_alpha": config.lora_alpha,
                "lora_dropout": config.lora_dropout,
                "target_modules": sorted(config.target_modules)})
        elif Path(entry).suffix.lower() in (".json", ".yaml", ".yml") or os.sep in entry:
            name = Path(entry).stem
            if name in PRESETS or name in (PEFT_LORA, BASE):
                raise ValueError(f"the MoAConfig file {entry!r} would be named {name!r}, "
                                 f"which names a preset or {PEFT_LORA} or {BASE}; rename "
                                 "the file")
            config = load_moa_config(TrainOptions(moa_config=entry))
            variant = Variant(name, "config", entry, _plain(config.to_dict()))
        else:
            raise ValueError(f"unknown variant {entry!r}; {allowed}")
        if any(v.name == variant.name for v in variants):
            raise ValueError(f"two variants are named {variant.name!r} (a variant's name is "
                             "the preset's or the file's stem); each may be given once")
        variants.append(variant)
    return variants


def resolve_learning_rates(rates: dict[str, float], variants: Sequence[Variant]
                           ) -> dict[str, float]:
    """{variant name: lr}; ValueError for an --lr entry naming a variant not run, or a
    variant without a rate (no bare value given)."""
    names = [v.name for v in variants]
    for name in rates:
        if name != "*" and name not in names:
            raise ValueError(f"--lr gives a rate for {name!r}, which is not among --variants "
                             f"({', '.join(names)})")
    missing = [name for name in names if name not in rates and "*" not in rates]
    if missing:
        raise ValueError(f"--lr gives no rate for {', '.join(missing)}; add VARIANT=LR "
                         "entries for them or one bare value for the rest")
    return {name: rates.get(name, rates.get("*")) for name in names}


__all__ = ["BASE", "PEFT_LORA", "Variant", "drop_stale_gguf_quantizer", "peft_lora_config",
           "peft_lora_model", "resolve_learning_rates", "resolve_variants"]
