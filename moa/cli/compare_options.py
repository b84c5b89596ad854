"""The options of `moa compare`: COMPARE_OPTIONS (its own, and those it shares with `moa
train` and `moa evaluate`) and CompareOptions, derived from them.
"""

from __future__ import annotations

import argparse

from moa.cli.compare_variants import PEFT_LORA, PEFT_LORA_ALPHA, PEFT_LORA_RANK
from moa.cli.evaluate import EVALUATE_OPTIONS
from moa.cli.options import (
    Option,
    flag,
    merge_options,
    options_dataclass,
    positive_float,
    positive_int,
    text,
)
from moa.cli.train import TRAIN_OPTIONS
from moa.config import PRESETS


def variant_list(value) -> list[str]:
    """Variant entries from "a,b,c" or a list of strings (a config file's)."""
    entries = value.split(",") if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        raise argparse.ArgumentTypeError(f"expected variants separated by commas, got "
                                         f"{value!r}")
    entries = [entry.strip() for entry in entries]
    if not entries or not all(entries):
        raise argparse.ArgumentTypeError(f"expected variants separated by commas, with no "
                                         f"empty entry, got {value!r}")
    return entries


def learning_rates(value) -> dict[str, float]:
    """The --lr value as {variant: lr}, the key "*" for the variants not named: from "3e-4",
    "soft_moa=1e-3,peft_lora=3e-4", "3e-4,soft_moa=1e-3", a number or a mapping."""
    if isinstance(value, dict):
        entries = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        entries = [("*", value)]
    elif isinstance(value, str):
        entries = []
        for part in value.split(","):
            name, equals, number = part.rpartition("=")
            entries.append((name.strip() if equals else "*", number.strip()))
    else:
        raise argparse.ArgumentTypeError(f"expected a learning rate or VARIANT=LR entries, "
                                         f"got {value!r}")
    rates: dict[str, float] = {}
    for name, number in entries:
        if not name:
            raise argparse.ArgumentTypeError(f"an entry names no variant in {value!r}")
        if name in rates:
            what = "more than one value for all variants" if name == "*" else \
                f"{name!r} more than once"
            raise argparse.ArgumentTypeError(f"it gives {what}: {value!r}")
        try:
            rates[name] = positive_float(number)
        except argparse.ArgumentTypeError as error:
            if name == "*":
                raise
            raise argparse.ArgumentTypeError(f"the rate for {name}: {error}") from None
    return rates


_TRAIN = {option.name: option for option in TRAIN_OPTIONS}
_EVALUATE = {option.name: option for option in EVALUATE_OPTIONS}

COMPARE_OPTIONS: tuple[Option, ...] = (
    _TRAIN["model"],
    _TRAIN["data"],
    Option("eval_data", text, None, "test records, scored as moa evaluate scores them "
           "(required)", "FILE"),
    Option("variants", variant_list, None, f"comma-separated: presets ({', '.join(PRESETS)}), "
           f"{PEFT_LORA} (PEFT's LoRA r={PEFT_LORA_RANK}, alpha {PEFT_LORA_ALPHA}, on the lora "
           "preset's modules) or MoAConfig JSON/YAML files, named by their stem (required)",
           "LIST"),
    Option("seeds", positive_int, 3, "seeds per variant: 0 to N-1 (each seed sets the "
           "adapters' initialisation and the data order)", "N"),
    Option("lr", learning_rates, "3e-4", "peak learning rate: one value, or VARIANT=LR "
           "entries separated by commas (one bare value among them: the others' rate)", "LR"),
    Option("reference", text, None, "the variant each other one is compared with, question "
           "by question (default: the first of --variants)", "NAME"),
    Option("out", text, "moa-compare", "output directory; running the same command again "
           "continues it", "DIR"),
    _TRAIN["steps"],
    _TRAIN["epochs"],
    _TRAIN["batch_size"],
    _TRAIN["gradient_accumulation"],
    _TRAIN["max_length"],
    _TRAIN["warmup_steps"],
    _TRAIN["weight_decay"],
    _TRAIN["bf16"],
    _TRAIN["gradient_checkpointing"],
    Option("eval_batch_size", positive_int, 16, "test records (prompts) per forward pass when "
           "scoring", "B"),
    Option("eval_max_length", positive_int, 1024, "tokens per scored sequence at most (the "
           "prompt's start is cut first)", "N"),
    _EVALUATE["max_new_tokens"],
    Option("keep_adapters", flag, False, "keep each run's adapter in "
           "DIR/runs/VARIANT/seed-K/adapter (otherwise a run's folder goes once its result "
           "is written: the result holds all the summary needs)"),
    Option("summary_only", flag, False, "write the summary (the table, compare.json, "
           "compare.md, and compare.png once a run has finished) of the runs already finished "
           "in DIR, and train or score nothing: a look at a comparison still running, here "
           "or in other processes"),
    _TRAIN["log_interval"],
    _TRAIN["device"],
)

@options_dataclass(COMPARE_OPTIONS)
class CompareOptions:
    """What `moa compare` runs with: a keyword field per COMPARE_OPTIONS entry (its name and
    default; lr as learning_rates() gives it)."""

    def __post_init__(self) -> None:
        if not isinstance(self.lr, dict):
            try:
                self.lr = learning_rates(self.lr)
            except argparse.ArgumentTypeError as error:
                raise ValueError(str(error)) from None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CompareOptions:
        """The options of parsed `moa compare` flags (with their --config file)."""
        options = cls(**merge_options(args, COMPARE_OPTIONS))
        for name in ("data", "eval_data", "variants"):
            if not getattr(options, name):
                flag_ = "--" + name.replace("_", "-")
                raise ValueError(f"moa compare needs {flag_} (a flag or a {name!r} key of "
                                 "--config)")
        return options


__all__ = ["COMPARE_OPTIONS", "CompareOptions", "learning_rates", "variant_list"]
