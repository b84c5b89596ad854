"""Saving and loading MoA adapters so that no failure leaves a wrong or half-written adapter.

An adapter directory holds `moa_config.json` (MoAConfig.to_json_string) and
`adapter_model.safetensors` (the MoA tensors), and often files of the user's beside them: a
README.md, a tokenizer, a Trainer's checkpoints. `save_adapter` replaces the two adapter files
and touches nothing else:

1. everything is prepared in memory first (the config's JSON, the safetensors bytes: one
   host-memory copy of the adapter), so that a bad config or tensor fails before the disk is
   touched;
2. both files are written into a staging directory `.moa-save-XXXXXXXX/` *inside* the target
   (the same filesystem, so a rename is atomic) and fsynced. A full disk, an I/O error or an
   interrupt here removes the staging directory and leaves the target as it was;
3. the current files are hard-linked into the staging directory (copied where the filesystem
   has no hard links) as the way back, then `os.replace` puts the new weights in place, then
   the new config, and the directory is fsynced. Any exception in this step, KeyboardInterrupt
   included, puts the previous files back before it propagates (should that fail too, the
   OSError says where the previous files are).

Why not swap whole directories (write `target.tmp/`, rename the target aside, rename the new
one in)? POSIX has no atomic exchange of two directories (Linux's renameat2 RENAME_EXCHANGE is
neither portable nor on every filesystem), so that leaves a moment with no adapter at all; the
user's other files would have to be copied (a Trainer checkpoint can be gigabytes, and the copy
can itself fill the disk) or moved (and be stranded by an interrupt); and the directory's
inode, permissions, open handles and any mount or symlink at its path would change.

What no exception handler covers is a power loss, a SIGKILL or a second interrupt between
the two renames (step 3, microseconds). For that case the weights file records what it was
saved with, in its safetensors metadata: "moa_config" (the exact JSON written to
moa_config.json) and "moa_module_experts" (JSON: each adapted module's expert specs, which
fix the tensors' layout and the lora alphas). `load_adapter` compares them with
moa_config.json and with the modules it injected, and refuses a pair from different saves
with an error naming each difference, instead of loading weights under a config they were
not trained with (same shapes, other outputs, for "lora:8:8" against "lora:8:64"). The
weights are replaced first because they always carry this metadata: after such a crash the
directory holds new weights and the old config, which is detected even when the old config
belongs to an adapter saved before the metadata existed (old weights under a new config
would not be). The staging directory left by the crash still holds the previous pair
(`*.previous`). Fields that only say how the adapter runs or trains (`RUNTIME_FIELDS`:
backend, dropout, aux_loss_coef, aux_loss_reduction, adapter_dtype) may differ; adapters
saved without the metadata load unchecked, as before.

Weights are only ever read with safetensors (never pickle). An empty, truncated or malformed
file, or a moa_config.json that is not UTF-8 JSON, is a ValueError that names the file, the
problem and what was expected.

Distributed training: `save_adapter` is called on every rank. moa.distributed's
`gather_adapter_state` reads each MoA tensor whole from whatever wraps or shards it (DDP,
FSDP1, FSDP2, DeepSpeed ZeRO), the main process writes as above, and after a collective
gather every rank learns whether the write succeeded.

The Hub (moa/hub.py): `load_adapter` takes a repo id as well as a directory
(`resolve_adapter`); `push_adapter` saves, then uploads the two adapter files.
"""


from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from moa._version import __version__
from moa.config import CONFIG_NAME, WEIGHTS_NAME, MoAConfig
from moa.distributed import (  # (TensorSlot, clean_name: re-exported for old imports)
    TensorSlot,
    adapter_state_from,
    clean_name,
    every_rank_succeeded,
    gather_adapter_state,
    is_dtensor,
    is_main,
    world_size,
)
from moa.hub import resolve_adapter, upload_adapter
from moa.io import fsync_directory, remove_quietly, write_file_atomically, write_new_file
from moa.modules.linear import MoALinear

if TYPE_CHECKING:
    from moa.model import MoAModel

STAGING_PREFIX = ".moa-save-"
CONFIG_KEY = "moa_config"
MODULE_EXPERTS_KEY = "moa_module_experts"
METADATA_FORMAT = "1"
RUNTIME_FIELDS = ("backend", "dropout", "aux_loss_coef", "aux_loss_reduction", "adapter_dtype")
_SHOWN = 20


# ---------------------------------------------------------------------------------------
# writing the two files
# ---------------------------------------------------------------------------------------

def _keep_previous(target: str, backup: str) -> bool:
    """Hard-link (or copy) `target` to `backup`; False when there is no `target`."""
    if not os.path.lexists(target):
        return False
    try:
        os.link(target, backup, follow_symlinks=False)
    except OSError:
        shutil.copy2(target, backup, follow_symlinks=False)
    return True


class _RollbackFailed(OSError):
    """Putting the previous files back failed too; they are still in the staging directory."""


def _commit(staging: str, directory: str, names: tuple[str, ...]) -> None:
    """Move each staged file over its namesake in `directory`, in order; on any exception
    put back what was there before."""
    previous = {}
    for name in names:
        backup = os.path.join(staging, name + ".previous")
        previous[name] = backup if _keep_previous(os.path.join(directory, name), backup) \
            else None
    replaced = []
    try:
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
            replaced.append(name)
        fsync_directory(directory)
    except BaseException:
        try:
            for name in reversed(replaced):
                target = os.path.join(directory, name)
                if previous[name] is None:
                    remove_quietly(target)
                else:
                    os.replace(previous[name], target)
            fsync_directory(directory)
        except OSError as error:
            raise _RollbackFailed(error.errno, error.strerror) from error
        raise


# ---------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------

def base_model_name_or_path(model: nn.Module) -> str:
    """The checkpoint a transformers model came from ("" for one built from a config)."""
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


def _module_experts(config: MoAConfig, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Each adapted module's expert specs (a MoALinear is the only owner of a shrink_weight)."""
    suffix = ".shrink_weight"
    return {name[:-len(suffix)]: [str(s) for s in config.experts_for(name[:-len(suffix)])]
            for name in sorted(state) if name.endswith(suffix)}


def adapter_metadata(moa: MoAModel, config_json: str,
                     state: dict[str, torch.Tensor]) -> dict[str, str]:
    """The safetensors metadata of a saved adapter: the base model, the moa version and what
    the weights were saved with (see the module docstring)."""
    return {"format": "pt", "moa_version": __version__, "moa_format": METADATA_FORMAT,
            "base_model_name_or_path": base_model_name_or_path(moa.model),
            CONFIG_KEY: config_json,
            MODULE_EXPERTS_KEY: json.dumps(_module_experts(moa.moa_config, state),
                                           sort_keys=True)}


def save_adapter(moa: MoAModel, directory: str | os.PathLike,
                 state_dict: dict[str, torch.Tensor] | None = None,
                 is_main_process: bool | None = None) -> None:
    """Write moa's moa_config.json and adapter_model.safetensors into `directory` (created
    if needed), replacing both or neither, and nothing else in it (see the module docstring).

    Args:
        moa: the MoAModel, wrapped or sharded or not (see `gather_adapter_state`).
        directory: where to write.
        state_dict: take the MoA tensors from this state dict instead of the model (see
            `adapter_state_from`); None reads (and gathers) the model's.
        is_main_process: whether this process writes; None: rank 0 of the default process
            group, or the only process.
    Raises RuntimeError when moa holds no MoA tensors (after unload() or merge_and_unload())
    or a tensor cannot be read whole, and OSError, with the errno of the cause, when the files
    cannot be written (a full disk): the previous adapter in `directory` is then unchanged.
    When the tensors were gathered collectively, every rank returns once the writer has
    finished, and raises if it failed.
    """
    directory = os.fspath(directory)
    if not moa.tensor_slots:
        raise RuntimeError(f"this MoAModel holds no MoA tensors (unload() or "
                           f"merge_and_unload() took them out), so there is no adapter to save; "
                           f"refusing to write an empty adapter into {directory!r}")
    writer = is_main() if is_main_process is None else bool(is_main_process)
    if state_dict is None:
        state, collective = gather_adapter_state(moa)
    else:
        state, collective = adapter_state_from(moa, state_dict, writer)
    failure = None
    if writer:
        try:
            _write_adapter(moa, directory, state)
        except BaseException as error:  # every rank learns of it below, then it propagates
            failure = error
    del state
    if collective and world_size() > 1 and not every_rank_succeeded(failure is None):
        if failure is None:
            raise RuntimeError(f"saving the MoA adapter into {directory!r} failed on the "
                               f"writing rank (see its error); the {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME} already there (if any) are unchanged")
    if failure is not None:
        raise failure


def _write_adapter(moa: MoAModel, directory: str, state: dict[str, torch.Tensor]) -> None:
    config_json = moa.moa_config.to_json_string()
    weights = safetensors.torch.save(state, metadata=adapter_metadata(moa, config_json, state))
    os.makedirs(directory, exist_ok=True)
    staging = None
    try:
        staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory)
        write_new_file(os.path.join(staging, WEIGHTS_NAME), weights)
        write_new_file(os.path.join(staging, CONFIG_NAME), config_json.encode("utf-8"))
        _commit(staging, directory, (WEIGHTS_NAME, CONFIG_NAME))
    except _RollbackFailed as error:
        kept, staging = staging, None
        raise OSError(error.errno, f"saving the MoA adapter into {directory!r} failed and the "
                                   f"previous files could not be put back "
                                   f"({error.strerror}); they are in {kept!r} as "
                                   f"*.previous") from error
    except OSError as error:
        raise OSError(error.errno, f"cannot save the MoA adapter into {directory!r}: "
                                   f"{error.strerror or error}; the {CONFIG_NAME} and "
                                   f"{WEIGHTS_NAME} already there (if any) are unchanged") \
            from error
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)




# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------

def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file, or a ValueError that says what is
    wrong with it."""
    path = os.fspath(path)
    expected = ("expected the safetensors file that MoAModel.save_pretrained writes; save the "
                "adapter again")
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(f"{path} is empty (0 bytes), perhaps from an interrupted copy; "
                         f"{expected}")
    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path} ({size} bytes) is not a readable safetensors file, perhaps "
                         f"truncated or not an adapter at all ({error}); {expected}") from None
    return state, metadata


def _leftover_hint(directory: str) -> str:
    leftovers = sorted(name for name in os.listdir(directory)
                       if name.startswith(STAGING_PREFIX))
    if not leftovers:
        return ""
    return (f" An interrupted save left {', '.join(leftovers)} there, which holds the "
            f"previous pair as *.previous.")


def _saved_json(metadata: dict[str, str], key: str, path: str):
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: its metadata {key!r} is not valid JSON ({error}); it was "
                         f"not written by MoAModel.save_pretrained") from None


def check_config(metadata: dict[str, str], config: MoAConfig, directory: str) -> None:
    """Refuse a moa_config.json that is not the config the weights were saved with (fields of
    RUNTIME_FIELDS aside); no check for weights saved without the metadata."""
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if CONFIG_KEY not in metadata:
        return
    saved = _saved_json(metadata, CONFIG_KEY, weights_path)
    try:
        saved = MoAConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        pass  # saved by another moa version: compare the fields as written
    saved = json.loads(json.dumps(saved))
    current = json.loads(config.to_json_string())
    if not isinstance(saved, dict):
        raise ValueError(f"{weights_path}: its metadata {CONFIG_KEY!r} is not a config dict")
    missing = "(absent)"
    differences = [f"{name}: the weights were saved with "
                   f"{json.dumps(saved.get(name, missing))}, {CONFIG_NAME} has "
                   f"{json.dumps(current.get(name, missing))}"
                   for name in sorted(set(saved) | set(current))
                   if name not in RUNTIME_FIELDS
                   and saved.get(name, missing) != current.get(name, missing)]
    if differences:
        raise ValueError(
            f"{os.path.join(directory, CONFIG_NAME)} does not describe the weights in "
            f"{weights_path}: " + "; ".join(differences) + ". The two files come from "
            "different saves (an interrupted save_pretrained, or one file copied over the "
            "other); save the adapter again, or put back the pair that belongs together."
            + _leftover_hint(directory))


def check_module_experts(metadata: dict[str, str], moa: MoAModel, weights_path: str) -> None:
    """Refuse weights whose modules were saved with other expert specs than the ones `moa`
    injected. Modules on one side only are left to load_moa_state_dict's key check."""
    if MODULE_EXPERTS_KEY not in metadata:
        return
    saved = _saved_json(metadata, MODULE_EXPERTS_KEY, weights_path)
    live = {name: [str(s) for s in module.specs] for name, module in moa.model.named_modules()
            if isinstance(module, MoALinear)}
    differences = [f"{name} (saved with {', '.join(saved[name])}; this model has "
                   f"{', '.join(live[name])})"
                   for name in sorted(set(saved) & set(live)) if saved[name] != live[name]]
    if differences:
        shown = "; ".join(differences[:_SHOWN]) + (
            f"; ... ({len(differences)} in all)" if len(differences) > _SHOWN else "")
        raise ValueError(f"the weights in {weights_path} were saved with other experts than "
                         f"this model's: {shown}")


def load_state_into(moa: MoAModel, state: dict[str, torch.Tensor]) -> None:
    """What MoAModel.load_moa_state_dict does: copy `state` into moa's MoA tensors, each
    present with its shape and nothing else; otherwise ValueError names the keys. Under
    FSDP2 (DTensor parameters) each rank keeps its shard of the whole tensors given."""
    expected = dict(moa.moa_named_parameters())
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    mismatched = [f"{k} (saved {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
                  for k in sorted(set(expected) & set(state))
                  if tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", extra),
                        ("shape mismatches", mismatched)):
        if keys:
            shown = ", ".join(keys[:_SHOWN]) + (f", ... ({len(keys)} in all)"
                                                if len(keys) > _SHOWN else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError("the saved MoA weights do not fit this model; " + "; ".join(problems))
    not_float = [f"{k} ({state[k].dtype})" for k in sorted(expected)
                 if not state[k].is_floating_point()]
    if not_float:
        raise ValueError("the saved MoA weights must be floating-point tensors; got "
                         + ", ".join(not_float[:_SHOWN]))
    with torch.no_grad():
        for name, param in expected.items():
            value = state[name]
            if is_dtensor(param):  # FSDP2: this rank's shard of the whole tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(param.device_mesh.device_type),
                                          param.device_mesh, param.placements,
                                          src_data_rank=None)  # every rank has it whole
            param.copy_(value)  # a float dtype other than the model's is cast


def _last_part(name_or_path: str) -> str:
    return os.path.basename(os.path.normpath(name_or_path))


def load_adapter(cls: type[MoAModel], model: nn.Module, source: str | os.PathLike,
                 is_trainable: bool = False, backend: str | None = None,
                 **hub: object) -> MoAModel:
    """What MoAModel.from_pretrained does: find the adapter (`resolve_adapter`), read and
    check both files, inject, load; on any error `model` is left as it was."""
    directory = resolve_adapter(source, **hub)
    path = os.path.join(directory, WEIGHTS_NAME)
    config = MoAConfig.from_pretrained(directory)
    state, metadata = read_weights(path)
    check_config(metadata, config, directory)
    if backend is not None:
        config = replace(config, backend=backend)
    trained_on = metadata.get("base_model_name_or_path", "")
    loading_into = base_model_name_or_path(model)
    moa = cls(model, config)
    try:
        check_module_experts(metadata, moa, path)
        moa.load_moa_state_dict(state)
    except BaseException:
        moa.unload()
        raise
    # A hub id and a local copy of the same checkpoint share their last path part.
    if trained_on and loading_into and _last_part(trained_on) != _last_part(loading_into):
        warnings.warn(f"the adapter in {os.fspath(source)!r} was trained on {trained_on!r}; "
                      f"loading it into {loading_into!r}", stacklevel=3)
    if not is_trainable:  # for inference, as PEFT loads it: frozen, dropout off
        moa.freeze_for_inference()
    return moa


def load_adapter_into(moa: MoAModel, source: str | os.PathLike, **hub: object) -> None:
    """What MoAModel.load_adapter does: copy a saved adapter's tensors into moa's MoA
    modules (a Trainer checkpoint of the same run, for instance). Its config must be moa's
    (RUNTIME_FIELDS aside), else ValueError names the differences; moa's tensors are only
    changed once everything is checked."""
    directory = resolve_adapter(source, **hub)
    path = os.path.join(directory, WEIGHTS_NAME)
    config = MoAConfig.from_pretrained(directory)
    state, metadata = read_weights(path)
    check_config(metadata, config, directory)
    saved, current = json.loads(config.to_json_string()), \
        json.loads(moa.moa_config.to_json_string())
    differences = [f"{name}: {json.dumps(saved.get(name))} there, "
                   f"{json.dumps(current.get(name))} in this model"
                   for name in sorted(set(saved) | set(current))
                   if name not in RUNTIME_FIELDS and saved.get(name) != current.get(name)]
    if differences:
        raise ValueError(f"the adapter in {os.fspath(source)!r} has another configuration "
                         f"than this MoAModel's: " + "; ".join(differences)
                         + ". Load it into a fresh base model with MoAModel.from_pretrained")
    check_module_experts(metadata, moa, path)
    moa.load_moa_state_dict(state)



def push_adapter(moa: MoAModel, repo_id: str, *, commit_message: str | None = None,
                 private: bool | None = None, token: str | bool | None = None,
                 revision: str | None = None, create_pr: bool = False,
                 directory: str | os.PathLike | None = None) -> object:
    """What MoAModel.push_to_hub does: save the adapter (on every rank: it may be a
    collective) and upload moa_config.json and adapter_model.safetensors, nothing else, to
    `repo_id` from the main process (created if needed; moa.hub.upload_adapter).
    `directory`: upload the adapter already saved there instead (its other files stay
    local). Returns huggingface_hub's CommitInfo on the main process, None elsewhere."""
    options = {"commit_message": commit_message, "private": private, "token": token,
               "revision": revision, "create_pr": create_pr}
    if directory is not None:
        return upload_adapter(directory, repo_id, **options)
    with tempfile.TemporaryDirectory(prefix="moa-push-") as staging:
        save_adapter(moa, staging)
        return upload_adapter(staging, repo_id, **options)


__all__ = ["WEIGHTS_NAME", "TensorSlot", "adapter_metadata", "adapter_state_from",
           "check_config", "check_module_experts", "clean_name", "gather_adapter_state",
           "is_main", "load_adapter", "load_adapter_into", "load_state_into", "push_adapter",
           "read_weights", "resolve_adapter", "save_adapter", "write_file_atomically"]
