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
backend, dropout, aux_loss_coef, adapter_dtype) may differ; adapters saved without the
metadata load unchecked, as before.

Weights are only ever read with safetensors (never pickle). An empty, truncated or malformed
file, or a moa_config.json that is not UTF-8 JSON, is a ValueError that names the file, the
problem and what was expected.

Distributed training: `save_adapter` is called on every rank. `gather_adapter_state` reads
each MoA tensor whole from whatever wraps or shards it (DDP, FSDP1, FSDP2, DeepSpeed ZeRO;
see the section "whole tensors from wrapped and sharded models"), the main process writes as
above, and after a collective gather every rank learns whether the write succeeded.

The Hub: `resolve_adapter` turns a repo id into a directory of huggingface_hub's cache (or
finds it there, offline); `push_adapter` uploads the two adapter files.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import safetensors.torch
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import nn

from moa.config import CONFIG_NAME, MoAConfig
from moa.layers import MoALinear

if TYPE_CHECKING:
    from moa.model import MoAModel

WEIGHTS_NAME = "adapter_model.safetensors"
STAGING_PREFIX = ".moa-save-"
CONFIG_KEY = "moa_config"
MODULE_EXPERTS_KEY = "moa_module_experts"
METADATA_FORMAT = "1"
RUNTIME_FIELDS = ("backend", "dropout", "aux_loss_coef", "adapter_dtype")
_SHOWN = 20


# ---------------------------------------------------------------------------------------
# writing files
# ---------------------------------------------------------------------------------------

def _write_file(path: str, data: bytes) -> None:
    """Create `path` (it must not exist), write `data` and fsync it."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(directory: str) -> None:
    """Make renames in `directory` durable; best effort where directories cannot be opened
    or fsynced (Windows, some network and FUSE filesystems)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_file_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` by a file holding `data`: written and fsynced under a temporary name in
    the same directory, then renamed over `path`. On any failure `path` is as it was and the
    temporary file is gone."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    while True:
        temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            _write_file(temporary, data)
            break
        except FileExistsError:
            continue
        except BaseException:
            _remove_quietly(temporary)
            raise
    try:
        os.replace(temporary, path)
    except BaseException:
        _remove_quietly(temporary)
        raise
    _fsync_directory(directory or ".")


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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
        _fsync_directory(directory)
    except BaseException:
        try:
            for name in reversed(replaced):
                target = os.path.join(directory, name)
                if previous[name] is None:
                    _remove_quietly(target)
                else:
                    os.replace(previous[name], target)
            _fsync_directory(directory)
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
    from moa import __version__

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
    if not moa._slots:
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
    if collective and _world_size() > 1 and not _all_succeeded(failure is None):
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
        _write_file(os.path.join(staging, WEIGHTS_NAME), weights)
        _write_file(os.path.join(staging, CONFIG_NAME), config_json.encode("utf-8"))
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
# whole tensors from wrapped and sharded models
# ---------------------------------------------------------------------------------------
#
# Users call save_pretrained on every rank. What a MoA tensor holds there depends on the
# wrapper: DDP and DeepSpeed ZeRO-1/2 keep a full replica on each rank (nothing to gather);
# FSDP2 (fully_shard) turns it into a DTensor (full_tensor() all-gathers it); FSDP1
# (FullyShardedDataParallel) leaves a flat slice of its unit's FlatParameter until the unit is
# unsharded (summon_full_params); ZeRO-3 leaves an empty tensor with `ds_shape` until
# deepspeed.zero.GatheredParameters gathers it. The tensors are read through the (module,
# attribute) slots recorded at injection, which survive every wrapper (FSDP1 with
# use_orig_params=False unregisters the parameters but sets the attributes while
# unsharded), and named as recorded, free of the prefixes wrappers insert into module paths.

WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
# Leading parts under which a state dict may hold the model's MoA tensors: the base model's
# own names, MoAModel.state_dict()'s, and those of a DDP or DeepSpeed engine around either.
STATE_DICT_PREFIXES = ("", "model.", "module.model.", "module.")


@dataclass(frozen=True)
class TensorSlot:
    """Where one MoA tensor lives: `module.<attribute>`, named `name` (as in the unwrapped
    base model's named_parameters()) with `shape`, as recorded at injection."""

    name: str
    module: nn.Module
    attribute: str
    shape: tuple[int, ...]


def clean_name(name: str) -> str:
    """`name` without the path parts wrappers insert: FSDP1's _fsdp_wrapped_module,
    activation checkpointing's _checkpoint_wrapped_module, torch.compile's _orig_mod."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def is_main() -> bool:
    """True on rank 0 of the default process group, or without one."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_succeeded(succeeded: bool) -> bool:
    """Whether every rank succeeded (a collective: every rank calls it)."""
    backend = str(dist.get_backend())
    device = torch.device("cpu")
    if "gloo" not in backend and torch.accelerator.is_available():
        device = torch.accelerator.current_accelerator()
    failed = torch.tensor([0 if succeeded else 1], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    return failed.item() == 0


def _fsdp1_units(model: nn.Module) -> dict[str, nn.Module]:
    """FSDP1 units (FullyShardedDataParallel instances) inside `model`, by module path."""
    if "torch.distributed.fsdp" not in sys.modules or not dist.is_available():
        return {}
    from torch.distributed.fsdp import FullyShardedDataParallel

    return {name: module for name, module in model.named_modules()
            if isinstance(module, FullyShardedDataParallel)}


def _whole_copy(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def gather_adapter_state(moa: MoAModel) -> tuple[dict[str, torch.Tensor], bool]:
    """Whole CPU copies of moa's MoA tensors, by name, and whether gathering them was a
    collective. When any tensor is sharded (FSDP1, FSDP2, ZeRO-3) every rank of the process
    group must call this, as users call save_pretrained; each FSDP1 unit is unsharded on
    its own (the peak is one unit, not the model), ZeRO-3 and FSDP2 gather the MoA tensors
    only, never the frozen base. Under DeepSpeed's bf16 or fp16 training the tensors are
    the optimizer's float32 master copies, as without DeepSpeed.

    Raises RuntimeError naming a tensor that is still not whole, e.g. one that an FSDP1 unit
    wrapping the MoAModel from outside shards (wrap the decoder layers with an
    auto_wrap_policy so each MoA tensor lies in a unit inside the model, or pass the full
    state dict: save_pretrained(directory, state_dict=...)).
    """
    slots: list[TensorSlot] = moa._slots
    units = _fsdp1_units(moa.model)
    owner = {}  # id(module) -> the path of its innermost FSDP1 unit
    for path, module in moa.model.named_modules():
        inside = [unit for unit in units if unit == path or path.startswith(unit + ".")
                  or unit == ""]
        if inside:
            owner[id(module)] = max(inside, key=len)
    if any(getattr(unit, "_is_root", False) is None for unit in units.values()):
        # Unsharding a unit before its root's first forward would make the unit a root of
        # its own, and that first forward would then fail.
        raise RuntimeError("FSDP1 sets its units up on the model's first forward; gathering "
                           "the MoA tensors before it would break that forward. Save before "
                           "wrapping the model (the tensors are the same), or after a forward")
    state: dict[str, torch.Tensor] = {}
    for unit_path, unit in units.items():
        mine = [slot for slot in slots if owner.get(id(slot.module)) == unit_path]
        if not mine:
            continue
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False):
            for slot in mine:
                state[slot.name] = _whole_copy(getattr(slot.module, slot.attribute))
    masters = False
    for slot in slots:
        if slot.name not in state:
            master = _deepspeed_master(getattr(slot.module, slot.attribute))
            if master is not None:
                state[slot.name] = _whole_copy(master)
                masters = True
    rest = [slot for slot in slots if slot.name not in state]
    zero3 = [slot for slot in rest if hasattr(getattr(slot.module, slot.attribute), "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(
                [getattr(slot.module, slot.attribute) for slot in zero3], modifier_rank=None):
            for slot in zero3:
                state[slot.name] = _whole_copy(getattr(slot.module, slot.attribute))
    collective = bool(units) or bool(zero3) or masters
    for slot in slots:
        if slot.name in state:
            continue
        tensor = getattr(slot.module, slot.attribute)
        if _is_dtensor(tensor):
            if tensor.device.type != tensor.device_mesh.device_type:
                # FSDP2's CPU offload: the shards live on the CPU, the mesh (NCCL) on the GPU
                tensor = tensor.to(tensor.device_mesh.device_type)
            tensor = tensor.full_tensor()
            collective = True
        state[slot.name] = _whole_copy(tensor)
    _check_whole(state, slots, "the model")
    return state, collective


def _deepspeed_master(param) -> torch.Tensor | None:
    """The float32 master copy, whole, that a DeepSpeed ZeRO optimizer keeps of `param` when
    the module's own copy is bfloat16 or float16 (DeepSpeed's mixed precision: the module
    computes in half precision, the optimizer updates float32 partitions); None for any other
    tensor. A collective: every rank calls it, in the same order."""
    if param.dtype == torch.float32 or "deepspeed" not in sys.modules:
        return None
    if not (hasattr(param, "_z3_optimizer") or hasattr(param, "_hp_mapping")):
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(param)


def _is_dtensor(tensor) -> bool:
    if "torch.distributed.tensor" not in sys.modules:
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _check_whole(state: dict[str, torch.Tensor], slots: list[TensorSlot], source: str) -> None:
    wrong = [f"{slot.name} (got {tuple(state[slot.name].shape)}, the tensor is "
             f"{slot.shape})" for slot in slots
             if slot.name in state and tuple(state[slot.name].shape) != slot.shape]
    if wrong:
        raise RuntimeError(
            f"cannot read the MoA tensors whole from {source}: "
            + ", ".join(wrong[:_SHOWN]) + (f", ... ({len(wrong)} in all)"
                                           if len(wrong) > _SHOWN else "")
            + ". A wrapper shards them without a way to gather them from inside the MoAModel "
            "(an FSDP1 FullyShardedDataParallel around the MoAModel itself: wrap its decoder "
            "layers with an auto_wrap_policy, so each MoA tensor lies in a unit inside the "
            "model, or pass the full state dict: save_pretrained(directory, state_dict=...))")


def adapter_state_from(moa: MoAModel, state_dict: dict[str, torch.Tensor],
                       writer: bool) -> tuple[dict[str, torch.Tensor], bool]:
    """moa's MoA tensors taken from `state_dict` (whole CPU copies), and whether reading
    them was a collective (DTensor values are all-gathered: every rank passes its state
    dict). Keys may carry wrapper path parts and one of STATE_DICT_PREFIXES (a state dict of
    the base model, of the MoAModel, or of a DDP or DeepSpeed engine around it); the other
    tensors in it are ignored. A rank that does not write may pass an empty dict (a full
    state dict gathered to rank 0 only); the writer's must hold every MoA tensor."""
    slots: list[TensorSlot] = moa._slots
    by_clean = {clean_name(key): key for key in state_dict}
    counts = {prefix: sum(prefix + slot.name in by_clean for slot in slots)
              for prefix in STATE_DICT_PREFIXES}
    prefix = max(STATE_DICT_PREFIXES, key=lambda p: counts[p])  # first of the best
    found = [slot for slot in slots if prefix + slot.name in by_clean]
    collective = False
    state = {}
    for slot in found:
        tensor = state_dict[by_clean[prefix + slot.name]]
        if _is_dtensor(tensor):
            tensor = tensor.full_tensor()
            collective = True
        state[slot.name] = _whole_copy(tensor)
    if writer and len(found) < len(slots):
        missing = [slot.name for slot in slots if slot not in found]
        raise ValueError("the state_dict passed to save_pretrained lacks MoA tensors of this "
                         "model: " + ", ".join(missing[:_SHOWN])
                         + (f", ... ({len(missing)} in all)" if len(missing) > _SHOWN else "")
                         + "; pass the full (gathered) state dict, or none to read the model")
    _check_whole(state, slots, "the state_dict")
    return state, collective


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
            if _is_dtensor(param):  # FSDP2: this rank's shard of the whole tensor
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
        for _, param in moa.moa_named_parameters():
            param.requires_grad_(False)
        moa.eval()
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


# ---------------------------------------------------------------------------------------
# the Hugging Face Hub
# ---------------------------------------------------------------------------------------

def resolve_adapter(source: str | os.PathLike, *, revision: str | None = None,
                    token: str | bool | None = None, cache_dir: str | os.PathLike | None = None,
                    local_files_only: bool = False) -> str:
    """The local directory holding the adapter `source` names: a directory, or a Hub repo id
    ("user/repo") whose moa_config.json and adapter_model.safetensors huggingface_hub fetches
    at `revision` (a branch, tag or commit; None: the default branch) into its cache, or
    finds there: with HF_HUB_OFFLINE=1 or local_files_only=True only the cache is read, and
    without a connection huggingface_hub falls back to it. Both files come from one commit.

    Raises FileNotFoundError when `source` is neither a directory holding an adapter nor a
    repo (or revision) that holds one, naming what was tried.
    """
    path = os.fspath(source)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, WEIGHTS_NAME)):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path!r}")
        if revision is not None:
            raise ValueError(f"revision={revision!r} names a commit of a Hub repo, but "
                             f"{path!r} is a local directory")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise FileNotFoundError(f"{path!r} is neither a directory nor a Hugging Face Hub "
                                f"repo id (user/repo)") from None
    where = (f"{path!r} (no local directory of that name; tried it as a Hugging Face Hub "
             f"repo id{f' at revision {revision!r}' if revision else ''})")
    options = {"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
    try:
        config_path = hf_hub_download(path, CONFIG_NAME, revision=revision, **options)
        # snapshots/<commit>/moa_config.json: the weights from the same commit, even if the
        # branch moves between the two downloads
        commit = os.path.basename(os.path.dirname(config_path))
        weights_path = hf_hub_download(path, WEIGHTS_NAME, revision=commit, **options)
    except OSError as error:  # huggingface_hub's errors are OSErrors
        offline = ""
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE or local_files_only:
            offline = (" (offline: HF_HUB_OFFLINE=1 or local_files_only=True reads the local "
                       "cache only, which does not hold it)")
        raise FileNotFoundError(f"cannot load a MoA adapter from {where}{offline}: "
                                f"{type(error).__name__}: {error}") from error
    if os.path.dirname(config_path) != os.path.dirname(weights_path):
        raise FileNotFoundError(f"{where}: {CONFIG_NAME} and {WEIGHTS_NAME} resolved to "
                                f"different snapshots")
    return os.path.dirname(config_path)


def push_adapter(moa: MoAModel, repo_id: str, *, commit_message: str | None = None,
                 private: bool | None = None, token: str | bool | None = None,
                 revision: str | None = None, create_pr: bool = False,
                 directory: str | os.PathLike | None = None) -> object:
    """What MoAModel.push_to_hub does: save the adapter (on every rank: it may be a
    collective) and upload moa_config.json and adapter_model.safetensors, nothing else, to
    `repo_id` from the main process (created if needed). `directory`: upload the adapter
    already saved there instead (its other files stay local). Returns huggingface_hub's
    CommitInfo on the main process, None elsewhere."""
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="moa-push-") as staging:
            save_adapter(moa, staging)
            return push_adapter(moa, repo_id, commit_message=commit_message, private=private,
                                token=token, revision=revision, create_pr=create_pr,
                                directory=staging)
    if not is_main():
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=os.fspath(directory),
                             allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
                             commit_message=commit_message or "Upload MoA adapter",
                             revision=revision, create_pr=create_pr)


__all__ = ["WEIGHTS_NAME", "TensorSlot", "adapter_metadata", "adapter_state_from",
           "check_config", "check_module_experts", "clean_name", "gather_adapter_state",
           "is_main", "load_adapter", "load_adapter_into", "load_state_into", "push_adapter",
           "read_weights", "resolve_adapter", "save_adapter", "write_file_atomically"]
