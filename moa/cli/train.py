"""`moa train`: fine-tune a model's MoA adapters on a data file with the transformers Trainer.

Plan: options (defaults, then a --config file, then the flags given) -> data records ->
tokens with the loss on the response only (moa/cli/data.py) -> base model and tokenizer
(moa/cli/loading.py: the embedded text model, a checkpoint directory or a .gguf file) ->
get_moa_model with a preset or a --moa-config file -> Trainer (a progress bar, the loss
every step, an eval file's loss at intervals, checkpoints at intervals) -> the adapter saved
with MoAModel.save_pretrained into OUT/adapter, the loss curve as OUT/loss.png, the log as
OUT/log_history.json and the options as OUT/train_options.json.

Checkpoints are MoATrainer's (OUT/checkpoints/checkpoint-N: the adapter files beside the
Trainer's optimizer, scheduler, RNG and state files, not the base model, each saved whole or
not at all); `--resume last` (the newest whole one) or `--resume DIR` continues one exactly.

Before the model loads: OUT is none of the inputs and holds none of them; an OUT holding
another run (moa/cli/outputs.py) is refused unless --resume continues it or --overwrite replaces
it; OUT is probed for writing; the Trainer's arguments are built (so --bf16 without a GPU
that has bfloat16 is settled: on the CPU it trains in bf16 autocast; --fsdp and --deepspeed
where they cannot run, and a --resume checkpoint of another strategy, are refused). Ctrl-C
during the training raises TrainingInterrupted, which says where the newest checkpoint is.

Launched as several processes (torchrun, accelerate launch; moa/distributed.py), each one
runs all of this: data-parallel by default (the Trainer's DDP: each process its share of
every global batch of processes x batch x accumulation), the model also sharded under
--fsdp (moa.distributed.shard_with_fsdp2) or --deepspeed CONFIG.json (the Trainer's
DeepSpeed integration); rank 0 alone checks and writes OUT and prints, and the other
processes learn its verdicts (World.agree, World.share).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moa.cli.data import (
    DataError,
    PadCollator,
    SupervisedDataset,
    check_data_file,
    load_training_examples,
    tokenize_examples,
)
from moa.cli.options import (
    Option,
    count,
    device,
    flag,
    merge_options_with_sources,
    nonnegative_float,
    options_dataclass,
    positive_float,
    positive_int,
    preset,
    resolve_device,
    seed,
    text,
)
from moa.cli.outputs import (
    CHECKPOINTS,
    RUN_ENTRIES,
    check_not_an_input,
    check_writable,
    describe_entries,
    previous_run,
    remove_previous_run,
)
from moa.config import PRESETS
from moa.distributed import World, join_world, shard_with_fsdp2

DEFAULT_PRESET = "soft_moa"

# ---------------------------------------------------------------------------------------
# options: one table serves the flags, the --config file, the defaults and TrainOptions
# ---------------------------------------------------------------------------------------

TRAIN_OPTIONS: tuple[Option, ...] = (
    Option("model", text, None, "a local transformers checkpoint directory or a .gguf file; "
           "none: the embedded text model (random weights, for trying the commands)", "PATH"),
    Option("data", text, None, "training records, JSON or JSONL (required)", "FILE"),
    Option("preset", preset, None, f"MoAConfig preset: {', '.join(PRESETS)} (default: "
           f"{DEFAULT_PRESET} unless --moa-config is given)", "NAME"),
    Option("moa_config", text, None, "a MoAConfig as JSON (or YAML), instead of --preset",
           "FILE"),
    Option("out", text, "moa-train", "output directory; one that holds another run is "
           "refused unless --resume continues it or --overwrite replaces it", "DIR"),
    Option("overwrite", flag, False, "replace the run already in --out (its adapter/, "
           "checkpoints/, logs and plots are removed before training starts)"),
    Option("steps", positive_int, None, "optimizer steps (none: --epochs passes over the "
           "data)", "N"),
    Option("epochs", positive_float, 1.0, "passes over the data when --steps is not given",
           "N"),
    Option("lr", positive_float, 3e-4, "peak learning rate (AdamW, linear decay)", "LR"),
    Option("batch_size", positive_int, 8, "examples per device per micro-batch", "B"),
    Option("gradient_accumulation", positive_int, 1, "micro-batches per optimizer step",
           "N"),
    Option("max_length", positive_int, 512, "tokens per example at most (the prompt's start "
           "is cut first)", "N"),
    Option("warmup_steps", count, 0, "linear warm-up steps", "N"),
    Option("weight_decay", nonnegative_float, 0.0, "AdamW weight decay", "W"),
    Option("bf16", flag, False, "base model in bfloat16 and bf16 autocast (adapters stay "
           "float32)"),
    Option("gradient_checkpointing", flag, False, "recompute activations in the backward "
           "pass (less memory)"),
    Option("seed", seed, 0, "seed of the adapters' initialisation and the data order", "N"),
    Option("eval_data", text, None, "records whose loss is measured at intervals", "FILE"),
    Option("eval_interval", positive_int, None, "steps between evaluations of --eval-data "
           "(none: a fifth of the run)", "N"),
    Option("save_interval", positive_int, 500, "steps between Trainer checkpoints in "
           "OUT/checkpoints", "N"),
    Option("save_total_limit", positive_int, 2, "checkpoints kept (the oldest go)", "N"),
    Option("resume", text, None, "continue from a checkpoint: 'last' (the newest in "
           "OUT/checkpoints) or a checkpoint directory", "CHECKPOINT"),
    Option("log_interval", positive_int, None, "steps between printed losses (none: a tenth "
           "of the run)", "N"),
    Option("device", device, "auto", "auto (a CUDA GPU when there is one), cpu, cuda or "
           "cuda:N; launched as several processes, auto and cuda mean one GPU per process"),
    Option("fsdp", flag, False, "shard the model over the launched processes with FSDP2 "
           "(fully_shard per decoder layer, the frozen base sharded too; needs 2 or more "
           "processes)"),
    Option("deepspeed", text, None, "train under DeepSpeed with this config (DeepSpeed's own "
           "JSON, e.g. ZeRO-2 or ZeRO-3; 'auto' values are filled in from these options)",
           "CONFIG.json"),
)


@options_dataclass(TRAIN_OPTIONS, config=None)
class TrainOptions:
    """What `moa train` runs with: a keyword field per TRAIN_OPTIONS entry (its name and
    default; preset None means DEFAULT_PRESET unless moa_config is given), and config, the
    --config file they came from (an input, not an option)."""

    def __post_init__(self) -> None:
        if self.fsdp and self.deepspeed is not None:
            raise ValueError(f"--fsdp and --deepspeed {self.deepspeed} conflict: both shard "
                             "the model, each its own way; give one")
        if self.preset is not None and self.moa_config is not None:
            raise ValueError(f"preset {self.preset!r} and moa_config {self.moa_config!r} "
                             "conflict (a preset or a whole MoAConfig file); give one")
        if self.preset is None and self.moa_config is None:
            self.preset = DEFAULT_PRESET
        if self.overwrite and self.resume == "last":
            raise ValueError(f"--overwrite and --resume last conflict: --resume continues the "
                             f"run in {self.out}, --overwrite would remove it; give one")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainOptions:
        """The options of parsed `moa train` flags (with their --config file)."""
        values, sources = merge_options_with_sources(args, TRAIN_OPTIONS)
        if values["preset"] is not None and values["moa_config"] is not None:
            raise ValueError(f"--preset {values['preset']} (from {sources['preset']}) and "
                             f"--moa-config {values['moa_config']} (from "
                             f"{sources['moa_config']}) conflict: a preset or a whole "
                             "MoAConfig file; give one")
        options = cls(**values, config=getattr(args, "config", None))
        if options.data is None:
            raise ValueError("moa train needs --data FILE (a flag or a 'data' key of "
                             "--config)")
        return options


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `moa train`'s training: where the run can be continued from.

    checkpoint: the newest whole checkpoint in OUT/checkpoints (None: none was saved yet);
    save_interval: the steps between checkpoints; overwrite: whether the run was given
    --overwrite (a command that continues it must not be)."""

    def __init__(self, checkpoint: str | None, save_interval: int, overwrite: bool) -> None:
        super().__init__()
        self.checkpoint, self.save_interval, self.overwrite = \
            checkpoint, save_interval, overwrite


# ---------------------------------------------------------------------------------------
# the Trainer
# ---------------------------------------------------------------------------------------

def checkpoint_trainer_class():
    """The Trainer class whose checkpoints `moa train` writes and resumes from: MoATrainer,
    whose checkpoints hold the adapter (moa/trainer.py), not the whole model."""
    from moa.trainer import MoATrainer

    return MoATrainer


def _progress_callback_class():
    from tqdm import tqdm
    from transformers import TrainerCallback

    class TrainingProgress(TrainerCallback):
        """A tqdm bar with the latest loss, a printed line every `every` steps and at each
        evaluation, and the wall time of each optimizer step."""

        def __init__(self, log: Callable[[str], None], show_bar: bool,
                     every: int | None) -> None:
            self.log, self.show_bar, self.every = log, show_bar, every
            self.bar = None
            self.step_seconds: list[float] = []
            self._started = 0.0

        def write(self, line: str) -> None:
            (tqdm.write if self.bar is not None else self.log)(line)

        def on_train_begin(self, args, state, control, **kwargs):
            if self.every is None:
                self.every = max(1, state.max_steps // 10)
            if self.show_bar:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step,
                                desc="training", unit="step", mininterval=0.5)

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_seconds.append(time.perf_counter() - self._started)
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{logs['loss']:.4f}")
                if state.global_step % self.every == 0 or state.global_step in (
                        1, state.max_steps):
                    self.write(f"step {state.global_step:5d}  loss {logs['loss']:.4f}  "
                               f"lr {logs.get('learning_rate', float('nan')):.2e}")
            if "eval_loss" in logs:
                self.write(f"step {state.global_step:5d}  eval loss {logs['eval_loss']:.4f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.close()

        def close(self) -> None:
            """End the bar's line (also when the training stops on an exception, so that
            the error starts a line of its own)."""
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return TrainingProgress


# ---------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    """What `run_train` did: the loss at each step ([step, loss], the checkpoint's earlier
    steps included after a resume), the eval losses, the trained MoAModel, the files
    written, the median wall time of an optimizer step in this run and the total."""

    losses: list[tuple[int, float]]
    eval_losses: list[tuple[int, float]]
    model: object
    adapter_dir: Path
    examples: int
    skipped: int
    trainable_parameters: int
    seconds_per_step: float
    seconds: float
    files: list[Path] = field(default_factory=list)


def load_moa_config(options: TrainOptions):
    """The MoAConfig of --moa-config (JSON, or YAML by its suffix) or of --preset."""
    from moa.config import MoAConfig

    if options.moa_config is None:
        return MoAConfig.preset(options.preset)
    path = Path(options.moa_config)
    if not path.is_file():
        raise FileNotFoundError(f"no such MoA config file: {str(path)!r}")
    raw = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw)
        else:
            data = json.loads(raw)
    except Exception as error:  # JSON and YAML parsers' errors: both mean "not readable"
        raise ValueError(f"{path} is not a readable MoAConfig: {type(error).__name__}: "
                         f"{str(error).splitlines()[0]}") from None
    try:
        return MoAConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None


def _check_output_dir(out: Path) -> None:
    for folder in (*reversed(out.parents), out, out / "adapter", out / CHECKPOINTS):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"cannot write into {out}: {folder} is a file, not a "
                                     "directory")
    for name in ("loss.png", "log_history.json", "train_options.json"):
        if (out / name).is_dir():
            raise IsADirectoryError(f"cannot write {out / name}: it is a directory")


def resolve_resume(options: TrainOptions, log: Callable[[str], None] = print) -> str | None:
    """The checkpoint directory to resume from, or None; ValueError when there is none.
    `--resume last` takes the newest whole checkpoint in OUT/checkpoints (saying which newer
    ones it passed over: a checkpoint that lacks files is never resumed from)."""
    from moa.trainer import last_whole_checkpoint, missing_checkpoint_files

    if options.resume is None:
        return None
    if options.resume == "last":
        folder = Path(options.out) / CHECKPOINTS
        last, passed_over = last_whole_checkpoint(folder)
        for checkpoint in passed_over:
            log(f"--resume last: passing over {checkpoint}: it lacks "
                f"{', '.join(missing_checkpoint_files(checkpoint))}")
        if last is None:
            raise ValueError(f"--resume last: no checkpoint in {folder} to resume from"
                             + (f" ({len(passed_over)} lack files)" if passed_over else ""))
        return last
    path = Path(options.resume)
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"--resume {options.resume!r} is not a Trainer checkpoint directory "
                         "(no trainer_state.json in it)")
    missing = missing_checkpoint_files(path)
    if missing:
        raise ValueError(f"--resume {options.resume!r} is not a whole checkpoint: it lacks "
                         f"{', '.join(missing)}")
    return str(path)


def _continues_the_run_in_out(options: TrainOptions, resume: str | None) -> bool:
    """Whether the run resumes from a checkpoint of the run in OUT."""
    if resume is None:
        return False
    checkpoints = (Path(options.out) / CHECKPOINTS).resolve()
    return checkpoints in Path(resume).resolve().parents


def check_outputs(options: TrainOptions, resume: str | None) -> list[str]:
    """The checks on OUT that need nothing loaded: it is none of the inputs and holds none
    of them, and a run already in it is continued (--resume) or replaced (--overwrite),
    never written over otherwise. Returns the entries of the run to replace (empty unless
    --overwrite)."""
    out = Path(options.out)
    check_not_an_input(out, {"--data": options.data, "--eval-data": options.eval_data,
                             "--config": options.config, "--moa-config": options.moa_config,
                             "--model": options.model})
    continuing = _continues_the_run_in_out(options, resume)
    if options.overwrite and continuing:
        raise ValueError(f"--overwrite and --resume {options.resume} conflict: --resume "
                         f"continues the run in {out}, --overwrite would remove it; give one")
    found = previous_run(out)
    if not found or continuing:
        return []
    if options.overwrite:
        return found
    what = describe_entries(out, found)
    if CHECKPOINTS in found:
        ways = "continue it with --resume last, or replace it with --overwrite"
    else:
        ways = "replace it with --overwrite (it has no checkpoint for --resume to continue)"
    raise ValueError(f"--out {out} holds another run ({what}): {ways}, or choose another "
                     "--out")


def _tokenized(tokenizer, path: str, max_length: int, log: Callable[[str], None]):
    examples = load_training_examples(path, warn=lambda line: log(f"warning: {line}"))
    tokenized = tokenize_examples(tokenizer, examples, max_length)
    if not tokenized.features:
        reasons = []
        if tokenized.empty_response:
            reasons.append(f"{tokenized.empty_response} with an empty response")
        if tokenized.no_room:
            reasons.append(f"{tokenized.no_room} with no room for a response within "
                           f"--max-length {max_length}")
        raise DataError(f"{path}: no usable record ({len(examples)} records: "
                        f"{', '.join(reasons)})")
    return examples, tokenized


def _checkpointing_arguments(arguments_class, enabled: bool) -> dict:
    """Activation checkpointing for TrainingArguments, under its name in this transformers
    version (activation_checkpointing from v5, gradient_checkpointing before)."""
    names = {f.name for f in dataclasses.fields(arguments_class)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}}


def _steps_per_epoch(examples: int, options: TrainOptions, processes: int = 1) -> int:
    """Optimizer steps per pass over `examples`, as the Trainer counts them: each process
    takes every processes-th batch (the last ones padded by repeating examples)."""
    batches = math.ceil(math.ceil(examples / options.batch_size) / processes)
    return max(1, math.ceil(batches / options.gradient_accumulation))


def _uses_cpu(options: TrainOptions) -> bool:
    """Whether --device means the CPU (auto: when there is no CUDA GPU)."""
    return resolve_device(options.device).type == "cpu"


def _check_precision(options: TrainOptions) -> None:
    """--bf16 needs a GPU with bfloat16 (compute capability 8.0 or more) unless on the CPU,
    where torch's autocast runs bfloat16."""
    if options.bf16 and not _uses_cpu(options) and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(_gpu_index(options) or 0)
        raise ValueError(f"--bf16: this GPU ({name}) does not support bfloat16; leave out "
                         "--bf16 (float32), or train on the CPU with --device cpu")


def _gpu_index(options: TrainOptions) -> int | None:
    """N of --device cuda:N (None for any other device)."""
    if options.device in ("auto", "cpu", "cuda"):
        return None
    return torch.device(options.device).index


def _pin_gpu(arguments, index: int) -> None:
    """Make the Trainer train on GPU `index` alone: transformers' single-process device
    choice is always cuda:0 (and nn.DataParallel over every visible GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"--device cuda:{index} picks one GPU, but this is a distributed "
                         "launch, where each process takes its own: use --device cuda")
    wanted = torch.device("cuda", index)
    _ = arguments.device  # transformers' own set-up first (its distributed state)
    torch.cuda.set_device(wanted)  # accelerate's device is "cuda": the current one
    # TrainingArguments.device and .n_gpu read the cached result of _setup_devices.
    arguments.__dict__["_setup_devices"] = wanted
    arguments._n_gpu = 1
    if arguments.device != wanted or arguments.n_gpu != 1:
        raise ValueError(f"--device cuda:{index}: this transformers version's Trainer would "
                         f"train on {arguments.device}; use --device cuda with "
                         f"CUDA_VISIBLE_DEVICES={index}")


@dataclass
class _Prepared:
    """What run_train settles before the model loads (see run_train)."""

    config: object
    tokenizer: object
    train: object
    evaluation: object
    total: int
    arguments: object
    resume: str | None
    replaced: list[str]


def _strategy(options: TrainOptions) -> str:
    """How the model is spread over the processes: deepspeed, fsdp or ddp (a plain replica
    per process; in a world of one, no wrapper at all)."""
    return "deepspeed" if options.deepspeed else "fsdp" if options.fsdp else "ddp"


def _check_strategy(options: TrainOptions, world: World) -> None:
    """--fsdp and --deepspeed where they can run, in one line each, before anything loads."""
    if options.fsdp and world.size == 1:
        raise ValueError("--fsdp shards the model over several processes, but this is one "
                         "process: launch it with torchrun --nproc-per-node N (N >= 2) or "
                         "accelerate launch --num-processes N, or leave out --fsdp")
    if options.deepspeed is None:
        return
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"--deepspeed {options.deepspeed}: the deepspeed package is not "
                         "installed (pip install deepspeed), or leave out --deepspeed")
    if world.size == 1 and "LOCAL_RANK" not in os.environ:
        raise ValueError("--deepspeed needs a launcher that gives each process its rank, even "
                         "for one process: run it under torchrun --nproc-per-node N or "
                         "accelerate launch --num-processes N")
    path = Path(options.deepspeed)
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed: no such DeepSpeed config file: "
                                f"{options.deepspeed!r}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--deepspeed {options.deepspeed} is not a JSON DeepSpeed config: "
                         f"{error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed {options.deepspeed} must hold a JSON object (DeepSpeed's "
                         f"config), not a {type(config).__name__}")


def _check_resume_fits(resume: str, options: TrainOptions, world: World) -> None:
    """A checkpoint's optimizer state is its strategy's own (moa.trainer.checkpoint_strategy):
    resuming needs the same strategy, and under DeepSpeed the same number of processes (its
    ZeRO partitions are per process); ValueError in one line otherwise."""
    from moa.trainer import checkpoint_strategy, checkpoint_world_size

    written_by = checkpoint_strategy(resume)
    wanted = _strategy(options)
    how = {"deepspeed": "with --deepspeed", "fsdp": "with --fsdp",
           "ddp": "without --fsdp or --deepspeed"}
    if written_by != wanted:
        raise ValueError(f"--resume {resume}: this checkpoint was written {how[written_by]} "
                         f"and this run is {how[wanted]}: resume it {how[written_by]} (the "
                         "optimizer state in a checkpoint is its strategy's own)")
    processes = checkpoint_world_size(resume)
    if written_by == "deepspeed" and processes != world.size:
        raise ValueError(f"--resume {resume}: this DeepSpeed checkpoint was written by "
                         f"{processes} process(es), this run has {world.size}; DeepSpeed "
                         f"resumes its ZeRO partitions only with the same number: launch "
                         f"{processes}")


def _prepare(options: TrainOptions, world: World, log: Callable[[str], None]) -> _Prepared:
    """run_train's checks and settings before the model loads, on every rank; those of the
    output folder (and what a --resume or an --overwrite finds there) on rank 0 only."""
    from transformers import TrainingArguments

    from moa.cli.loading import load_tokenizer

    out = Path(options.out)
    if world.is_main:
        _check_output_dir(out)
    for path in (options.data, options.eval_data):
        if path is not None:
            check_data_file(path)  # a missing path, a directory, a FIFO: one line each
    resume, replaced = None, []
    if world.is_main:
        resume = resolve_resume(options, log)
        replaced = check_outputs(options, resume)
        if resume is not None:
            _check_resume_fits(resume, options, world)
    config = load_moa_config(options)
    _check_precision(options)
    _check_strategy(options, world)
    tokenizer = load_tokenizer(options.model)
    examples, train = _tokenized(tokenizer, options.data, options.max_length, log)
    evaluation = _tokenized(tokenizer, options.eval_data, options.max_length, log)[1] \
        if options.eval_data else None

    total = options.steps or math.ceil(
        options.epochs * _steps_per_epoch(len(train.features), options, world.size))
    use_cpu = _uses_cpu(options)
    strategy = {}
    if options.fsdp:
        # run_train shards the model itself (shard_with_fsdp2: accelerate's FSDP plugin runs
        # on GPUs only) and the Trainer takes it as a model sharded when it loaded, which it
        # accepts only with save_only_model; MoATrainer saves the optimizer, scheduler and
        # RNG states of such a model all the same.
        strategy = {"save_only_model": True}
    elif options.deepspeed:
        strategy = {"deepspeed": options.deepspeed}
    arguments = TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        max_steps=options.steps or -1, num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.gradient_accumulation,
        learning_rate=options.lr, warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay, bf16=options.bf16,
        seed=options.seed, data_seed=options.seed, logging_steps=1,
        save_strategy="steps", save_steps=options.save_interval,
        save_total_limit=options.save_total_limit,
        eval_strategy="steps" if evaluation else "no",
        eval_steps=(options.eval_interval or max(1, total // 5)) if evaluation else None,
        report_to=[], remove_unused_columns=False, use_cpu=use_cpu,
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=not use_cpu,
        **strategy,
        **_checkpointing_arguments(TrainingArguments, options.gradient_checkpointing))
    if _gpu_index(options) is not None:
        _pin_gpu(arguments, _gpu_index(options))
    if world.is_main:
        check_writable(out, RUN_ENTRIES)
    return _Prepared(config, tokenizer, train, evaluation, total, arguments, resume, replaced)


def _quiet(_: str) -> None:
    """What the ranks other than 0 print: nothing."""


# accelerate's Accelerator sets these in os.environ for good once given a DeepSpeed (FSDP)
# plugin, and every later Accelerator of the process reads them: a later run_train in the
# same process (moa compare's runs, a notebook) would train under DeepSpeed unasked.
ACCELERATE_SWITCHES = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


@contextlib.contextmanager
def _environment_kept(names: tuple[str, ...]):
    """The environment variables `names` as they were before the block, after it."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_train(options: TrainOptions, log: Callable[[str], None] = print,
              progress: bool = True, *, base_model: torch.nn.Module | None = None,
              adapt: Callable[[torch.nn.Module], torch.nn.Module] | None = None
              ) -> TrainResult:
    """`moa train` (see the module docstring); `log` receives the printed lines, progress
    shows a tqdm bar. Raises ValueError or OSError (FileNotFoundError, DataError) for bad
    input, before the model is loaded where it can: the output folder's checks (see
    check_outputs; then a probe file written and removed), the data, the Trainer's
    arguments. Ctrl-C during the training raises TrainingInterrupted. base_model:
    options.model already loaded (it is adapted in place) instead of loading it; adapt:
    builds the model to train from the base instead of get_moa_model with the preset or
    --moa-config (e.g. a PEFT model, which the Trainer checkpoints and save_pretrained
    writes as PEFT does).

    Launched as several processes (torchrun, accelerate launch: see moa/distributed.py),
    every process calls this; it trains data-parallel (each process its share of every
    global batch of processes x batch x accumulation examples; under --fsdp or --deepspeed
    the model sharded too), rank 0 alone checks and writes OUT and prints (log and the bar),
    and an error on any rank before the training, or in writing OUT after it, is raised on
    every rank. Every process returns the same losses; files lists what rank 0 wrote (empty
    on the others)."""
    from transformers import PrinterCallback, ProgressCallback, set_seed

    from moa.cli.loading import load_base_model, model_description
    from moa.model import get_moa_model
    from moa.trainer import last_whole_checkpoint

    started = time.perf_counter()
    out = Path(options.out)
    world = join_world(cpu=_uses_cpu(options))
    say = log if world.is_main else _quiet
    prepared = world.agree(lambda: _prepare(options, world, say))
    resume, replaced = world.share((prepared.resume, prepared.replaced))
    train, evaluation, arguments = prepared.train, prepared.evaluation, prepared.arguments

    def load_model() -> torch.nn.Module:
        set_seed(options.seed)
        base = base_model if base_model is not None else \
            load_base_model(options.model, torch.bfloat16 if options.bf16 else None)
        positions = getattr(base.config, "max_position_embeddings", None)
        if positions is not None and options.max_length > positions:
            raise ValueError(f"--max-length {options.max_length} is longer than the model's "
                             f"{positions} positions")
        return adapt(base) if adapt is not None else get_moa_model(base, prepared.config)

    model = world.agree(load_model)
    if options.fsdp:
        world.agree(lambda: shard_with_fsdp2(model, world, world.device(options.device)))
    skipped = train.empty_response + train.no_room
    method = f"MoA config {options.moa_config}" if options.moa_config else \
        f"preset {options.preset}"
    if adapt is not None:
        method = f"adapted as {type(model).__name__}"
    say(f"model {model_description(options.model)}; {method}")
    say(f"data {options.data}: {len(train.features)} examples"
        + (f" ({skipped} left out: empty or no room)" if skipped else ""))
    if world.size > 1:
        how = {"ddp": "data-parallel", "fsdp": "data-parallel, the model sharded by FSDP2",
               "deepspeed": f"DeepSpeed {options.deepspeed}"}[_strategy(options)]
        say(f"{world.size} processes ({world.backend}; {how}): a global batch of "
            f"{world.size} x {options.batch_size} x {options.gradient_accumulation} "
            f"(processes x batch x accumulation) = "
            f"{world.size * options.batch_size * options.gradient_accumulation} examples "
            f"per step, {prepared.total} steps")
    if world.is_main:
        model.print_trainable_parameters()

    progress_callback = _progress_callback_class()(say, progress and world.is_main,
                                                   options.log_interval)
    with _environment_kept(ACCELERATE_SWITCHES):
        trainer = checkpoint_trainer_class()(
            model=model, args=arguments, train_dataset=SupervisedDataset(train.features),
            eval_dataset=SupervisedDataset(evaluation.features) if evaluation else None,
            data_collator=PadCollator(prepared.tokenizer.pad_token_id),
            callbacks=[progress_callback])
        for callback in (ProgressCallback, PrinterCallback):
            trainer.remove_callback(callback)

        def replace_previous_run() -> None:
            if replaced and world.is_main:
                say(f"--overwrite: replacing the run in {out} (removing "
                    f"{describe_entries(out, replaced)})")
                remove_previous_run(out)

        world.agree(replace_previous_run)
        if resume:
            say(f"resuming from {resume}")
        try:
            trainer.train(resume_from_checkpoint=resume)
        except KeyboardInterrupt:
            raise TrainingInterrupted(last_whole_checkpoint(out / CHECKPOINTS)[0],
                                      options.save_interval, options.overwrite) from None
        finally:
            progress_callback.close()
    model.eval()

    adapter_dir = out / "adapter"
    history = trainer.state.log_history
    losses = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    eval_losses = [(entry["step"], entry["eval_loss"]) for entry in history
                   if "eval_loss" in entry]

    def write_outputs() -> list[Path]:
        try:
            model.save_pretrained(adapter_dir)  # every rank: a sharded model is gathered
        except Exception as error:
            if type(error).__name__ != "SafetensorError":  # not an OSError, even when it is
                raise
            raise OSError(f"cannot save the adapter into {adapter_dir}: {error}") from error
        if not world.is_main:
            return []
        files = [adapter_dir, _write_json(out / "log_history.json", history),
                 _write_json(out / "train_options.json", asdict(options))]
        if losses:
            from moa.cli import plots

            curves = {"training loss": losses}
            if eval_losses:
                curves[f"eval loss ({Path(options.eval_data).name})"] = eval_losses
            files.append(plots.plot_loss_curves(curves, out / "loss.png",
                                                title=f"moa train: {_title(options)}"))
        return files

    files = world.agree(write_outputs)  # the other ranks return once rank 0 has written
    seconds_per_step = statistics.median(progress_callback.step_seconds) \
        if progress_callback.step_seconds else float("nan")
    result = TrainResult(losses, eval_losses, model, adapter_dir, len(train.features),
                         skipped, sum(p.numel() for p in model.parameters() if p.requires_grad),
                         seconds_per_step,
                         time.perf_counter() - started, files)
    if losses:
        say(f"loss {losses[0][1]:.4f} (step {losses[0][0]}) -> {losses[-1][1]:.4f} (step "
            f"{losses[-1][0]}); {seconds_per_step:.3f} s per step (median)")
    say(f"adapter saved to {adapter_dir}; loss curve {out / 'loss.png'}")
    return result


def _title(options: TrainOptions) -> str:
    model = Path(options.model).name if options.model else "embedded model"
    method = Path(options.moa_config).name if options.moa_config else options.preset
    return f"{method} on {model}\n{Path(options.data).name}"


def _write_json(path: Path, data) -> Path:
    from moa.serialization import write_file_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    return path


__all__ = ["TRAIN_OPTIONS", "TrainOptions", "TrainResult", "TrainingInterrupted",
           "check_outputs", "checkpoint_trainer_class", "load_moa_config", "run_train"]
