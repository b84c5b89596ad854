"""`moa train`'s optimizer step on one process against two (gloo, data-parallel), on the
model benchmark's Llama (moa/cli/bench.py MODEL_FULL: hidden 512, 8 layers, vocab 4096) with
soft_moa, sequences of 256 tokens.

    python benchmarks/data_parallel.py --steps 10 --rounds 2

Each configuration is a fresh `run_train` (the code path of `moa train`; two processes
under torchrun, as a user launches them) training --steps steps at the same global batch
of 8 sequences: one process with batch 8 (on 2 threads, then on 1), two processes with batch
4 each (1 thread each). The configurations run one after another in every round, in
alternating order; a configuration's time is the median over rounds of the median
optimizer-step wall time of its run (rank 0's: with two processes it includes waiting for
the other and the gradient all-reduce). Prints the load average before and after: the
machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQUENCE = 256
GLOBAL_BATCH = 8
# (name, processes, threads per process)
CONFIGURATIONS = (("1 process, 2 threads", 1, 2), ("1 process, 1 thread", 1, 1),
                  ("2 processes (gloo), 1 thread each", 2, 1))


def write_records(path: Path, count: int = 64) -> None:
    """Records of about SEQUENCE byte tokens each, all the same length (no padding)."""
    lines = []
    for i in range(count):
        prompt = f"Record {i:04d}: " + "abcdefgh" * ((SEQUENCE - 80) // 8)
        lines.append(json.dumps({"prompt": prompt, "completion": " " + "xyz" * 20}))
    path.write_text("\n".join(lines) + "\n")


def worker(data: str, steps: int, out: str) -> None:
    """One run_train of the benchmark model; rank 0 prints its step times as JSON."""
    import torch

    from moa.cli import bench
    from moa.cli.train import TrainOptions, run_train
    from moa.distributed import current_world

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    base = bench.build_llama(bench.MODEL_FULL, torch.device("cpu"))
    options = TrainOptions(data=data, steps=steps, batch_size=GLOBAL_BATCH // processes,
                           max_length=SEQUENCE, save_interval=10**9, out=out, device="cpu")
    result = run_train(options, log=lambda _: None, progress=False, base_model=base)
    if current_world().is_main:
        print("RESULT " + json.dumps({"seconds_per_step": result.seconds_per_step,
                                      "steps": len(result.losses)}), flush=True)


def run_configuration(processes: int, threads: int, data: Path, steps: int,
                      folder: Path) -> dict:
    script = str(Path(__file__).resolve())
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tempfile.mkdtemp(dir=folder)
    worker_args = ["--worker", "--data", str(data), "--steps", str(steps), "--out", out]
    if processes == 1:
        argv = [sys.executable, script, *worker_args]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                str(processes), "--master-addr", "127.0.0.1", "--master-port", str(port),
                script, *worker_args]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{done.stderr[-3000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.data, args.steps, args.out)
        return
    started = time.time()
    load_before = os.getloadavg()
    samples: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGURATIONS}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_records(folder / "data.jsonl")
        for round_ in range(args.rounds):
            order = CONFIGURATIONS if round_ % 2 == 0 else tuple(reversed(CONFIGURATIONS))
            for name, processes, threads in order:
                found = run_configuration(processes, threads, folder / "data.jsonl",
                                          args.steps, folder)
                samples[name].append(found["seconds_per_step"])
                print(f"round {round_ + 1}: {name}: {found['seconds_per_step']:.3f} s per "
                      f"step ({found['steps']} steps)", flush=True)
    load_after = os.getloadavg()
    reference = statistics.median(samples[CONFIGURATIONS[0][0]])
    print(f"\nsoft_moa on the benchmark Llama (bench.MODEL_FULL), global batch "
          f"{GLOBAL_BATCH} x {SEQUENCE} tokens, fp32, {args.steps} steps per run, "
          f"{args.rounds} rounds")
    print(f"| configuration | per-process batch | s per step | sequences / s | "
          f"x {CONFIGURATIONS[0][0]} |")
    print("|---|---:|---:|---:|---:|")
    for name, processes, _ in CONFIGURATIONS:
        seconds = statistics.median(samples[name])
        print(f"| {name} | {GLOBAL_BATCH // processes} | {seconds:.3f} | "
              f"{GLOBAL_BATCH / seconds:.2f} | {seconds / reference:.3f} |")
    print(f"\nload average (1, 5, 15 min) before {load_before}, after {load_after}; "
          f"{time.time() - started:.0f} s in all")


if __name__ == "__main__":
    main()
