"""`moa compare`: several adapter variants over several seeds on one data set, side by side.

Plan: options (defaults, then a --config file, then the flags given) and the variants, all
checked before any model loads -> DIR/compare_options.json, what defines the runs (a rerun
with other values is refused; variants and seeds may be added) -> the base model loaded
once and scored once, without an adapter (DIR/runs/base.json) -> per variant and seed
0..N-1: `run_train` on a copy of the base (the code path of `moa train`: the same records,
tokens and Trainer, and for one seed the same data order whatever the variant), then
`evaluate_items` on the test records (as `moa evaluate` scores them) and the router
statistics over the first ROUTER_PROMPTS test prompts -> DIR/runs/VARIANT/seed-K.json,
written atomically. A finished run is skipped when the command is run again; a run that
raises is written up in DIR/runs/VARIANT/seed-K.error.txt (its reason and traceback), the
others go on, and the next run of the command retries it. -> the summary over the variants
and seeds asked for: DIR/compare.json, DIR/compare.md (the table, also printed) and
DIR/compare.png.

Statistics. A variant's accuracy is the mean over its seeds. Its 95% interval is a two-level
percentile bootstrap: each resample draws the seeds with replacement and the test questions
with replacement (one draw of questions for every seed: they share the test set), and takes
the mean accuracy; the interval holds the middle 95% of RESAMPLES such means. It covers both
the training noise (seeds) and the test-set noise (questions). The paired comparison with
the reference variant takes, on the seeds both finished, the per-question differences of
correctness (+1, 0, -1) and bootstraps their mean the same way, seeds drawn jointly (seed K
of both variants saw the same data order): questions both variants get right or both get
wrong add nothing to its spread, so it resolves smaller differences than two separate
intervals would.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import re
import shutil
import statistics
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moa.cli.evaluate import EVALUATE_OPTIONS, evaluate_items
from moa.cli.options import (
    Option,
    flag,
    merge_options,
    options_dataclass,
    positive_float,
    positive_int,
    resolve_device,
    text,
)
from moa.cli.train import TRAIN_OPTIONS, TrainOptions, load_moa_config, run_train
from moa.config import PRESETS
from moa.distributed import World, join_world

PEFT_LORA = "peft_lora"
BASE = "base"
OPTIONS_FILE = "compare_options.json"
RUNS = "runs"
FORMAT_VERSION = 1
# PEFT's LoRA as users run it: r 16 with alpha 2r, on the `lora` preset's modules.
PEFT_LORA_RANK, PEFT_LORA_ALPHA = 16, 32
# The router statistics are measured on the first test prompts, one forward each (so that
# no padding counts): the same prompts for every variant and seed.
ROUTER_PROMPTS = 32
# 10,000 resamples put the Monte-Carlo error of a 95% percentile bound near 0.1 standard
# errors; the fixed seed makes the intervals the same on every run of the summary.
RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CI_METHOD = (f"two-level percentile bootstrap, {RESAMPLES} resamples (numpy seed "
             f"{BOOTSTRAP_SEED}): the seeds drawn with replacement and the test questions drawn "
             "with replacement, one draw of questions for every seed")
PAIRED_METHOD = ("paired percentile bootstrap of the per-question difference in correctness "
                 "against the reference, on the seeds both finished (seeds drawn jointly, "
                 f"questions drawn once for both), {RESAMPLES} resamples (numpy seed "
                 f"{BOOTSTRAP_SEED})")
SAVE_NEVER = 2**62  # Trainer checkpoints in a run: only the one it writes at the end


# ---------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------

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
            raise argparse.ArgumentTypeError(f"an --lr entry names no variant in {value!r}")
        if name in rates:
            what = "more than one value for all variants" if name == "*" else \
                f"{name!r} more than once"
            raise argparse.ArgumentTypeError(f"--lr gives {what}: {value!r}")
        try:
            rates[name] = positive_float(number)
        except argparse.ArgumentTypeError as error:
            where = "" if name == "*" else f" for {name}"
            raise argparse.ArgumentTypeError(f"--lr{where}: {error}") from None
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
    _TRAIN["log_interval"],
    _TRAIN["device"],
)

# What defines a run's result: a rerun into the same DIR must give the same values.
DEFINING = ("model", "data_sha256", "eval_data_sha256", "steps", "epochs", "batch_size",
            "gradient_accumulation", "max_length", "warmup_steps", "weight_decay", "bf16",
            "gradient_checkpointing", "eval_max_length", "max_new_tokens")


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


# ---------------------------------------------------------------------------------------
# variants
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# the plan: everything checked before a model loads
# ---------------------------------------------------------------------------------------

@dataclass
class Plan:
    """The checked options: variants, rates, the runs' directory and what defines them."""

    options: CompareOptions
    variants: list[Variant]
    rates: dict[str, float]
    reference: str
    out: Path
    defining: dict

    def run_path(self, variant: str, seed: int, suffix: str = ".json") -> Path:
        return self.out / RUNS / variant / f"seed-{seed}{suffix}"

    def base_path(self, suffix: str = ".json") -> Path:
        return self.out / RUNS / f"{BASE}{suffix}"


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_out(out: Path) -> dict | None:
    """The stored compare_options.json of DIR, None when DIR is new or empty; refuses a file,
    and a directory that holds something other than a compare run."""
    for folder in (*reversed(out.parents), out):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"--out {str(out)!r}: {folder} is a file, not a "
                                     "directory")
    if not out.exists() or not any(out.iterdir()):
        return None
    stored_path = out / OPTIONS_FILE
    not_ours = (f"--out {str(out)!r} holds files that are not a moa compare run; name a new "
                "or empty directory, or one that moa compare wrote")
    if not stored_path.is_file():
        raise ValueError(f"{not_ours} (no {OPTIONS_FILE} in it)")
    try:
        stored = json.loads(stored_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{not_ours} ({OPTIONS_FILE} is not readable JSON)") from None
    if not isinstance(stored, dict) or stored.get("moa_compare") != FORMAT_VERSION or \
            not isinstance(stored.get("options"), dict) or \
            not isinstance(stored.get("variants"), dict):
        raise ValueError(f"{not_ours} ({OPTIONS_FILE} is not one that this moa writes)")
    return stored


def _finished(out: Path) -> set[str]:
    """The names (variants, "base") with a finished result in DIR."""
    runs = out / RUNS
    names = {path.parent.name for path in runs.glob("*/seed-*.json")}
    return names | ({BASE} if (runs / f"{BASE}.json").is_file() else set())


def _differences(stored: dict, defining: dict, variants: dict, finished: set[str]
                 ) -> list[str]:
    """What differs from the stored options where finished results depend on it: every
    option once any result is there, a variant's rate and definition once it has one."""
    def shown(value) -> str:
        return "none" if value is None else str(value)

    found = []
    for name in DEFINING if finished else ():
        there, here = stored["options"].get(name), defining.get(name)
        if there != here:
            if name.endswith("_sha256"):
                found.append(f"the content of --{name[:-7].replace('_', '-')}")
            else:
                found.append(f"{name.replace('_', '-')} ({shown(there)} there, "
                             f"{shown(here)} here)")
    for name, definition in variants.items():
        before = stored["variants"].get(name)
        if before is None or name not in finished:
            continue
        if before.get("lr") != definition["lr"]:
            found.append(f"lr of {name} ({before.get('lr')} there, {definition['lr']} here)")
        if before.get("kind") != definition["kind"] or \
                before.get("config") != definition["config"]:
            found.append(f"the definition of {name}")
    return found


def plan_compare(options: CompareOptions) -> Plan:
    """The checked plan, and DIR/compare_options.json written (or matched): one ValueError or
    OSError line for bad input, before any model loads."""
    from moa.cli.data import load_evaluation_items, load_training_examples
    from moa.cli.loading import check_gguf, check_model_path, is_gguf

    out = Path(options.out)
    stored = _check_out(out)
    for what, path in (("--data", options.data), ("--eval-data", options.eval_data)):
        if path is None:
            raise ValueError(f"moa compare needs {what} FILE")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what}: no such data file: {path!r}")
    if options.model is not None:
        check_model_path(options.model)
        if is_gguf(options.model):
            check_gguf(options.model)
    variants = resolve_variants(options.variants)
    rates = resolve_learning_rates(options.lr, variants)
    reference = options.reference or variants[0].name
    if reference not in rates:
        raise ValueError(f"--reference {reference!r} is not among --variants "
                         f"({', '.join(rates)})")
    load_training_examples(options.data)  # a bad record fails here, not in every run
    if not load_evaluation_items(options.eval_data):
        raise ValueError(f"{options.eval_data}: no usable record")
    defining = {
        "model": None if options.model is None else str(Path(options.model).resolve()),
        "data": str(Path(options.data).resolve()), "data_sha256": sha256_of(options.data),
        "eval_data": str(Path(options.eval_data).resolve()),
        "eval_data_sha256": sha256_of(options.eval_data),
        **{name: getattr(options, name) for name in DEFINING
           if name not in ("model", "data_sha256", "eval_data_sha256")}}
    definitions = {v.name: {"kind": v.kind, "source": v.source, "lr": rates[v.name],
                            "config": v.config} for v in variants}
    if stored is not None:
        differences = _differences(stored, defining, definitions, _finished(out))
        if differences:
            raise ValueError(f"--out {str(out)!r} holds results of a comparison with other "
                             f"options: {'; '.join(differences)}. Run it with the same ones "
                             "(variants and seeds may be added) or name another --out")
        definitions = {**stored["variants"], **definitions}
    write_json_atomic(out / OPTIONS_FILE, {"moa_compare": FORMAT_VERSION,
                                           "options": defining, "variants": definitions})
    return Plan(options, variants, rates, reference, out, defining)


# ---------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------

def write_json_atomic(path: Path, data, indent: int | None = 2) -> Path:
    """Write JSON to a temporary file beside `path`, then rename it over `path`: a reader
    (or a rerun after a crash) sees the old file or the new one, never a part."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_text_atomic(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(content)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


class PeakMemory:
    """The peak memory of a block, in MiB: on CUDA torch.cuda.max_memory_allocated (reset at
    the start); on Linux the process's peak resident set size (the kernel's high-water mark
    VmHWM, reset at the start by writing 5 to /proc/self/clear_refs), so no peak is missed;
    elsewhere the resident set size sampled every SAMPLE_SECONDS by a thread (psutil), which
    can miss a peak shorter than that."""

    SAMPLE_SECONDS = 0.05
    STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.high_water_mark = not self.cuda and self._can_reset_high_water_mark()
        if self.cuda:
            self.kind = "cuda: torch.cuda.max_memory_allocated during training"
        elif self.high_water_mark:
            self.kind = ("cpu: peak resident set size of the process during training "
                         "(VmHWM, reset at the start)")
        else:
            self.kind = ("cpu: peak resident set size of the process during training, "
                         f"sampled every {self.SAMPLE_SECONDS} s")
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    @classmethod
    def _high_water_mark_bytes(cls) -> int:
        found = re.search(r"^VmHWM:\s+(\d+) kB", cls.STATUS.read_text(), re.MULTILINE)
        if found is None:
            raise OSError("no VmHWM line in /proc/self/status")
        return int(found.group(1)) * 1024

    @classmethod
    def _can_reset_high_water_mark(cls) -> bool:
        try:
            cls._high_water_mark_bytes()
            cls.CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return True

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while True:
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            if self._stop.wait(self.SAMPLE_SECONDS):
                break
        self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.high_water_mark:
            self.CLEAR_REFS.write_text("5")
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif self.high_water_mark:
            self.peak_bytes = self._high_water_mark_bytes()
        else:
            self._stop.set()
            self._thread.join()


def router_prompts(items: Sequence) -> list[str]:
    """The prompts the router statistics are measured on: the first ROUTER_PROMPTS test
    items' contexts."""
    return [getattr(item, "context", None) or item.prompt for item in items[:ROUTER_PROMPTS]]


@torch.no_grad()
def router_statistics(model, tokenizer, prompts: Sequence[str], max_length: int) -> dict:
    """Per router of a MoAModel: expert names, mode, tokens, and the mean gate and fraction
    of tokens active per expert, over every token of `prompts` (one forward each, so no
    padding counts; the last max_length tokens of a longer prompt). {} for a model without
    routers (plain LoRA, PEFT)."""
    from moa.model import MoAModel

    if not isinstance(model, MoAModel) or model.moa_config.router is None:
        return {}
    device = next(model.parameters()).device
    totals: dict[str, dict] = {}
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"][-max_length:]
        model(input_ids=torch.tensor([ids], device=device))
        for name, entry in model.router_stats().items():
            total = totals.setdefault(name, {
                "experts": entry["experts"], "mode": entry["mode"], "tokens": 0,
                "mean_gate": np.zeros(len(entry["experts"])),
                "active_fraction": np.zeros(len(entry["experts"]))})
            total["tokens"] += entry["tokens"]
            for key in ("mean_gate", "active_fraction"):
                total[key] += entry["tokens"] * np.asarray(entry[key])
    for total in totals.values():
        for key in ("mean_gate", "active_fraction"):
            total[key] = [round(float(v), 6) for v in
                          total[key] / max(1, total["tokens"])]
    return totals


def score_result(scores: dict) -> dict:
    """The accuracy fields of a run's result from evaluate_items' dict: accuracy, and the
    length-normalised accuracy where every question is multiple choice (else None)."""
    tasks = scores["tasks"]
    all_choices = set(tasks) == {"multiple_choice"}
    return {"accuracy": scores["accuracy"],
            "accuracy_norm": tasks["multiple_choice"]["accuracy_norm"] if all_choices
            else None,
            "questions": scores["records"],
            "correct": "".join("1" if p["correct"] else "0" for p in scores["predictions"]),
            "correct_norm": "".join("1" if p["prediction_norm"] == p["answer"] else "0"
                                    for p in scores["predictions"]) if all_choices else None}


# ---------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------

@dataclass
class CompareResult:
    """The summary (what compare.json holds), the runs that failed ("variant seed K" or
    "base") and the files written."""

    summary: dict
    failed: list[str]
    files: list[Path]


def _write_failure(path: Path, error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    write_text_atomic(path, reason + "\n\n" + "".join(
        traceback.format_exception(type(error), error, error.__traceback__)))
    return reason


def _load_result(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path} is not readable JSON (moa compare writes results "
                         "atomically, so something else changed it); delete it to run that "
                         "run again") from None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _score_base(plan: Plan, base, tokenizer, items, device: torch.device,
                progress: bool, world: World) -> dict:
    options = plan.options
    started = time.perf_counter()
    model = copy.deepcopy(base).to(device).eval()
    scores = evaluate_items(model, tokenizer, items, options.eval_batch_size,
                            options.max_new_tokens, options.eval_max_length, device, progress,
                            world=world)
    del model
    return {"variant": BASE, "trainable_params": 0, **score_result(scores),
            "score_seconds": time.perf_counter() - started, "device": str(device)}


def _train_and_score(plan: Plan, variant: Variant, seed: int, base, tokenizer, items,
                     device: torch.device, log: Callable[[str], None],
                     progress: bool, world: World) -> dict:
    options = plan.options
    run_dir = plan.run_path(variant.name, seed, suffix="")
    if run_dir.exists() and world.is_main:  # what an interrupted or failed run left
        shutil.rmtree(run_dir)
    train_options = TrainOptions(
        data=options.data, model=options.model, out=str(run_dir), steps=options.steps,
        epochs=options.epochs, lr=plan.rates[variant.name], batch_size=options.batch_size,
        gradient_accumulation=options.gradient_accumulation, max_length=options.max_length,
        warmup_steps=options.warmup_steps, weight_decay=options.weight_decay,
        bf16=options.bf16, gradient_checkpointing=options.gradient_checkpointing, seed=seed,
        save_interval=SAVE_NEVER, save_total_limit=1, log_interval=options.log_interval,
        device=options.device, **variant.train_options())
    memory = PeakMemory(device)
    with memory:
        trained = run_train(train_options, lambda line: log(f"{variant.name} seed {seed}: "
                                                             f"{line}"),
                            progress=progress, base_model=copy.deepcopy(base),
                            adapt=peft_lora_model if variant.kind == "peft" else None)
    model = trained.model.eval()
    score_device = next(model.parameters()).device
    started = time.perf_counter()
    scores = evaluate_items(model, tokenizer, items, options.eval_batch_size,
                            options.max_new_tokens, options.eval_max_length, score_device,
                            progress, world=world)
    score_seconds = time.perf_counter() - started
    routers = router_statistics(model, tokenizer, router_prompts(items),
                                options.eval_max_length)
    del model, trained.model
    return {"variant": variant.name, "seed": seed, "lr": plan.rates[variant.name],
            **score_result(scores),
            "trainable_params": trained.trainable_parameters,
            "train_seconds": trained.seconds, "seconds_per_step": trained.seconds_per_step,
            "steps": trained.losses[-1][0] if trained.losses else 0,
            "examples": trained.examples, "score_seconds": score_seconds,
            "peak_memory_mb": memory.peak_mb, "peak_memory": memory.kind,
            "device": str(score_device), "losses": [list(point) for point in trained.losses],
            "router_stats": routers,
            "router_prompts": min(ROUTER_PROMPTS, len(items)),
            "adapter": str(trained.adapter_dir) if options.keep_adapters else None}


def _tidy_run_dir(plan: Plan, variant: str, seed: int) -> None:
    """Delete a finished run's folder (checkpoints, logs, plots), keeping the adapter when
    --keep-adapters is given."""
    run_dir = plan.run_path(variant, seed, suffix="")
    if not run_dir.exists():
        return
    if not plan.options.keep_adapters:
        shutil.rmtree(run_dir)
        return
    for entry in run_dir.iterdir():
        if entry.name != "adapter":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def run_compare(options: CompareOptions, log: Callable[[str], None] = print,
                progress: bool = True) -> CompareResult:
    """`moa compare` (see the module docstring). Bad input is a ValueError or OSError before
    any model loads; a run that raises (anything but KeyboardInterrupt) is recorded and the
    others go on.

    Launched as several processes (moa/distributed.py), every process calls this: each
    run trains data-parallel as `moa train` does and each process scores its share of the
    test records; rank 0 alone checks and writes DIR and prints, a run that fails on any
    process fails on all, and every process returns the same summary and failures (files
    only on rank 0)."""
    from tqdm import tqdm

    from moa.cli.data import load_evaluation_items
    from moa.cli.loading import load_base_model, load_tokenizer, model_description

    world = join_world(cpu=resolve_device(options.device).type == "cpu")
    plan = world.share(world.agree(lambda: plan_compare(options) if world.is_main else None))
    # Seed-major: a comparison cut short has every variant at its first seeds.
    runs = [(variant, seed) for seed in range(options.seeds) for variant in plan.variants]
    done, base_done = world.share(
        ([(v.name, s) for v, s in runs if plan.run_path(v.name, s).is_file()],
         plan.base_path().is_file()))
    bar = tqdm(total=len(runs) + 1, initial=len(done) + base_done, desc="compare",
               unit="run", disable=not (progress and world.is_main), mininterval=0.5,
               position=0)

    def say(line: str) -> None:
        if world.is_main:
            (tqdm.write if progress else log)(line)

    failed: list[str] = []
    try:
        say(f"moa compare: {len(plan.variants)} variants x {options.seeds} seeds on "
            f"{model_description(options.model)}; {len(done) + base_done} of {len(runs) + 1} "
            f"runs already in {plan.out}"
            + (f"; {world.size} processes (each run data-parallel)" if world.size > 1
               else ""))
        if len(done) + base_done < len(runs) + 1:
            device = world.device(options.device)
            tokenizer, items, base = world.agree(lambda: (
                load_tokenizer(options.model), load_evaluation_items(options.eval_data),
                load_base_model(options.model, torch.bfloat16 if options.bf16 else None)))
            if not base_done:
                bar.set_postfix_str("base model")

                def score_base() -> None:
                    result = _score_base(plan, base, tokenizer, items, device, progress,
                                         world)
                    if world.is_main:
                        write_json_atomic(plan.base_path(), result)
                        plan.base_path(".error.txt").unlink(missing_ok=True)

                try:
                    world.agree(score_base)
                except Exception as error:
                    reason = _record_failure(plan.base_path(".error.txt"), error, world)
                    say(f"base model: failed: {reason} (see {plan.base_path('.error.txt')})")
                    failed.append(BASE)
                _free(device)
                bar.update()
            for variant, seed in runs:
                if (variant.name, seed) in done:
                    continue
                bar.set_postfix_str(f"{variant.name} seed {seed}")
                error_path = plan.run_path(variant.name, seed, ".error.txt")

                def train_and_score(variant=variant, seed=seed, error_path=error_path):
                    result = _train_and_score(plan, variant, seed, base, tokenizer, items,
                                              device, say, progress, world)
                    if world.is_main:
                        write_json_atomic(plan.run_path(variant.name, seed), result,
                                          indent=None)
                        error_path.unlink(missing_ok=True)
                        _tidy_run_dir(plan, variant.name, seed)
                    return result

                try:
                    result = world.agree(train_and_score)
                    say(f"{variant.name} seed {seed}: accuracy {result['accuracy']:.4f}")
                except Exception as error:
                    reason = _record_failure(error_path, error, world)
                    say(f"{variant.name} seed {seed}: failed: {reason} (see {error_path})")
                    failed.append(f"{variant.name} seed {seed}")
                _free(device)
                bar.update()
    finally:
        bar.close()

    def summary_and_files():
        if not world.is_main:
            return None, []
        summary = summarize(plan)
        return summary, write_summary(plan, summary)

    summary, files = world.agree(summary_and_files)
    summary = world.share(summary)
    say(format_table(summary))
    say(f"written: {', '.join(str(f) for f in files)}")
    if failed:
        say(f"{len(failed)} run(s) failed: {', '.join(failed)}; the reasons are in "
            f"{plan.out / RUNS} (*.error.txt). Run the same command again to retry them")
    return CompareResult(summary, failed, files)


def _record_failure(path: Path, error: BaseException, world: World) -> str:
    """Write up a failed run (rank 0) and return its reason (every rank)."""
    if world.is_main:
        return _write_failure(path, error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------

def correctness_matrix(vectors: Sequence[str]) -> np.ndarray:
    """[S, Q] float64 of 0/1 from S correctness strings ("1" right, "0" wrong) of equal
    length Q."""
    if not vectors or len({len(v) for v in vectors}) != 1:
        raise ValueError("correctness vectors must be one or more, all of one length")
    return np.array([[c == "1" for c in vector] for vector in vectors], dtype=np.float64)


def bootstrap_means(values: np.ndarray, resamples: int = RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """Two-level bootstrap of the mean of values [S, Q] (seeds x questions): per resample,
    Q questions drawn with replacement (the same for every seed) and S seeds drawn with
    replacement; the mean over the drawn seeds of each one's mean over the drawn questions.
    Returns [resamples] float64."""
    seeds, questions = values.shape
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, min(resamples, 4_000_000 // max(1, questions)))
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        picks = rng.integers(0, questions, size=(count, questions))
        picks += np.arange(count)[:, None] * questions
        weights = np.bincount(picks.ravel(), minlength=count * questions).reshape(
            count, questions).astype(np.float64)  # how often each question was drawn
        per_seed = weights @ values.T / questions  # [count, S]
        drawn = rng.integers(0, seeds, size=(count, seeds))
        means[start:start + count] = np.take_along_axis(per_seed, drawn, axis=1).mean(axis=1)
    return means


def accuracy_interval(correct: np.ndarray, resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean accuracy, low, high): the mean of correct [S, Q] (0/1) and its 95% two-level
    bootstrap interval (bootstrap_means)."""
    means = bootstrap_means(correct, resamples, seed)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(correct.mean()), float(low), float(high)


def paired_difference(correct: np.ndarray, reference: np.ndarray,
                      resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(difference, low, high): the mean accuracy of correct [S, Q] minus that of reference
    [S, Q] (row k of each: the same seed; columns: the same questions) and its paired 95%
    bootstrap interval (bootstrap_means of the per-question differences)."""
    if correct.shape != reference.shape:
        raise ValueError(f"paired correctness must have one shape, got {correct.shape} and "
                         f"{reference.shape}")
    return accuracy_interval(correct - reference, resamples, seed)


# ---------------------------------------------------------------------------------------
# the summary
# ---------------------------------------------------------------------------------------

def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and v == v]
    return statistics.median(values) if values else None


def summarize(plan: Plan) -> dict:
    """compare.json's content from the results in DIR for the variants and seeds asked
    for."""
    options = plan.options
    base = _load_result(plan.base_path())
    results = {v.name: {s: r for s in range(options.seeds)
                        if (r := _load_result(plan.run_path(v.name, s))) is not None}
               for v in plan.variants}
    questions = base["questions"] if base else next(
        (r["questions"] for runs in results.values() for r in runs.values()), None)
    peak_kind = next((r["peak_memory"] for runs in results.values() for r in runs.values()),
                     None)
    reference_runs = results[plan.reference]
    rows = []
    for variant in plan.variants:
        runs = results[variant.name]
        row = {"name": variant.name, "kind": variant.kind, "source": variant.source,
               "lr": plan.rates[variant.name],
               "trainable_params": next((r["trainable_params"] for r in runs.values()), None),
               "seeds_finished": sorted(runs), "accuracy_mean": None, "accuracy_ci95": None,
               "accuracy_norm_mean": None, "seconds_per_step_median": None,
               "peak_memory_mb_max": None, "paired": None, "runs": []}
        if runs:
            correct = correctness_matrix([runs[s]["correct"] for s in sorted(runs)])
            mean, low, high = accuracy_interval(correct)
            norms = [r["accuracy_norm"] for r in runs.values()]
            row.update(
                accuracy_mean=mean, accuracy_ci95=[low, high],
                accuracy_norm_mean=None if None in norms else statistics.fmean(norms),
                seconds_per_step_median=_median([r["seconds_per_step"] for r in runs.values()]),
                peak_memory_mb_max=max(r["peak_memory_mb"] for r in runs.values()),
                runs=[{key: runs[s][key] for key in (
                    "seed", "accuracy", "accuracy_norm", "train_seconds", "seconds_per_step",
                    "peak_memory_mb", "steps")} for s in sorted(runs)])
            common = sorted(set(runs) & set(reference_runs))
            if variant.name != plan.reference and common:
                difference, low, high = paired_difference(
                    correctness_matrix([runs[s]["correct"] for s in common]),
                    correctness_matrix([reference_runs[s]["correct"] for s in common]))
                row["paired"] = {"reference": plan.reference, "seeds": common,
                                 "difference": difference, "difference_ci95": [low, high]}
        rows.append(row)
    return {
        "moa_compare": FORMAT_VERSION,
        "model": plan.defining["model"] or "the embedded text model",
        "data": options.data, "eval_data": options.eval_data, "test_questions": questions,
        "seeds": options.seeds, "reference": plan.reference,
        "training": {name: getattr(options, name) for name in (
            "steps", "epochs", "batch_size", "gradient_accumulation", "max_length",
            "warmup_steps", "weight_decay", "bf16", "gradient_checkpointing")},
        "ci_method": CI_METHOD, "paired_method": PAIRED_METHOD, "peak_memory": peak_kind,
        "base": None if base is None else {
            "name": BASE, "trainable_params": 0, "accuracy": base["accuracy"],
            "accuracy_ci95": list(accuracy_interval(correctness_matrix([base["correct"]]))[1:]),
            "accuracy_norm": base["accuracy_norm"]},
        "variants": rows,
    }


def _interval(values: list[float] | None, signed: bool = False) -> str:
    if values is None:
        return ""
    form = "+.4f" if signed else ".4f"
    return f"[{values[0]:{form}}, {values[1]:{form}}]"


def format_table(summary: dict) -> str:
    """The summary as a Markdown table: per variant the trainable parameters, mean accuracy
    with its 95% interval, the paired difference from the reference with its interval, the
    length-normalised accuracy, the median step time, the peak memory and the seeds."""
    reference = summary["reference"]
    header = ("| variant | trainable params | accuracy | 95% interval | vs " + reference +
              " | 95% interval | length-normalised | s/step | peak MiB | seeds |")
    lines = [header, "|---|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    base = summary["base"]
    if base is not None:
        norm = "" if base["accuracy_norm"] is None else f"{base['accuracy_norm']:.4f}"
        lines.append(f"| base (no adapter) | 0 | {base['accuracy']:.4f} | "
                     f"{_interval(base['accuracy_ci95'])} | | | {norm} | | | |")
    for row in summary["variants"]:
        def number(key: str, form: str, row=row) -> str:
            return "" if row[key] is None else format(row[key], form)

        paired = row["paired"]
        versus = "reference" if row["name"] == reference else \
            ("" if paired is None else f"{paired['difference']:+.4f}")
        lines.append(
            f"| {row['name']} | {number('trainable_params', ',d')} | "
            f"{number('accuracy_mean', '.4f')} | {_interval(row['accuracy_ci95'])} | "
            f"{versus} | {_interval(paired and paired['difference_ci95'], signed=True)} | "
            f"{number('accuracy_norm_mean', '.4f')} | "
            f"{number('seconds_per_step_median', '.3f')} | "
            f"{number('peak_memory_mb_max', '.0f')} | "
            f"{len(row['seeds_finished'])}/{summary['seeds']} |")
    return "\n".join(lines)


def write_summary(plan: Plan, summary: dict) -> list[Path]:
    """DIR/compare.json, DIR/compare.md and DIR/compare.png (when a run finished)."""
    from moa.cli import plots

    training = summary["training"]
    budget = f"{training['steps']} steps" if training["steps"] else \
        f"{training['epochs']:g} epochs"
    markdown = "\n".join([
        f"# moa compare: {summary['model']}", "",
        f"Training {summary['data']} ({budget}, batch {training['batch_size']} x "
        f"{training['gradient_accumulation']} accumulation, max length "
        f"{training['max_length']}); test {summary['eval_data']} "
        f"({summary['test_questions']} questions); seeds 0 to {summary['seeds'] - 1}.", "",
        format_table(summary), "",
        f"Accuracy: the mean over the seeds; its interval: {summary['ci_method']}.",
        f"vs {summary['reference']}: the mean difference in accuracy on the same questions; "
        f"its interval: {summary['paired_method']}.",
        f"s/step: median optimizer-step time; peak MiB: the largest over the seeds "
        f"({summary['peak_memory']}).", ""])
    files = [write_json_atomic(plan.out / "compare.json", summary),
             write_text_atomic(plan.out / "compare.md", markdown)]
    rows = [row for row in summary["variants"] if row["accuracy_mean"] is not None]
    if rows:
        curves = {row["name"]: [_load_result(plan.run_path(row["name"], seed))["losses"]
                                for seed in row["seeds_finished"]] for row in rows}
        base = summary["base"]
        files.append(plots.plot_comparison(
            [(row["name"], row["trainable_params"], row["accuracy_mean"],
              *row["accuracy_ci95"]) for row in rows],
            curves, plan.out / "compare.png",
            base_accuracy=None if base is None else base["accuracy"],
            title=f"moa compare: {Path(summary['eval_data']).name}"))
    return files


__all__ = ["COMPARE_OPTIONS", "CompareOptions", "CompareResult", "PeakMemory", "Plan",
           "Variant", "accuracy_interval", "bootstrap_means", "correctness_matrix",
           "format_table", "learning_rates", "paired_difference", "plan_compare",
           "resolve_learning_rates", "resolve_variants", "router_statistics", "run_compare",
           "summarize", "variant_list", "write_json_atomic"]
