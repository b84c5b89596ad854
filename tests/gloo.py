"""Two worker processes over gloo on the loopback interface, bounded in time: the harness of
the multi-process tests (tests/moa/test_distributed.py, tests/moa/cli/test_train_distributed.py).

A test module defines `worker(rank, port, out_dir)`, which marks its stages with `mark`, and
calls `launch(worker, out_dir, deadline_s)` from a fixture. Each worker runs its scenarios
with `run_scenarios` (a scenario that raises leaves its traceback in
`SCENARIO/rankN.error`; the workers go on to the next one) and ends with `leave()`. The
parent kills both workers at the deadline; if they could not even exchange one tensor, the
machine cannot run gloo and `launch` says skip; a hang after that point is a failure.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def mark(folder: str | Path, rank: int, stage: str) -> None:
    """Record that `rank` reached `stage` (a file rankN.STAGE in `folder`)."""
    (Path(folder) / f"rank{rank}.{stage}").touch()


def reached(folder: str | Path, stage: str) -> bool:
    """Whether every rank marked `stage` in `folder`."""
    return all((Path(folder) / f"rank{rank}.{stage}").exists() for rank in range(WORLD_SIZE))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_interface() -> str | None:
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def run_scenarios(rank: int, out_dir: str | Path, scenarios: list[str],
                  runs: dict[str, Callable[[int, Path], None]]) -> None:
    """Inside a worker whose process group is up: each scenario in its own folder, its
    traceback written there if it raises, the ranks in step between scenarios."""
    for scenario in scenarios:
        folder = Path(out_dir) / scenario
        folder.mkdir(exist_ok=True)
        try:
            runs[scenario](rank, folder)
        except BaseException:
            (folder / f"rank{rank}.error").write_text(traceback.format_exc())
        dist.barrier()
        mark(folder, rank, "done")
    mark(out_dir, rank, "done")


def leave() -> None:
    """End a worker whose results are written. Destroying the DDP and gloo objects as the
    worker function returns stalled for about 170 s in one run out of four here (no Python
    frame above the call): leave without running destructors."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(worker: Callable, out_dir: str | Path, deadline_s: float) -> str | None:
    """Both ranks of `worker(rank, port, out_dir)` to completion, or killed at the deadline:
    "skip: ..." (the machine cannot run gloo), "fail: ...", or None when every scenario has
    its results."""
    context = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE,
                                 join=False, start_method="spawn")
    started = time.monotonic()
    try:
        while not context.join(timeout=1):
            if time.monotonic() - started > deadline_s:
                for process in context.processes:
                    process.kill()
                problem = f"did not finish within {deadline_s} s"
                break
        else:
            return None
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        problem = "failed: " + str(error).strip().splitlines()[-1]
    if reached(out_dir, "done"):
        return None  # the results are written; only the teardown of the process group stalled
    if reached(out_dir, "started") and not reached(out_dir, "connected"):
        return (f"skip: this machine cannot run gloo: two processes on loopback {problem} "
                "before exchanging one tensor")
    return f"fail: the gloo workers {problem}"


def launch(worker: Callable, out_dir: Path, deadline_s: float) -> str | None:
    """`run_workers` with gloo on the loopback interface (skips where torch has no gloo)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with pytest.MonkeyPatch.context() as monkeypatch:
        interface = loopback_interface()
        if interface is not None:
            monkeypatch.setenv("GLOO_SOCKET_IFNAME", interface)
        return run_workers(worker, out_dir, deadline_s)


def scenario_folder(runs: tuple[Path, str | None], scenario: str) -> Path:
    """The folder of a finished scenario's results; skips or fails the calling test with the
    launch's outcome, or the scenario's traceback."""
    out_dir, outcome = runs
    if outcome is not None and outcome.startswith("skip: "):
        pytest.skip(outcome[len("skip: "):])
    folder = out_dir / scenario
    errors = sorted(folder.glob("rank*.error"))
    if errors:
        pytest.fail(f"{scenario} raised on {errors[0].stem}:\n{errors[0].read_text()}")
    if outcome is not None or not reached(folder, "done"):
        pytest.fail(outcome or f"{scenario} did not finish")
    return folder
