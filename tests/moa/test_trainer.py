"""The transformers Trainer with MoATrainer: checkpoints and save_model hold the adapter only,
a checkpoint loads with MoAModel.from_pretrained, and resuming continues the loss curve
exactly (adapters, optimizer, scheduler and RNG restored: dropout and the shuffled data
order depend on the last two). A checkpoint is whole or absent (a failed save leaves
nothing), and a damaged checkpoint file is a one-line error naming it."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from transformers import TrainingArguments
from transformers.trainer_callback import TrainerState

import moa.serialization
from moa import MoAConfig, MoAModel, get_moa_model
from moa.config import CONFIG_NAME
from moa.serialization import WEIGHTS_NAME
from moa.trainer import MoATrainer, last_whole_checkpoint
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


# ---- a checkpoint is whole or absent ------------------------------------------------------

def full_disk(monkeypatch, name: str) -> None:
    """Writing the checkpoint file `name` fails as on a full disk (OSError ENOSPC)."""
    def no_space():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if name == WEIGHTS_NAME:  # the adapter, written by moa.serialization
        write = moa.serialization.write_new_file

        def failing_write(path, data):
            if os.path.basename(path) == name:
                no_space()
            write(path, data)

        monkeypatch.setattr(moa.serialization, "write_new_file", failing_write)
    elif name == "trainer_state.json":  # the Trainer's last file
        monkeypatch.setattr(TrainerState, "save_to_json", lambda self, path: no_space())
    else:  # optimizer.pt, scheduler.pt, rng_state.pth: torch.save
        save = torch.save

        def failing_save(obj, path, *args, **kwargs):
            if os.path.basename(str(path)) == name:
                no_space()
            return save(obj, path, *args, **kwargs)

        monkeypatch.setattr(torch, "save", failing_save)


@pytest.mark.parametrize("name", [
    WEIGHTS_NAME,  # the first file written (by MoATrainer.save_model)
    "optimizer.pt",  # a Trainer file in the middle
    "rng_state.pth",  # a Trainer file in the middle
    "trainer_state.json",  # the last file: all the others are written by then
])
def test_a_full_disk_during_a_checkpoint_save_keeps_nothing_of_it(name, tmp_path, monkeypatch):
    trainer = trainer_for(moa_model(), tmp_path, max_steps=4, save_steps=2)
    # the second save (step 4) fails; the first (step 2) stays whole and resumable
    saves = []
    original = MoATrainer._save_checkpoint

    def save_checkpoint(self, model, trial):
        saves.append(self.state.global_step)
        if len(saves) == 2:
            full_disk(monkeypatch, name)
        return original(self, model, trial)

    monkeypatch.setattr(MoATrainer, "_save_checkpoint", save_checkpoint)
    with pytest.raises(OSError) as failure:
        trainer.train()
    message = str(failure.value)
    assert message == (f"cannot write the checkpoint of step 4 into {tmp_path}/checkpoint-4: "
                       "No space left on device; nothing of it was kept (the earlier "
                       "checkpoints are as they were)"), message
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]  # no checkpoint-4, no staging
    assert last_whole_checkpoint(tmp_path) == (str(tmp_path / "checkpoint-2"), [])


def test_resume_true_passes_over_what_a_killed_save_left(uninterrupted, tmp_path):
    output_dir, _, expected = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(output_dir / "checkpoint-3", run / "checkpoint-3")
    # a save killed before its trainer state (a plain Trainer, or moa before atomic saves)
    shutil.copytree(output_dir / "checkpoint-3", run / "checkpoint-5")
    (run / "checkpoint-5" / "trainer_state.json").unlink()
    # a staging folder a killed atomic save left
    shutil.copytree(output_dir / "checkpoint-3", run / "_partial-checkpoint-9" / "checkpoint-9")
    assert last_whole_checkpoint(run) == (str(run / "checkpoint-3"), [str(run / "checkpoint-5")])
    trainer = trainer_for(moa_model(), run)
    trainer.train(resume_from_checkpoint=True)
    assert losses(trainer) == expected


def truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def garbage(path) -> None:
    path.write_bytes(os.urandom(64))


@pytest.mark.parametrize("name,damage", [
    ("optimizer.pt", truncate),  # a copy cut short
    ("optimizer.pt", garbage),  # overwritten
    ("scheduler.pt", garbage),
    ("rng_state.pth", garbage),  # read at the first step, not at the start
    ("rng_state.pth", truncate),
    ("trainer_state.json", truncate),  # JSON cut short
    ("trainer_state.json", lambda path: path.write_text('{"global_stepz": 3}')),  # not a state
])
def test_a_damaged_checkpoint_file_is_a_one_line_error_naming_it(name, damage, uninterrupted,
                                                                tmp_path):
    output_dir, _, _ = uninterrupted
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(output_dir / "checkpoint-3", checkpoint)
    damage(checkpoint / name)
    trainer = trainer_for(moa_model(), tmp_path / "run")
    with pytest.raises(ValueError) as failure:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    message = str(failure.value)
    assert message.startswith(f"cannot resume from {checkpoint}: ") and name in message, \
        message
    assert "\n" not in message


def test_saving_a_step_again_replaces_its_checkpoint_or_keeps_the_old_one(uninterrupted,
                                                                           tmp_path,
                                                                           monkeypatch):
    # Resuming from step 3 of a run that has a checkpoint of step 6 saves step 6 again.
    output_dir, _, _ = uninterrupted
    for step in (3, STEPS):
        shutil.copytree(output_dir / f"checkpoint-{step}", tmp_path / f"checkpoint-{step}")
    old_state = (tmp_path / f"checkpoint-{STEPS}" / "trainer_state.json").read_bytes()
    rename = os.rename

    def failing_rename(source, destination):
        if str(source).endswith(f"_partial-checkpoint-{STEPS}/checkpoint-{STEPS}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return rename(source, destination)

    monkeypatch.setattr(os, "rename", failing_rename)
    trainer = trainer_for(moa_model(), tmp_path)
    with pytest.raises(OSError, match=f"cannot write the checkpoint of step {STEPS} into "):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    # the old checkpoint of step 6 is back, whole; nothing staged is left
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", f"checkpoint-{STEPS}"]
    assert (tmp_path / f"checkpoint-{STEPS}" / "trainer_state.json").read_bytes() == old_state
    assert last_whole_checkpoint(tmp_path) == (str(tmp_path / f"checkpoint-{STEPS}"), [])

    # and when putting the old one back fails too, the error says where it is
    def failing_renames(source, destination):
        if str(destination) == str(tmp_path / f"checkpoint-{STEPS}"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return rename(source, destination)

    monkeypatch.setattr(os, "rename", failing_renames)
    trainer = trainer_for(moa_model(), tmp_path)
    aside = tmp_path / f"_replaced-checkpoint-{STEPS}"
    with pytest.raises(OSError) as failure:
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert str(failure.value) == (
        f"cannot move the new checkpoint into {tmp_path}/checkpoint-{STEPS}: Input/output "
        f"error, nor put the previous one back (Input/output error): it is in {aside}")
    assert sorted(os.listdir(tmp_path)) == [f"_replaced-checkpoint-{STEPS}", "checkpoint-3"]
    assert (aside / "trainer_state.json").read_bytes() == old_state
