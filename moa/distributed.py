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
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


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


__all__ = ["World", "current_world", "join_world", "launched_world_size", "shard_with_fsdp2"]
