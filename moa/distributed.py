"""One process of several: how `moa train`, `moa evaluate` and `moa compare` run when a
launcher (torchrun, accelerate launch) starts them as a group.

A launcher gives each process WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
`join_world` joins that group through accelerate's PartialState, which sets it up as the
Trainer does (gloo on the CPU; NCCL on GPUs, each process on cuda:LOCAL_RANK), early: the
commands agree on their checks before anything loads. Rank 0 alone checks and writes the
output folder and prints; the others learn what it found:

- `World.agree(step)`: every rank runs `step`; if it raised on any rank, every rank raises
  the error of the lowest rank it was raised on (so each prints the same one line and none
  is left waiting in a collective for a rank that gave up). A ValueError or OSError keeps
  its kind and message on the other ranks; anything else becomes a RuntimeError naming the
  rank.
- `World.share(value)`: rank 0's value, on every rank.
- `World.gather(items)`: every rank's list, concatenated in rank order, on every rank.

A world of one (no launcher) runs each step in place, with no collective: exactly what the
commands did before they knew of ranks.

Whole tensors from wrapped and sharded models (what `save_pretrained` writes, on every
rank): `gather_adapter_state` reads each MoA tensor whole from whatever wraps or shards it
(DDP, FSDP1, FSDP2, DeepSpeed ZeRO), `adapter_state_from` takes them from a state dict
given instead; `is_main`, `world_size` and `every_rank_succeeded` are the default process
group's (the one the Trainer and the launchers set up).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from moa.model import MoAModel

T = TypeVar("T")
# How many names an error message lists before "... (N in all)".
_SHOWN = 20


def launched_world_size() -> int:
    """The number of processes a launcher started (WORLD_SIZE; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of "
                         "processes") from None


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@dataclass(frozen=True)
class World:
    """This process's place in the group: rank (0 is the main process), size (processes in
    all), local_rank (its index on this machine: its GPU), backend (gloo, nccl; None alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """The device of --device `name` for this process: auto means a CUDA GPU when there
        is one (this process's, cuda:LOCAL_RANK, in a group), else the CPU; cuda in a group
        means cuda:LOCAL_RANK."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda" and self.size > 1:
            return torch.device("cuda", self.local_rank)
        return torch.device(name)

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.size > 1:
            torch.distributed.barrier()

    def agree(self, step: Callable[[], T]) -> T:
        """step() on every rank; its result here, once every rank has run it. If it raised
        on any rank, every rank raises the lowest such rank's error (see the module
        docstring). KeyboardInterrupt is not caught."""
        failure = None
        try:
            result = step()
        except Exception as error:
            failure, result = error, None
        if self.size == 1:
            if failure is not None:
                raise failure
            return result
        described = None if failure is None else (type(failure).__name__,
                                                  _kind(failure), str(failure))
        outcomes: list = [None] * self.size
        torch.distributed.all_gather_object(outcomes, described)
        first = next((rank for rank, outcome in enumerate(outcomes) if outcome is not None),
                     None)
        if first is None:
            return result
        if first == self.rank:
            raise failure
        name, kind, message = outcomes[first]
        if kind == "OSError":
            raise OSError(message)
        if kind == "ValueError":
            raise ValueError(message)
        raise RuntimeError(f"rank {first} failed: {name}: {message}")

    def share(self, value: T) -> T:
        """Rank 0's `value`, on every rank (values are small and picklable: paths, lists of
        names)."""
        if self.size == 1:
            return value
        box = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, items: list) -> list:
        """Every rank's `items`, concatenated in rank order, on every rank."""
        if self.size == 1:
            return list(items)
        lists: list = [None] * self.size
        torch.distributed.all_gather_object(lists, list(items))
        return [item for part in lists for item in part]

    def all_succeeded(self, succeeded: bool) -> bool:
        """Whether every rank passed succeeded=True (a collective: every rank calls it)."""
        if self.size == 1:
            return succeeded
        return all(self.gather([succeeded]))


def _kind(error: BaseException) -> str:
    if isinstance(error, OSError):
        return "OSError"
    if isinstance(error, ValueError):
        return "ValueError"
    return "other"


def current_world() -> World:
    """The group this process is in now (a world of one when none is set up)."""
    if not _initialized():
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    return World(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                 local_rank, str(torch.distributed.get_backend()))


def join_world(cpu: bool) -> World:
    """Join the group a launcher started (see the module docstring), once per process; a
    world of one when there is no launcher. cpu: gloo between CPU processes, even where
    there are GPUs (else NCCL, one GPU per local rank, when there are GPUs)."""
    if _initialized() or launched_world_size() == 1:
        return current_world()
    from accelerate import PartialState

    PartialState(cpu=cpu)  # torch.distributed.init_process_group, as the Trainer calls it
    return current_world()


def shard_with_fsdp2(model: torch.nn.Module, world: World, device: torch.device) -> None:
    """Shard `model` over the group with FSDP2, in place: fully_shard on each decoder layer
    (the classes the base model names in _no_split_modules, transformers' unit of
    sharding) and on the whole model, so the frozen base is sharded with the adapters, on a
    mesh of every process's `device` (the parameters move there). The model is then marked
    as the Trainer marks a model sharded when it loads (is_distributed_loading_by_transformers):
    the Trainer neither wraps it in DDP nor moves it, and lets FSDP2 reduce the gradients.
    ValueError when the model names no such layer."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in names]
    if not layers:
        raise ValueError(f"--fsdp: this model ({type(model).__name__}) names no decoder layer "
                         "class to shard (transformers' _no_split_modules); train it without "
                         "--fsdp")
    mesh = init_device_mesh(device.type, (world.size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.is_distributed_loading_by_transformers = True



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


def world_size() -> int:
    """The processes in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def every_rank_succeeded(succeeded: bool) -> bool:
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
    slots: list[TensorSlot] = moa.tensor_slots
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
        if is_dtensor(tensor):
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


def is_dtensor(tensor) -> bool:
    """Whether tensor is a DTensor (FSDP2), without importing DTensor where nobody did."""
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
    slots: list[TensorSlot] = moa.tensor_slots
    by_clean = {clean_name(key): key for key in state_dict}
    counts = {prefix: sum(prefix + slot.name in by_clean for slot in slots)
              for prefix in STATE_DICT_PREFIXES}
    prefix = max(STATE_DICT_PREFIXES, key=lambda p: counts[p])  # first of the best
    found = [slot for slot in slots if prefix + slot.name in by_clean]
    collective = False
    state = {}
    for slot in found:
        tensor = state_dict[by_clean[prefix + slot.name]]
        if is_dtensor(tensor):
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


__all__ = ["STATE_DICT_PREFIXES", "TensorSlot", "World", "adapter_state_from", "clean_name",
           "current_world", "every_rank_succeeded", "gather_adapter_state", "is_dtensor",
           "is_main", "join_world", "launched_world_size", "shard_with_fsdp2", "world_size"]
