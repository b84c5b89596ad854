"""A `moa compare` folder and what one run measures: the Plan (the checked options and
where each run's result lives: DIR/runs/VARIANT/seed-K.json, DIR/runs/base.json), a result
read back, the lock a process holds on the run it makes (`RunLock`: DIR/runs/VARIANT/
seed-K.lock), and what a run records beside its accuracy (peak memory during training,
router statistics on the first test prompts).
"""

from __future__ import annotations

import gc
import json
import os
import re
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moa.cli.compare_options import CompareOptions
from moa.cli.compare_variants import BASE, Variant

RUNS = "runs"
FORMAT_VERSION = 1
# What every result file holds (base.json and runs/VARIANT/seed-K.json alike).
RESULT_FIELDS = frozenset({"accuracy", "accuracy_norm", "correct", "correct_norm",
                           "questions", "trainable_params"})
# The router statistics are measured on the first test prompts, one forward each (so that
# no padding counts): the same prompts for every variant and seed.
ROUTER_PROMPTS = 32


@dataclass
class Plan:
    """The checked options: variants, rates, the runs' directory and what defines them."""

    options: CompareOptions
    variants: list[Variant]
    rates: dict[str, float]
    reference: str
    out: Path
    defining: dict

    def run_path(self, variant: str, seed: int, suffix: str = ".json") -> Path:
        return self.out / RUNS / variant / f"seed-{seed}{suffix}"

    def base_path(self, suffix: str = ".json") -> Path:
        return self.out / RUNS / f"{BASE}{suffix}"


def load_result(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        result = None
    if not isinstance(result, dict) or not RESULT_FIELDS <= set(result):
        raise ValueError(f"{path} is not a result that moa compare wrote (not readable JSON, "
                         "or fields missing; it writes results atomically, so something else "
                         "changed it); delete it to run that run again")
    return result


class RunLock:
    """An exclusive lock on one run of a compare folder, held while a process makes it, so
    that processes running the same comparison (started twice, or on purpose to use more
    cores) never make the same run: the second leaves a locked run to the first and takes
    the next. An advisory lock (flock) on DIR/runs/VARIANT/seed-K.lock: the system drops it
    when its process ends, however it ends, so no lock outlives a crash. The file stays
    (tiny; deleting a lock file that others may have open would let two processes hold
    "the" lock) and says who holds it. Where there is no flock (not a POSIX system) or the
    file system refuses it (some network file systems), every lock is granted: one process
    per folder there."""

    def __init__(self, path: Path, handle) -> None:
        self.path, self._handle = path, handle

    @classmethod
    def acquire(cls, path: Path, wait: bool = False, shared: bool = False
                ) -> tuple[RunLock | None, str]:
        """(the lock, "") when this process now holds it, else (None, who holds it); with
        wait, until it holds it; shared: a lock that other shared holders may hold too
        (an exclusive one waits for, or is refused by, all of them). A lock file it cannot
        write (another user's) is locked read-only; one it cannot make at all (a read-only
        folder) grants the lock: the run then fails where it writes, as it would without
        locks."""
        try:
            import fcntl
        except ImportError:  # no advisory locks here
            return cls(path, None), ""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+", encoding="utf-8")
        except PermissionError:
            try:
                handle = open(path, encoding="utf-8")
            except OSError:
                return cls(path, None), ""
        except OSError:
            return cls(path, None), ""
        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) |
                        (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            return None, holder
        except OSError:  # no locks on this file system (ENOLCK, EOPNOTSUPP)
            handle.close()
            return cls(path, None), ""
        if handle.writable() and not shared:
            handle.seek(0)
            handle.truncate()
            handle.write(f"moa compare pid {os.getpid()} on {socket.gethostname()} since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            handle.flush()
        return cls(path, handle), ""

    @classmethod
    def held(cls, path: Path) -> bool:
        """Whether another process holds the lock at `path` now (shared or not)."""
        lock, _ = cls.acquire(path)
        if lock is None:
            return True
        lock.release()
        return False

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # (closing the file drops the lock)
            self._handle = None


def return_freed_heap() -> bool:
    """Hand the heap memory that earlier work freed back to the system (glibc's
    malloc_trim(0)), so that it no longer counts as resident: freed blocks below a live one
    otherwise stay in the resident set, and a peak measured from there would include them
    (a compare run after another one's scoring read twice its real peak). False where the C
    library has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


class PeakMemory:
    """The peak memory of a block, in MiB: on CUDA torch.cuda.max_memory_allocated (reset at
    the start); on Linux the process's peak resident set size (the kernel's high-water mark
    VmHWM, reset at the start by writing 5 to /proc/self/clear_refs), so no peak is missed;
    elsewhere the resident set size sampled every SAMPLE_SECONDS by a thread (psutil), which
    can miss a peak shorter than that. On the CPU, memory freed before the block is handed
    back to the system first (`return_freed_heap`), so the peak is that of live memory."""

    SAMPLE_SECONDS = 0.05
    STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.high_water_mark = not self.cuda and self._can_reset_high_water_mark()
        if self.cuda:
            self.kind = "cuda: torch.cuda.max_memory_allocated during training"
        elif self.high_water_mark:
            self.kind = ("cpu: peak resident set size of the process during training "
                         "(VmHWM, reset at the start)")
        else:
            self.kind = ("cpu: peak resident set size of the process during training, "
                         f"sampled every {self.SAMPLE_SECONDS} s")
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    @classmethod
    def _high_water_mark_bytes(cls) -> int:
        found = re.search(r"^VmHWM:\s+(\d+) kB", cls.STATUS.read_text(), re.MULTILINE)
        if found is None:
            raise OSError("no VmHWM line in /proc/self/status")
        return int(found.group(1)) * 1024

    @classmethod
    def _can_reset_high_water_mark(cls) -> bool:
        try:
            cls._high_water_mark_bytes()
            cls.CLEAR_REFS.write_text("5")
        except OSError:
            return False
        return True

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while True:
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)
            if self._stop.wait(self.SAMPLE_SECONDS):
                break
        self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        if not self.cuda:
            gc.collect()
            return_freed_heap()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self.high_water_mark:
            self.CLEAR_REFS.write_text("5")
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        elif self.high_water_mark:
            self.peak_bytes = self._high_water_mark_bytes()
        else:
            self._stop.set()
            self._thread.join()


def router_prompts(items: Sequence) -> list[str]:
    """The prompts the router statistics are measured on: the first ROUTER_PROMPTS test
    items' contexts."""
    return [getattr(item, "context", None) or item.prompt for item in items[:ROUTER_PROMPTS]]


@torch.no_grad()
def router_statistics(model, tokenizer, prompts: Sequence[str], max_length: int) -> dict:
    """Per router of a MoAModel: expert names, mode, tokens, and the mean gate and fraction
    of tokens active per expert, over every token of `prompts` (one forward each, so no
    padding counts; the last max_length tokens of a longer prompt). {} for a model without
    routers (plain LoRA, PEFT)."""
    from moa.model import MoAModel

    if not isinstance(model, MoAModel) or model.moa_config.router is None:
        return {}
    device = next(model.parameters()).device
    totals: dict[str, dict] = {}
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"][-max_length:]
        model(input_ids=torch.tensor([ids], device=device))
        for name, entry in model.router_stats().items():
            total = totals.setdefault(name, {
                "experts": entry["experts"], "mode": entry["mode"], "tokens": 0,
                "mean_gate": np.zeros(len(entry["experts"])),
                "active_fraction": np.zeros(len(entry["experts"]))})
            total["tokens"] += entry["tokens"]
            for key in ("mean_gate", "active_fraction"):
                total[key] += entry["tokens"] * np.asarray(entry[key])
    for total in totals.values():
        for key in ("mean_gate", "active_fraction"):
            total[key] = [round(float(v), 6) for v in
                          total[key] / max(1, total["tokens"])]
    return totals


def score_result(scores: dict) -> dict:
    """The accuracy fields of a run's result from evaluate_items' dict: accuracy, and the
    length-normalised accuracy where every question is multiple choice (else None)."""
    tasks = scores["tasks"]
    all_choices = set(tasks) == {"multiple_choice"}
    return {"accuracy": scores["accuracy"],
            "accuracy_norm": tasks["multiple_choice"]["accuracy_norm"] if all_choices
            else None,
            "questions": scores["records"],
            "correct": "".join("1" if p["correct"] else "0" for p in scores["predictions"]),
            "correct_norm": "".join("1" if p["prediction_norm"] == p["answer"] else "0"
                                    for p in scores["predictions"]) if all_choices else None}


__all__ = ["FORMAT_VERSION", "PeakMemory", "Plan", "ROUTER_PROMPTS", "RUNS", "RunLock",
           "load_result", "router_prompts", "router_statistics", "score_result"]
