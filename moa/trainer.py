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

Under DeepSpeed and FSDP the Trainer's own resume files (a DeepSpeed checkpoint, FSDP's
model and optimizer states) are still written beside the adapter, and resuming reads those,
as the Trainer does for PEFT models.
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from moa.config import CONFIG_NAME
from moa.model import MoAModel
from moa.serialization import WEIGHTS_NAME


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
        moa = self._moa_model()
        if moa is None or self.is_fsdp_enabled or self.is_deepspeed_enabled \
                or not self._adapter_in(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        moa.load_adapter(resume_from_checkpoint, is_trainable=True)

    def _load_best_model(self) -> None:
        moa = self._moa_model()
        best = self.state.best_model_checkpoint
        if moa is None or self.is_fsdp_enabled or self.is_deepspeed_enabled \
                or not self._adapter_in(best):
            return super()._load_best_model()
        moa.load_adapter(best, is_trainable=True)


class MoATrainer(MoATrainerMixin, Trainer):
    """transformers.Trainer whose checkpoints and save_model hold a MoAModel's adapter only
    (see the module docstring); resume_from_checkpoint restores it with the optimizer,
    scheduler and RNG states. MoAModel.from_pretrained(base, checkpoint_dir) loads one."""


__all__ = ["MoATrainer", "MoATrainerMixin"]
