"""Saving and loading adapters: both files or neither, mismatched pairs refused, clear errors.

Every failure case saves adapter B (lora:8:64) over adapter A (lora:8:8: the same shapes,
other outputs) and checks that A is still there byte for byte, with the user's files beside
it, and reloads to exactly A's outputs on random tokens.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moa.serialization
from moa import MoAConfig, MoAModel, get_moa_model
from moa.config import CONFIG_NAME
from moa.model import MOA_MODULES, WEIGHTS_NAME
from moa.serialization import STAGING_PREFIX
from tests.moa.tiny import perturb, tiny_llama, token_batch

REPO = Path(__file__).resolve().parents[2]
USER_FILES = {"README.md": b"# my adapter\n", "tokenizer.json": b'{"model": {}}',
              "checkpoint-10/optimizer.pt": b"\x00\x01 not ours"}


def lora(alpha: int = 8, seed: int = 2) -> MoAModel:
    moa = get_moa_model(tiny_llama(), MoAConfig.preset("lora", experts=[f"lora:8:{alpha}"]))
    perturb(moa, seed=seed)
    return moa


@torch.no_grad()
def logits(moa: MoAModel) -> torch.Tensor:
    return moa.eval()(token_batch()).logits


def reloaded_logits(directory: Path) -> torch.Tensor:
    return logits(MoAModel.from_pretrained(tiny_llama(), directory))


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def saved_a(tmp_path: Path) -> tuple[Path, torch.Tensor, dict[str, bytes]]:
    """Adapter A saved into a directory that also holds the user's files: (directory, A's
    logits, the directory's snapshot)."""
    directory = tmp_path / "adapter"
    for name, data in USER_FILES.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    a = lora(8)
    a.save_pretrained(directory)
    return directory, logits(a), snapshot(directory)


def assert_a_is_intact(saved: tuple[Path, torch.Tensor, dict[str, bytes]]) -> None:
    directory, expected, before = saved
    assert snapshot(directory) == before
    assert not [p for p in directory.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert torch.equal(reloaded_logits(directory), expected)


# ---- round trip --------------------------------------------------------------------------

def test_a_save_over_an_adapter_replaces_it_and_keeps_the_users_files(saved_a):
    directory, expected, before = saved_a
    b = lora(64, seed=3)
    assert not torch.equal(logits(b), expected)  # the checks below would notice B
    b.save_pretrained(directory)
    after = snapshot(directory)
    assert {name: after[name] for name in USER_FILES} == USER_FILES
    assert sorted(after) == sorted([*USER_FILES, CONFIG_NAME, WEIGHTS_NAME])
    assert after[WEIGHTS_NAME] != before[WEIGHTS_NAME]
    assert torch.equal(reloaded_logits(directory), logits(b))


def test_the_weights_record_the_config_and_each_modules_experts(tmp_path):
    moa = get_moa_model(tiny_llama(), MoAConfig(experts={"*": ["lora:4:8"],
                                                         "down_proj": ["adapter:8:gelu"]}))
    moa.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["moa_config"] == (tmp_path / CONFIG_NAME).read_text()
    experts = json.loads(metadata["moa_module_experts"])
    assert len(experts) == 10  # q, k, v, o, down of 2 layers
    assert experts["model.layers.1.mlp.down_proj"] == ["adapter:8:gelu"]
    assert experts["model.layers.0.self_attn.k_proj"] == ["lora:4:8"]


# ---- interrupted and failed saves --------------------------------------------------------

@pytest.mark.parametrize("failing_call", [1, 2], ids=["weights", "config"])
def test_an_interrupt_between_the_renames_puts_the_previous_adapter_back(saved_a, monkeypatch,
                                                                         failing_call):
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if len(calls) == failing_call:
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        lora(64, seed=3).save_pretrained(saved_a[0])
    monkeypatch.undo()
    assert_a_is_intact(saved_a)


@pytest.mark.parametrize("failing_call", [1, 2], ids=["weights", "config"])
@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left "
                                                                "on device")],
                         ids=["interrupt", "disk-full"])
def test_a_write_failing_halfway_leaves_the_previous_adapter(saved_a, monkeypatch,
                                                             failing_call, failure):
    real_write, calls = moa.serialization.write_new_file, []

    def write(path, data):
        calls.append(path)
        if len(calls) == failing_call:
            with open(path, "xb") as handle:
                handle.write(data[:len(data) // 2])
            raise failure
        real_write(path, data)

    monkeypatch.setattr(moa.serialization, "write_new_file", write)
    expected = KeyboardInterrupt if failure is KeyboardInterrupt else OSError
    with pytest.raises(expected) as raised:
        lora(64, seed=3).save_pretrained(saved_a[0])
    if expected is OSError:
        assert raised.value.errno == errno.ENOSPC
        assert str(saved_a[0]) in str(raised.value) and "unchanged" in str(raised.value)
    monkeypatch.undo()
    assert_a_is_intact(saved_a)


@pytest.fixture
def small_disk(tmp_path: Path):
    """mount_at(size) mounts a tmpfs of `size` bytes in tmp_path (root only; else skip)."""
    mounted = []

    def mount_at(size: int) -> Path:
        point = tmp_path / "disk"
        point.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command here to make a small tmpfs")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount_at
    for point in mounted:
        subprocess.run(["umount", str(point)], check=True)


def test_a_full_disk_leaves_the_previous_adapter_loadable_and_unchanged(small_disk):
    a = get_moa_model(tiny_llama(), MoAConfig.preset("lora", experts=["lora:4"]))
    perturb(a)
    b = get_moa_model(tiny_llama(), MoAConfig.preset("lora", experts=["lora:64", "lora:64"]))
    perturb(b, seed=3)
    a_bytes = len(moa.serialization.safetensors.torch.save(a.moa_state_dict()))
    b_bytes = len(moa.serialization.safetensors.torch.save(b.moa_state_dict()))
    page = 4096
    size = (a_bytes // page + 1) * page + 4 * page + b_bytes // 2  # A and half of B
    assert b_bytes > 8 * page
    disk = small_disk(size)
    directory = disk / "adapter"
    a.save_pretrained(directory)
    (directory / "README.md").write_bytes(USER_FILES["README.md"])
    before = snapshot(directory)
    with pytest.raises(OSError) as raised:
        b.save_pretrained(directory)
    assert raised.value.errno == errno.ENOSPC
    assert f"cannot save the MoA adapter into {str(directory)!r}" in str(raised.value)
    assert_a_is_intact((directory, logits(a), before))


_KILLED_SAVE = """
import os, signal, sys
from moa import MoAConfig, get_moa_model
from tests.moa.tiny import perturb, tiny_llama

moa = get_moa_model(tiny_llama(), MoAConfig.preset("lora", experts=["lora:8:64"]))
perturb(moa, seed=3)
real_replace, calls = os.replace, []

def replace(source, target):
    calls.append(target)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)

os.replace = replace
moa.save_pretrained(sys.argv[1])
"""


def test_a_save_killed_between_the_renames_is_refused_on_loading_and_recoverable(saved_a):
    directory, expected, before = saved_a
    child = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(directory)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    # B's weights are in place, A's config is not yet replaced
    assert snapshot(directory)[CONFIG_NAME] == before[CONFIG_NAME]
    assert snapshot(directory)[WEIGHTS_NAME] != before[WEIGHTS_NAME]
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"experts: the weights were saved with "
                                         r"\[\"lora:8:64\"\], moa_config.json has "
                                         r"\[\"lora:8:8\"\]") as raised:
        MoAModel.from_pretrained(base, directory)
    assert not any(isinstance(m, MOA_MODULES) for m in base.modules())
    staging = [p for p in directory.iterdir() if p.name.startswith(STAGING_PREFIX)]
    assert len(staging) == 1 and staging[0].name in str(raised.value)
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # the way back the message points to
        os.replace(staging[0] / f"{name}.previous", directory / name)
    shutil.rmtree(staging[0])
    assert_a_is_intact(saved_a)


def test_a_failed_rollback_keeps_the_previous_files_where_the_error_says(saved_a,
                                                                          monkeypatch):
    """The config's rename fails after the weights' went through, and putting the previous
    weights back fails too: the OSError names the staging folder, which must still hold the
    previous pair (*.previous) for the user to put back."""
    directory, expected, before = saved_a
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if len(calls) == 2:  # the new config over the old one
            raise OSError(errno.EIO, "Input/output error")
        if len(calls) == 3:  # the rollback: the previous weights back
            raise OSError(errno.EROFS, "Read-only file system")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError) as raised:
        lora(64, seed=3).save_pretrained(directory)
    monkeypatch.undo()
    assert len(calls) == 3
    assert raised.value.errno == errno.EROFS
    message = str(raised.value)
    assert "the previous files could not be put back" in message
    named = re.search(r"they are in '([^']+)' as \*\.previous", message)
    assert named, message
    staging = Path(named.group(1))
    assert staging.parent == directory and staging.name.startswith(STAGING_PREFIX)
    assert staging.is_dir(), "the folder the error points to is gone"
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # the previous pair, byte for byte
        assert (staging / f"{name}.previous").read_bytes() == before[name], name
    assert snapshot(directory)[WEIGHTS_NAME] != before[WEIGHTS_NAME]  # B's weights went in
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # the way back the message points to
        os.replace(staging / f"{name}.previous", directory / name)
    shutil.rmtree(staging)
    assert_a_is_intact(saved_a)


def test_saving_a_config_alone_is_atomic_too(tmp_path, monkeypatch):
    MoAConfig.preset("lora").save_pretrained(tmp_path)
    before = snapshot(tmp_path)

    def replace(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        MoAConfig.preset("molora").save_pretrained(tmp_path)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("take_out", ["unload", "merge_and_unload"])
def test_saving_after_unload_is_refused(saved_a, take_out):
    b = lora(64, seed=3)
    getattr(b, take_out)()
    with pytest.raises(RuntimeError, match=r"holds no MoA tensors \(unload\(\) or "
                                           r"merge_and_unload\(\) took them out\).*refusing"):
        b.save_pretrained(saved_a[0])
    assert_a_is_intact(saved_a)


# ---- loading checks ----------------------------------------------------------------------

@pytest.mark.parametrize("copied", [CONFIG_NAME, WEIGHTS_NAME])
def test_weights_and_a_config_from_different_saves_are_refused(saved_a, tmp_path, copied):
    directory = saved_a[0]
    lora(64, seed=3).save_pretrained(tmp_path / "b")
    shutil.copyfile(tmp_path / "b" / copied, directory / copied)
    saved, in_file = ("8:8", "8:64") if copied == CONFIG_NAME else ("8:64", "8:8")
    base = tiny_llama()
    with pytest.raises(ValueError, match=rf"{re.escape(str(directory / CONFIG_NAME))} does "
                                         rf"not describe the weights in .*experts: the weights "
                                         rf"were saved with \[\"lora:{saved}\"\], "
                                         rf"{CONFIG_NAME} has \[\"lora:{in_file}\"\]"):
        MoAModel.from_pretrained(base, directory)
    assert not any(isinstance(m, MOA_MODULES) for m in base.modules())


def test_a_module_saved_with_other_experts_is_refused(saved_a):
    path = saved_a[0] / WEIGHTS_NAME
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    experts = json.loads(metadata["moa_module_experts"])
    experts["model.layers.1.self_attn.v_proj"] = ["lora:8:16"]
    save_file(load_file(path), path, metadata={**metadata,
                                               "moa_module_experts": json.dumps(experts)})
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"saved with other experts than this model's: "
                                         r"model\.layers\.1\.self_attn\.v_proj \(saved with "
                                         r"lora:8:16; this model has lora:8:8\)"):
        MoAModel.from_pretrained(base, saved_a[0])
    assert not any(isinstance(m, MOA_MODULES) for m in base.modules())


def test_how_the_adapter_runs_may_be_edited_in_the_config(saved_a):
    directory, expected, _ = saved_a
    config = json.loads((directory / CONFIG_NAME).read_text())
    config.update(backend="reference", dropout=0.25)
    (directory / CONFIG_NAME).write_text(json.dumps(config))
    reloaded = MoAModel.from_pretrained(tiny_llama(), directory)
    assert reloaded.moa_config.backend == "reference"
    assert torch.equal(logits(reloaded), expected)


def test_how_the_adapter_trains_may_differ_between_the_save_and_the_model(tmp_path):
    # topk_moelora trained without the load-balancing loss before 2026-12-06 (aux_loss_coef
    # 0, aux_loss_reduction at its default "mean", so absent from the saved config); a
    # checkpoint of such a run loads into today's preset (1e-3, "sum"), and the saved
    # config may name either reduction
    old = get_moa_model(tiny_llama(), MoAConfig.preset("topk_moelora", aux_loss_coef=0.0,
                                                       aux_loss_reduction="mean"))
    perturb(old)
    old.save_pretrained(tmp_path)
    assert "aux_loss_reduction" not in json.loads((tmp_path / CONFIG_NAME).read_text())
    current = get_moa_model(tiny_llama(), MoAConfig.preset("topk_moelora"))
    current.load_adapter(tmp_path)
    saved = dict(old.moa_named_parameters())
    loaded = dict(current.moa_named_parameters())
    assert loaded.keys() == saved.keys() and len(saved) > 0
    assert all(torch.equal(loaded[name], saved[name]) for name in saved)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config.update(aux_loss_coef=1e-3, aux_loss_reduction="sum")
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    reloaded = MoAModel.from_pretrained(tiny_llama(), tmp_path)
    assert reloaded.moa_config.aux_loss_reduction == "sum"


def test_adapters_saved_without_the_metadata_still_load(saved_a):
    directory, expected, _ = saved_a
    path = directory / WEIGHTS_NAME
    save_file(load_file(path), path, metadata={"format": "pt"})
    assert torch.equal(reloaded_logits(directory), expected)


@pytest.mark.parametrize("damage, problem", [
    (lambda data: b"", r"is empty \(0 bytes\)"),
    (lambda data: data[:-100], r"bytes\) is not a readable safetensors file, perhaps truncated"),
    (lambda data: data[:6], r"bytes\) is not a readable safetensors file"),
    (lambda data: b"not a safetensors file", r"is not a readable safetensors file"),
], ids=["empty", "truncated", "truncated-header", "malformed"])
def test_an_unreadable_weights_file_is_a_clear_error(saved_a, damage, problem):
    path = saved_a[0] / WEIGHTS_NAME
    path.write_bytes(damage(path.read_bytes()))
    base = tiny_llama()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} .*{problem}.*expected the "
                                         r"safetensors file that MoAModel\.save_pretrained "
                                         r"writes"):
        MoAModel.from_pretrained(base, saved_a[0])
    assert not any(isinstance(m, MOA_MODULES) for m in base.modules())


@pytest.mark.parametrize("content, problem", [
    (b'{"experts": ["lora:8:8\xff"]}', r" is not UTF-8 text \(byte 0xff at offset 22\)"),
    (b"", r" is empty"),
    (b"[1, 2]", r": a MoAConfig dict is expected, got list"),
], ids=["not-utf8", "empty", "not-an-object"])
def test_an_unreadable_config_is_a_clear_error(saved_a, content, problem):
    path = saved_a[0] / CONFIG_NAME
    path.write_bytes(content)
    for load in (lambda: MoAConfig.from_pretrained(saved_a[0]),
                 lambda: MoAModel.from_pretrained(tiny_llama(), saved_a[0])):
        with pytest.raises((ValueError, TypeError), match=rf"^{re.escape(str(path))}"
                                                          rf"{problem}"):
            load()
