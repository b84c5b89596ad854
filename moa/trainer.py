"""Adapter-only checkpoints with the transformers Trainer: `MoATrainer` / `MoATrainerMixin`.

The Trainer treats an adapter model specially only when it is a PEFT model
(`transformers.trainer_utils._is_peft_model`: an isinstance check on peft.PeftModel): then
`save_model` calls the unwrapped model's `save_pretrained(dir, state_dict=...,
is_main_process=...)`, and resuming or loading the best model calls its `load_adapter(dir,
...)` on finding adapter_model.safetensors. Any other model gets `model.safetensors` with the
whole state dict (about 16 GB per checkpoint for an 8B base) and no adapter. A MoAModel has
PEFT's interface (save_pretrained with those keywords, load_adapter, active_adapters,
get_base_model, `_hf_peft_config_loaded` for the quantized-base check) but is no PeftModel,
so the mixin overrides exactly the three places where the Trainer branches on that check and
leaves everything else to it (optimizer, scheduler, scaler and RNG files, the trainer state,
checkpoint rotation, the Hub):

- `save_model` (every checkpoint, and the user's save_model): the adapter files
  (moa_config.json + adapter_model.safetensors), written by MoAModel.save_pretrained on every
  rank (so FSDP1, FSDP2 and ZeRO-3 shards are gathered: the MoA tensors only, not the whole
  model), then the tokenizer or processor and training_args.bin as the Trainer writes them;
- `_load_from_checkpoint` (resume_from_checkpoint) and `_load_best_model`
  (load_best_model_at_end): MoAModel.load_adapter on the checkpoint's adapter files.

Sharded training (`_save_optimizer_and_scheduler`): under DeepSpeed the engine's checkpoint
(global_stepN/, latest) leaves the frozen parameters out (exclude_frozen_parameters; its ZeRO
partitions hold the trainable ones) and resuming reads it non-strict about the module's
keys, as for PEFT models. A model sharded with FSDP2 before training
(moa.distributed.shard_with_fsdp2, what `moa train --fsdp` does; the Trainer's route for
models sharded when they load) gets its optimizer state whole in optimizer.bin (FSDP's full
state dict: it fits any number of processes), its scheduler, scaler and RNG states, and on
resuming the adapter files loaded into its shards. (Under accelerate's own FSDP plugin, on
GPUs, the Trainer writes and reads its FSDP files as for any model, the base included.)
`checkpoint_strategy` tells the kinds of checkpoint apart by their optimizer files.

Two more things the mixin adds to the Trainer's checkpoints:

- Each checkpoint is saved atomically: the Trainer writes it into a staging folder
  (`_partial-checkpoint-N` beside the checkpoints: the underscore keeps it out of the
  Trainer's Hub uploads, and no checkpoint search matches it) that is renamed to
  `checkpoint-N` once every file is in it; a failed save (a full disk, Ctrl-C) removes the
  staging folder, so a `checkpoint-N` folder is always whole. A write failure is an OSError
  whose one-line message names the checkpoint. With several processes, each writes its
  part (RNG state, engine partitions) into the same staging folder, the main one renames
  it once every process has written, and a failure on any process fails the save on all
  of them (none is left waiting).
- Resuming from a damaged checkpoint fails with a ValueError that names the file
  (trainer_state.json that is not a Trainer state, a truncated or overwritten optimizer.pt,
  scheduler.pt, scaler.pt or rng_state.pth) instead of a parser's traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import zipfile

import torch
from transformers import Trainer
from transformers.trainer import (
    OPTIMIZER_NAME,
    SCALER_NAME,
    SCHEDULER_NAME,
    TRAINER_STATE_NAME,
    TRAINING_ARGS_NAME,
)
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from moa.config import CONFIG_NAME
from moa.distributed import current_world
from moa.model import MoAModel
from moa.serialization import WEIGHTS_NAME

STAGING_PREFIX = "_partial-"
RNG_STATE_NAME = "rng_state.pth"
FSDP_OPTIMIZER_NAME = "optimizer.bin"  # accelerate's name for FSDP's full optimizer state
DEEPSPEED_LATEST = "latest"  # DeepSpeed's file naming its newest global_stepN folder
# What a checkpoint of `moa train` (one MoA adapter, the Trainer's optimizer and scheduler)
# holds when whole, without sharding (one process, or DDP); the Trainer writes
# trainer_state.json last. Under FSDP optimizer.bin takes optimizer.pt's place; DeepSpeed's
# checkpoint holds the optimizer (and its own scheduler, if its config has one).
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, OPTIMIZER_NAME, SCHEDULER_NAME,
                    TRAINER_STATE_NAME)
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_RNG_STATE_OF_RANK = re.compile(r"^rng_state_(\d+)\.pth$")


def checkpoint_strategy(directory: str | os.PathLike) -> str:
    """Which strategy wrote the checkpoint `directory`, by its optimizer files: "deepspeed"
    (DeepSpeed's `latest` file), "fsdp" (optimizer.bin) or "ddp" (optimizer.pt: one process
    or DDP)."""
    if os.path.isfile(os.path.join(directory, DEEPSPEED_LATEST)):
        return "deepspeed"
    if os.path.isfile(os.path.join(directory, FSDP_OPTIMIZER_NAME)):
        return "fsdp"
    return "ddp"


def checkpoint_world_size(directory: str | os.PathLike) -> int:
    """How many processes wrote the checkpoint `directory`: the Trainer saves one RNG state
    per process (rng_state_K.pth) when there are several, rng_state.pth when there is one."""
    ranks = [name for name in os.listdir(directory) if _RNG_STATE_OF_RANK.match(name)]
    return len(ranks) or 1


def missing_checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """What the checkpoint `directory` lacks of what its strategy writes (CHECKPOINT_FILES,
    with FSDP's and DeepSpeed's optimizer files in place of optimizer.pt): none for a whole
    checkpoint."""
    names = [CONFIG_NAME, WEIGHTS_NAME, TRAINER_STATE_NAME]
    strategy = checkpoint_strategy(directory)
    if strategy == "deepspeed":
        latest = os.path.join(directory, DEEPSPEED_LATEST)
        with open(latest, encoding="utf-8") as handle:
            tag = handle.read().strip()
        missing = [name for name in names if not os.path.isfile(os.path.join(directory, name))]
        if not tag or not os.path.isdir(os.path.join(directory, tag)):
            missing.append(f"{tag or 'the folder'}/ (that {DEEPSPEED_LATEST} names)")
        return missing
    names[2:2] = [FSDP_OPTIMIZER_NAME if strategy == "fsdp" else OPTIMIZER_NAME,
                  SCHEDULER_NAME]
    return [name for name in names if not os.path.isfile(os.path.join(directory, name))]


def checkpoints_newest_first(folder: str | os.PathLike) -> list[str]:
    """The `checkpoint-N` folders in `folder`, highest N first (none if `folder` is not a
    folder)."""
    if not os.path.isdir(folder):
        return []
    steps = {}
    for name in os.listdir(folder):
        match = _CHECKPOINT_NAME.match(name)
        if match and os.path.isdir(os.path.join(folder, name)):
            steps[os.path.join(folder, name)] = int(match.group(1))
    return sorted(steps, key=steps.get, reverse=True)


def last_whole_checkpoint(folder: str | os.PathLike) -> tuple[str | None, list[str]]:
    """The newest `checkpoint-N` in `folder` that holds every CHECKPOINT_FILES (None if
    there is none), and the newer ones passed over because they lack some."""
    passed_over = []
    for checkpoint in checkpoints_newest_first(folder):
        if not missing_checkpoint_files(checkpoint):
            return checkpoint, passed_over
        passed_over.append(checkpoint)
    return None, passed_over


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _is_write_failure(error: BaseException) -> bool:
    """Whether `error` says a file could not be written: an OSError (a full disk, no
    permission), a SafetensorError, or torch.save's zip writer failing (a RuntimeError from
    its inline_container.cc)."""
    return isinstance(error, OSError) or type(error).__name__ == "SafetensorError" or (
        isinstance(error, RuntimeError) and "inline_container" in str(error))


def _write_failure_reason(error: BaseException) -> str:
    errno = getattr(error, "errno", None)
    return os.strerror(errno) if errno else _first_line(error) or type(error).__name__


def _torch_file_problem(path: str) -> str | None:
    """Why the torch.save file at `path` cannot be read whole (None: it can, or it is
    absent). torch.save writes a zip archive: a truncated or overwritten one has no central
    directory, a damaged entry fails its checksum. Nothing is unpickled."""
    if not os.path.isfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError):
        return "is not a whole PyTorch file (truncated or overwritten)"
    return None if damaged is None else f"is damaged (its entry {damaged} fails its checksum)"


@contextlib.contextmanager
def _reading(checkpoint: str, names: tuple[str, ...], what: str):
    """Turn a failure to restore `what` from `checkpoint`'s files `names` into a one-line
    ValueError naming the damaged file (running out of memory stays what it is)."""
    try:
        yield
    except Exception as error:
        if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
            raise
        for name in names:
            problem = _torch_file_problem(os.path.join(checkpoint, name))
            if problem is not None:
                raise ValueError(f"cannot resume from {checkpoint}: {name} {problem}; resume "
                                 "from another checkpoint or start again") from error
        raise ValueError(f"cannot resume from {checkpoint}: its {what} ({', '.join(names)}) "
                         f"do not fit this run: {type(error).__name__}: "
                         f"{_first_line(error)}") from error


def check_trainer_state(checkpoint: str | os.PathLike) -> None:
    """ValueError, naming the file, when `checkpoint`'s trainer_state.json is missing or is
    not a Trainer state the Trainer can read."""
    path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"cannot resume from {os.fspath(checkpoint)}: it has no "
                         f"{TRAINER_STATE_NAME} (not a whole Trainer checkpoint)")
    try:
        TrainerState.load_from_json(path)
    except (ValueError, TypeError) as error:  # JSON and decoding errors; unknown fields
        raise ValueError(f"cannot resume from {os.fspath(checkpoint)}: {path} is damaged "
                         f"or not a Trainer state ({type(error).__name__}: "
                         f"{_first_line(error)})") from None


class MoATrainerMixin:
    """Mix into a transformers Trainer subclass (before it: `class T(MoATrainerMixin,
    SFTTrainer)`) to checkpoint a MoAModel's adapter instead of the whole model. Models that
    are not MoAModels are saved and loaded as the Trainer does."""

    def _moa_model(self) -> MoAModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, MoAModel) else None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter (moa_config.json + adapter_model.safetensors) into `output_dir` (the
        run's output_dir by default), from every rank, written by the main one; then what the
        Trainer saves beside a model (tokenizer or processor, training arguments)."""
        moa = self._moa_model()
        if moa is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = self.args.output_dir if output_dir is None else output_dir
        moa.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if self.args.should_save:
            self._save_beside_adapter(output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Reached only through paths that bypass save_model (e.g. a subclass's own call).
        moa = self._moa_model()
        if moa is None:
            return super()._save(output_dir, state_dict)
        output_dir = self.args.output_dir if output_dir is None else output_dir
        if self.args.should_save:
            moa.save_pretrained(output_dir, state_dict=state_dict, is_main_process=True)
            self._save_beside_adapter(output_dir)

    def _save_beside_adapter(self, output_dir: str) -> None:
        """What Trainer._save writes beside the model's own files."""
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _adapter_in(self, directory: str) -> bool:
        return all(os.path.isfile(os.path.join(directory, name))
                   for name in (CONFIG_NAME, WEIGHTS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # A model sharded by shard_with_fsdp2 (no accelerate FSDP plugin) comes here too:
        # load_adapter fills its sharded MoA tensors from the whole ones.
        moa = self._moa_model()
        if moa is None or self.is_fsdp_enabled or self.is_deepspeed_enabled \
                or not self._adapter_in(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        moa.load_adapter(resume_from_checkpoint, is_trainable=True)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's, but a MoA model's checkpoint holds no base weights: under
        DeepSpeed its checkpoint leaves the frozen parameters out, and a model sharded with
        FSDP2 before training (moa.distributed.shard_with_fsdp2) gets its optimizer state
        whole in optimizer.bin (see the module docstring)."""
        if self._moa_model() is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        if self._moa_fsdp2():
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            state = get_optimizer_state_dict(  # a collective: gathered whole on every rank
                self.model, _torch_optimizer(self.optimizer),
                options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.args.should_save:
                torch.save(state, os.path.join(output_dir, FSDP_OPTIMIZER_NAME))
            own_scheduler = True
        elif self.is_deepspeed_enabled:
            from accelerate.utils import DeepSpeedSchedulerWrapper

            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            own_scheduler = not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper)
        else:
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and own_scheduler:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _moa_fsdp2(self) -> bool:
        """Whether the model is a MoA model that moa.distributed.shard_with_fsdp2 sharded
        before training (the Trainer's route for models sharded when they load)."""
        return bool(getattr(self, "is_distributed_loading_by_transformers", False)) and \
            self._moa_model() is not None

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        # The Trainer's reads the model's transformers DistributedConfig, which a model
        # sharded by shard_with_fsdp2 has not: plain FSDP2, no replica groups.
        if not self._moa_fsdp2():
            with super()._defer_fsdp_gradient_reduction():
                yield
            return
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    @contextlib.contextmanager
    def _deepspeed_resumes_without_the_base(self):
        """Under DeepSpeed the Trainer resumes through transformers.trainer's
        deepspeed_load_checkpoint, strict about the module's keys except for PEFT models; a
        MoA checkpoint leaves the frozen base out, so for a MoA model it is called
        non-strict, as for a PEFT model (the trainable tensors come back from the ZeRO
        partitions either way)."""
        import transformers.trainer as trainer_module

        if self._moa_model() is None or not self.is_deepspeed_enabled:
            yield
            return
        original = trainer_module.deepspeed_load_checkpoint

        def load_without_the_base(engine, checkpoint, load_module_strict=True):
            return original(engine, checkpoint, load_module_strict=False)

        trainer_module.deepspeed_load_checkpoint = load_without_the_base
        try:
            yield
        finally:
            trainer_module.deepspeed_load_checkpoint = original

    def _load_best_model(self) -> None:
        moa = self._moa_model()
        best = self.state.best_model_checkpoint
        if moa is None or self.is_fsdp_enabled or self.is_deepspeed_enabled \
                or not self._adapter_in(best):
            return super()._load_best_model()
        moa.load_adapter(best, is_trainable=True)

    # ---- resuming: damaged files as one line ----------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """Trainer.train; `resume_from_checkpoint=True` takes the newest whole checkpoint in
        output_dir (never one a failed save left), and a checkpoint's trainer_state.json is
        checked first (see the module docstring)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint, _ = last_whole_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no whole checkpoint in {self.args.output_dir} to resume "
                                 "from")
        if resume_from_checkpoint not in (None, False):
            check_trainer_state(resume_from_checkpoint)
        with self._deepspeed_resumes_without_the_base():
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._moa_fsdp2():
            with _reading(checkpoint, (OPTIMIZER_NAME, SCHEDULER_NAME),
                          "optimizer and scheduler states"):
                return super()._load_optimizer_and_scheduler(checkpoint)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        with _reading(checkpoint, (FSDP_OPTIMIZER_NAME, SCHEDULER_NAME),
                      "optimizer and scheduler states"):
            state = torch.load(os.path.join(checkpoint, FSDP_OPTIMIZER_NAME),
                               map_location="cpu", weights_only=True)
            set_optimizer_state_dict(self.model, _torch_optimizer(self.optimizer), state,
                                     options=StateDictOptions(full_state_dict=True))
            self.lr_scheduler.load_state_dict(
                torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _load_scaler(self, checkpoint: str | None) -> None:
        with _reading(checkpoint, (SCALER_NAME,), "gradient scaler state"):
            return super()._load_scaler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        rng_file = RNG_STATE_NAME if self.args.world_size <= 1 else \
            f"rng_state_{self.args.process_index}.pth"
        with _reading(checkpoint, (rng_file,), "random number generator states"):
            return super()._load_rng_state(checkpoint)

    # ---- saving: each checkpoint whole or not at all --------------------------------------

    _moa_staging: str | None = None
    _moa_push_deferred: bool = False

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is saved, the Trainer writes it under the staging folder.
        return self._moa_staging if self._moa_staging is not None else \
            super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._moa_staging is not None:  # pushed from its final place once it is there
            self._moa_push_deferred = True
            return None
        return super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into a staging folder and renamed into place
        when whole; on any failure the staging folder is removed (see the module
        docstring)."""
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        staged = os.path.join(staging, name)
        writer = self.args.should_save
        if writer:
            shutil.rmtree(staging, ignore_errors=True)  # what a killed save left
        self.accelerator.wait_for_everyone()
        self._moa_staging, self._moa_push_deferred = staging, False
        try:
            failure = None
            try:
                super()._save_checkpoint(model, trial)
                if self._moa_fsdp2() and self.args.save_only_model:
                    # What save_only_model (which the Trainer requires of a model sharded
                    # when it loads) leaves out, and resuming needs.
                    self._save_optimizer_and_scheduler(staged)
                    self._save_scaler(staged)
                    self._save_rng_state(staged)
            except Exception as error:
                failure = error
            if not current_world().all_succeeded(failure is None):
                raise failure or _OtherProcessFailed(
                    "another process failed to write its part of it")
            if writer:
                if self.state.best_model_checkpoint == staged:
                    self.state.best_model_checkpoint = final
                    self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
                _move_into_place(staged, final)
        except BaseException as error:
            if writer:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, _PreviousNotPutBack):
                raise
            if _is_write_failure(error):
                raise OSError(f"cannot write the checkpoint of step {self.state.global_step} "
                              f"into {final}: {_write_failure_reason(error)}; nothing of it "
                              "was kept (the earlier checkpoints are as they were)") from error
            raise
        finally:
            self._moa_staging = None
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate_into(run_dir)
        if self._moa_push_deferred:
            self._moa_push_deferred = False
            self._push_from_checkpoint(final)

    def _rotate_into(self, run_dir: str) -> None:
        """The Trainer's deletion of the oldest checkpoints beyond save_total_limit, in
        run_dir (inside the staging folder the Trainer found only the new one)."""
        try:
            from transformers.trainer_utils import rotate_checkpoints
        except ImportError:  # transformers 4: a Trainer method
            self._rotate_checkpoints(use_mtime=False, output_dir=run_dir)
            return
        rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint,
                           use_mtime=True)


def _torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer (or `optimizer`)."""
    return getattr(optimizer, "optimizer", optimizer)


class _OtherProcessFailed(OSError):
    """This process saved its part of a checkpoint; another one failed to."""


class _PreviousNotPutBack(OSError):
    """Replacing a checkpoint failed, and so did putting the previous one back."""


def _move_into_place(staged: str, final: str) -> None:
    """Rename the whole checkpoint `staged` to `final`. A checkpoint already at `final` (the
    same step saved again after resuming from an earlier one) is moved aside to
    `_replaced-checkpoint-N` first, put back if the rename fails, and removed once it
    succeeds."""
    replaced = None
    if os.path.lexists(final):
        replaced = os.path.join(os.path.dirname(final), "_replaced-" + os.path.basename(final))
        shutil.rmtree(replaced, ignore_errors=True)  # a killed replacement's leftover
        os.rename(final, replaced)
    try:
        os.rename(staged, final)
    except BaseException as error:
        if replaced is not None:
            try:
                os.rename(replaced, final)
            except OSError as second:
                raise _PreviousNotPutBack(
                    f"cannot move the new checkpoint into {final}: "
                    f"{_write_failure_reason(error)}, nor put the previous one back "
                    f"({_write_failure_reason(second)}): it is in {replaced}") from error
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


class MoATrainer(MoATrainerMixin, Trainer):
    """transformers.Trainer whose checkpoints and save_model hold a MoAModel's adapter only
    (see the module docstring); resume_from_checkpoint restores it with the optimizer,
    scheduler and RNG states. MoAModel.from_pretrained(base, checkpoint_dir) loads one."""


__all__ = ["CHECKPOINT_FILES", "MoATrainer", "MoATrainerMixin", "check_trainer_state",
           "checkpoint_strategy", "checkpoint_world_size", "checkpoints_newest_first",
           "last_whole_checkpoint", "missing_checkpoint_files"]
