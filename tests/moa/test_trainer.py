"""The transformers Trainer with MoATrainer: checkpoints and save_model hold the adapter only,
a checkpoint loads with MoAModel.from_pretrained, and resuming continues the loss curve
exactly (adapters, optimizer, scheduler and RNG restored: dropout and the shuffled data
order depend on the last two)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import TrainingArguments

from moa import MoAConfig, MoAModel, get_moa_model
from moa.config import CONFIG_NAME
from moa.serialization import WEIGHTS_NAME
from moa.trainer import MoATrainer
from tests.moa.tiny import perturb, tiny_llama, token_batch

STEPS = 6


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, count: int = 12, length: int = 10) -> None:
        self.ids = token_batch(count, length, seed=5)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def moa_model() -> MoAModel:
    # dropout > 0: the resumed run must restore the RNG to draw the same masks
    moa = get_moa_model(tiny_llama(), MoAConfig(dropout=0.1))
    perturb(moa)
    return moa


def trainer_for(moa: MoAModel, output_dir, eval_dataset=None, **overrides) -> MoATrainer:
    options = dict(output_dir=str(output_dir), max_steps=STEPS, learning_rate=1e-2,
                   per_device_train_batch_size=4, logging_steps=1, report_to=[],
                   save_strategy="steps", save_steps=3, use_cpu=True, disable_tqdm=True,
                   lr_scheduler_type="linear", warmup_steps=2, seed=7)
    options.update(overrides)
    return MoATrainer(model=moa, args=TrainingArguments(**options),
                      train_dataset=TokenDataset(), eval_dataset=eval_dataset)


def losses(trainer: MoATrainer) -> dict[int, float]:
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


def logits_of(moa: MoAModel) -> torch.Tensor:
    with torch.no_grad():
        return moa.eval()(input_ids=token_batch(2, 9)).logits


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 6-step run, checkpointed at steps 3 and 6."""
    output_dir = tmp_path_factory.mktemp("run")
    moa = moa_model()
    trainer = trainer_for(moa, output_dir)
    trainer.train()
    return output_dir, moa, losses(trainer)


def test_checkpoints_hold_the_adapter_and_no_model_weights(uninterrupted):
    output_dir, moa, _ = uninterrupted
    for step in (3, STEPS):
        files = set(os.listdir(output_dir / f"checkpoint-{step}"))
        assert {CONFIG_NAME, WEIGHTS_NAME} <= files
        # the Trainer's own resume files, nothing with the base model's weights
        assert not {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "adapter_config.json", "config.json"} & files, files
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    adapter_bytes = os.path.getsize(output_dir / f"checkpoint-{STEPS}" / WEIGHTS_NAME)
    moa_bytes = sum(p.numel() * p.element_size() for _, p in moa.moa_named_parameters())
    assert adapter_bytes < moa_bytes + 64 * 1024  # the MoA tensors and the metadata


def test_from_pretrained_of_a_checkpoint_reproduces_the_trained_model(uninterrupted):
    output_dir, moa, _ = uninterrupted
    reloaded = MoAModel.from_pretrained(tiny_llama(), output_dir / f"checkpoint-{STEPS}")
    assert torch.equal(logits_of(reloaded), logits_of(moa))
    with moa.disable_adapters():
        base = logits_of(moa)
    assert not torch.equal(logits_of(moa), base)


def test_resuming_continues_the_loss_curve_exactly(uninterrupted, tmp_path):
    output_dir, _, expected = uninterrupted
    assert sorted(expected) == list(range(1, STEPS + 1))
    trainer = trainer_for(moa_model(), output_dir)
    trainer.train(resume_from_checkpoint=str(output_dir / "checkpoint-3"))
    # The log of steps 1-3 comes back with the checkpoint's trainer state; 4-6 are new.
    checkpointed = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    assert max(log["step"] for log in checkpointed["log_history"]) == 3
    assert losses(trainer) == expected


def test_save_model_writes_the_adapter_only(uninterrupted, tmp_path):
    _, moa, _ = uninterrupted
    trainer = trainer_for(moa, tmp_path / "run", save_strategy="no")
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert files == {CONFIG_NAME, WEIGHTS_NAME, "training_args.bin"}, files
    assert torch.equal(logits_of(MoAModel.from_pretrained(tiny_llama(), tmp_path / "final")),
                       logits_of(moa))


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    # The higher eval loss counts as best, so the best checkpoint is step 2's, not the last
    # one: loading it at the end changes the model.
    moa = moa_model()
    trainer = trainer_for(moa, tmp_path, TokenDataset(4), max_steps=4, save_steps=2,
                          eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                          metric_for_best_model="loss", greater_is_better=True)
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    best = MoAModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint-2")
    last = MoAModel.from_pretrained(tiny_llama(), tmp_path / "checkpoint-4")
    assert torch.equal(logits_of(moa), logits_of(best))
    assert not torch.equal(logits_of(moa), logits_of(last))
