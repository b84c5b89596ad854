"""`moa train`, `moa evaluate` and `moa compare` launched as two processes: gloo over
loopback, the embedded text model, 32 training records.

One pair of worker processes runs every scenario in order (starting a pair costs more than
the scenarios together). Each worker sets what a launcher sets (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT; DS_ACCELERATOR=cpu) and calls moa.cli.main(argv), as
`moa` runs under torchrun, with its stdout, stderr and exit status in files. Rank 1 also
records every file it opens for writing, creates, renames or removes from Python (an audit
hook): rank 0 alone writes the outputs.

- ddp, fsdp (--fsdp), zero3 (--deepspeed with a ZeRO-3 config; skipped without
  deepspeed): `moa train` over one epoch at a global batch of 8 (4 steps, checkpoints at 2
  and 4; fsdp in micro-batches of 2 accumulated twice, zero3 with activation
  checkpointing), then checkpoint-2 alone copied into a new OUT and continued with --resume
  last. The ddp scenario ends with a third command into the first OUT, which holds a run:
  refused on both ranks with the same line, then one whose first checkpoint rank 0 cannot
  write (a full disk); fsdp and zero3 with two steps under --bf16 and
  --gradient-checkpointing.
- evaluate: `moa evaluate` of the ddp adapter on multiple-choice and arithmetic records.
- compare: `moa compare` of one variant, one seed.

The parent compares with one process: the same global batch (--batch-size 8) gives the same
adapter and losses, --batch-size 4 twice the steps, evaluation the same predictions; and it
reads the checkpoints' tensors (no base weights). A last test runs `moa train` through
torchrun itself (python -m torch.distributed.run), the real launch path.

Bounded in time as tests/moa/test_distributed.py is: loopback only, each worker dumps its
stack and exits past its deadline, the parent kills both at the deadline; if two processes
cannot exchange one tensor the tests skip with that reason.
"""

import contextlib
import faulthandler
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from moa.cli import main
from moa.cli.evaluate import EvaluateOptions, run_evaluate
from moa.cli.loading import build_text_model
from moa.cli.train import TrainOptions, run_train
from tests.conftest import relative_error
from tests.gloo import (
    WORLD_SIZE,
    free_port,
    launch,
    leave,
    loopback_interface,
    mark,
    run_scenarios,
    scenario_folder,
)

DEADLINE_S = 300
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ZERO3_CASE = pytest.param("zero3", marks=pytest.mark.skipif(not HAS_DEEPSPEED,
                                                      reason="deepspeed is not installed"))
RECORDS = 32
TRAIN = ["--epochs", "1", "--batch-size", "4", "--lr", "1e-2", "--save-interval", "2",
         "--save-total-limit", "5"]
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "train_batch_size": "auto"}
# The same global batch of 8 each: fsdp as 2 processes x 2 x 2 micro-batches (FSDP2's
# gradient reduction deferred to the last one), zero3 with activation checkpointing.
STRATEGIES = {"ddp": [], "fsdp": ["--fsdp", "--batch-size", "2", "--gradient-accumulation", "2"],
              "zero3": ["--deepspeed", "{inputs}/zero3.json", "--gradient-checkpointing"]}
HEADERS = {"ddp": "global batch of 2 x 4 x 1", "fsdp": "global batch of 2 x 2 x 2",
           "zero3": "global batch of 2 x 4 x 1"}
SCENARIOS = ["ddp", "fsdp"] + (["zero3"] if HAS_DEEPSPEED else []) + ["evaluate", "compare"]


def write_inputs(folder: Path) -> None:
    """The training records, the evaluation records (multiple choice and arithmetic, an odd
    number: the two processes get unequal shares) and the ZeRO-3 config."""
    train = [{"prompt": f"Count from {i}:", "completion": f" {i + 1} {i + 2}"}
             for i in range(RECORDS)]
    evaluation = [{"question": f"What follows {i}?", "choices": [str(i + 1), str(i + 7), "x"],
                   "answer": 0} for i in range(5)] + \
        [{"question": f"{a} plus {b}?", "answer": a + b} for a, b in [(1, 2), (3, 4)]]
    for name, records in (("train.jsonl", train), ("eval.jsonl", evaluation)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    (folder / "zero3.json").write_text(json.dumps(ZERO3))


# ---------------------------------------------------------------------------------------
# the scenarios, as each rank runs them
# ---------------------------------------------------------------------------------------

WRITES: list[str] = []  # what this process wrote from Python, while recording
RECORDING = [False]


def record_writes(event: str, args: tuple) -> None:
    """An audit hook: the paths this process opens for writing, creates, renames or
    removes."""
    if not RECORDING[0]:
        return
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        writing = any(c in (mode or "") for c in "wax+") or \
            bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing:
            WRITES.append(os.fsdecode(args[0]))
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
        WRITES.append(os.fsdecode(args[0]))
    elif event in ("os.rename", "os.replace"):
        WRITES.extend((os.fsdecode(args[0]), os.fsdecode(args[1])))


def cli(folder: Path, name: str, argv: list[str], rank: int) -> None:
    """moa.cli.main(argv) with its output, exit status and (rank 1) writes in files named
    after `name`."""
    output, errors = (folder / f"{name}.rank{rank}.out"), (folder / f"{name}.rank{rank}.err")
    del WRITES[:]
    with open(output, "w") as out, open(errors, "w") as err, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        RECORDING[0] = rank != 0
        try:
            code = main(argv)
        finally:
            RECORDING[0] = False
    (folder / f"{name}.rank{rank}.code").write_text(str(code))
    (folder / f"{name}.rank{rank}.writes").write_text("\n".join(WRITES))


def run_training(rank: int, folder: Path, strategy: str) -> None:
    inputs = str(folder.parent / "inputs")
    extra = [word.format(inputs=inputs) for word in STRATEGIES[strategy]]
    data = ["--data", f"{inputs}/train.jsonl"]
    cli(folder, "run", ["train", *data, *TRAIN, *extra, "--out", str(folder / "run")], rank)
    if rank == 0:  # a run stopped after its second step: its first checkpoint alone
        shutil.copytree(folder / "run" / "checkpoints" / "checkpoint-2",
                        folder / "resumed" / "checkpoints" / "checkpoint-2")
    dist.barrier()
    cli(folder, "resume", ["train", *data, *TRAIN, *extra, "--out", str(folder / "resumed"),
                           "--resume", "last"], rank)
    if strategy == "ddp":
        cli(folder, "refused", ["train", *data, "--steps", "2", "--out", str(folder / "run")],
            rank)
        with disk_full_for("optimizer.pt", rank == 0):
            cli(folder, "disk-full", ["train", *data, "--steps", "2", "--save-interval", "1",
                                      "--out", str(folder / "disk-full")], rank)
    else:
        cli(folder, "mixed", ["train", *data, "--steps", "2", "--batch-size", "4", *extra,
                              "--bf16", "--gradient-checkpointing", "--out",
                              str(folder / "mixed")], rank)


@contextlib.contextmanager
def disk_full_for(name: str, active: bool):
    """torch.save of a file named `name` fails as on a full disk (in this process, if
    active)."""
    import errno

    real = torch.save

    def save(obj, file, *args, **kwargs):
        if active and os.path.basename(str(file)) == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real(obj, file, *args, **kwargs)

    torch.save = save
    try:
        yield
    finally:
        torch.save = real


def run_evaluate_scenario(rank: int, folder: Path) -> None:
    inputs = folder.parent / "inputs"
    cli(folder, "evaluate", ["evaluate", "--data", str(inputs / "eval.jsonl"), "--adapter",
                             str(folder.parent / "ddp" / "run" / "adapter"), "--batch-size", "2",
                             "--max-new-tokens", "4", "--out", str(folder / "results.json")],
        rank)


def run_compare_scenario(rank: int, folder: Path) -> None:
    inputs = folder.parent / "inputs"
    cli(folder, "compare", ["compare", "--data", str(inputs / "train.jsonl"), "--eval-data",
                            str(inputs / "eval.jsonl"), "--variants", "soft_moa", "--seeds", "1",
                            "--epochs", "1", "--batch-size", "4", "--eval-batch-size", "2",
                            "--max-new-tokens", "4", "--out", str(folder / "dir")], rank)


RUNS = {"ddp": lambda rank, folder: run_training(rank, folder, "ddp"),
        "fsdp": lambda rank, folder: run_training(rank, folder, "fsdp"),
        "zero3": lambda rank, folder: run_training(rank, folder, "zero3"),
        "evaluate": run_evaluate_scenario, "compare": run_compare_scenario}


def worker(rank: int, port: int, out_dir: str) -> None:
    # Well before the parent's deadline, which also counts this process's start-up.
    faulthandler.dump_traceback_later(DEADLINE_S - 40, exit=True)
    out = Path(out_dir)
    mark(out, rank, "started")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      LOCAL_WORLD_SIZE=str(WORLD_SIZE), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if HAS_DEEPSPEED:
        import deepspeed.comm.torch  # noqa: F401 (deepspeed.comm.torch is torch there)

        # DeepSpeed's communication backend JIT-compiles a shared-memory all-reduce for CPU
        # inference on first use (minutes); training never calls it.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    sys.addaudithook(record_writes)
    from moa.distributed import join_world

    join_world(cpu=True)  # as the first command would
    try:
        dist.all_reduce(torch.ones(1))
        mark(out, rank, "connected")
        run_scenarios(rank, out, SCENARIOS, RUNS)
    finally:
        dist.destroy_process_group()
    leave()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder of every scenario's results, from one run of the two workers."""
    out_dir = tmp_path_factory.mktemp("launched")
    (out_dir / "inputs").mkdir()
    write_inputs(out_dir / "inputs")
    return out_dir, launch(worker, out_dir, DEADLINE_S)


def results(runs, scenario: str) -> Path:
    return scenario_folder(runs, scenario)


def command(folder: Path, name: str, rank: int) -> tuple[int, str, str, list[str]]:
    """A command's exit status, stdout, stderr and (rank 1) writes on `rank`."""
    read = lambda suffix: (folder / f"{name}.rank{rank}.{suffix}").read_text()  # noqa: E731
    writes = [line for line in read("writes").splitlines() if line]
    return int(read("code")), read("out"), read("err"), writes


def succeeded(folder: Path, name: str) -> None:
    for rank in range(WORLD_SIZE):
        code, _, err, _ = command(folder, name, rank)
        assert code == 0, f"{name} on rank {rank} exited {code}:\n{err[-3000:]}"


def losses(out: Path) -> list[tuple[int, float]]:
    history = json.loads((out / "log_history.json").read_text())
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


def adapter_error(first: Path, second: Path) -> float:
    """The relative error between two saved adapters, over all their tensors as one vector."""
    a, b = load_file(first / "adapter_model.safetensors"), \
        load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    return relative_error(torch.cat([a[k].flatten() for k in sorted(a)]),
                          torch.cat([b[k].flatten() for k in sorted(b)]))


@pytest.fixture(scope="module")
def one_process(runs, tmp_path_factory) -> dict[str, Path]:
    """The same training in this one process: --batch-size 8 (the two processes' global
    batch) and --batch-size 4 (each process's)."""
    inputs = runs[0] / "inputs"
    folder = tmp_path_factory.mktemp("one-process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        found = {}
        for batch in (8, 4):
            options = TrainOptions(data=str(inputs / "train.jsonl"), epochs=1.0, lr=1e-2,
                                   batch_size=batch, save_interval=2, save_total_limit=5,
                                   out=str(folder / f"batch-{batch}"))
            run_train(options, log=lambda _: None, progress=False)
            found[f"batch-{batch}"] = folder / f"batch-{batch}"
    finally:
        torch.set_num_threads(threads)
    return found


# ---------------------------------------------------------------------------------------
# moa train
# ---------------------------------------------------------------------------------------

def test_two_processes_take_half_the_steps_of_one_and_train_what_one_trains_on_both_batches(
        runs, one_process):
    folder = results(runs, "ddp")
    succeeded(folder, "run")
    two = losses(folder / "run")
    assert [step for step, _ in two] == [1, 2, 3, 4]  # 32 records / (2 x 4) per step
    assert len(losses(one_process["batch-4"])) == 8  # one process at the same --batch-size
    # one process at the global batch: the same examples in each step, the same losses and
    # adapter (the loss normalised by the tokens of the global batch on both)
    one = losses(one_process["batch-8"])
    assert [step for step, _ in one] == [step for step, _ in two]
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two)) < 1e-5
    assert two[0][1] - two[-1][1] > 0.5  # the adapter moved: the comparison is not trivial
    assert adapter_error(folder / "run" / "adapter", one_process["batch-8"] / "adapter") < 1e-5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", ZERO3_CASE])
def test_rank_0_alone_prints_and_writes_the_outputs(runs, strategy):
    folder = results(runs, strategy)
    succeeded(folder, "run")
    _, out0, _, _ = command(folder, "run", 0)
    _, out1, err1, writes1 = command(folder, "run", 1)
    assert out0.count("done in") == 1 and out0.count("adapter saved to") == 1
    assert "2 processes (gloo" in out0 and HEADERS[strategy] in out0
    assert out1 == ""  # nothing on stdout, and no progress bar or loss lines on stderr
    assert "training" not in err1 and "loss" not in err1
    run = folder / "run"
    # rank 1 writes only its part of each checkpoint, in the staging folder rank 0 renames
    assert writes1, "the audit hook recorded nothing: it would miss writes too"
    outside = [path for path in writes1 if Path(path).is_relative_to(run) and
               not in_staging(Path(path).relative_to(run))]
    assert outside == []
    for name in ("adapter/adapter_model.safetensors", "log_history.json", "loss.png",
                 "train_options.json", "checkpoints/checkpoint-2", "checkpoints/checkpoint-4"):
        assert (run / name).exists(), name
    assert not list((run / "checkpoints").glob("_partial-*"))


def in_staging(path: Path) -> bool:
    """Whether `path` (relative to OUT) lies in a checkpoint's staging folder."""
    parts = path.parts
    return len(parts) >= 2 and parts[0] == "checkpoints" and \
        parts[1].startswith("_partial-checkpoint-")


def checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every file of a checkpoint, by file and key path."""
    found = {}

    def walk(value, path: str) -> None:
        if torch.is_tensor(value):
            found[path] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}/{key}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(item, f"{path}/{index}")

    for file in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        name = str(file.relative_to(checkpoint))
        if file.suffix == ".safetensors":
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    found[f"{name}/{key}"] = handle.get_tensor(key)
        elif file.suffix in (".pt", ".pth", ".bin"):
            # our test's own outputs; DeepSpeed's files need full unpickling
            walk(torch.load(file, map_location="cpu", weights_only=False), name)
    return found


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", ZERO3_CASE])
def test_checkpoints_hold_the_adapter_and_resume_state_but_no_base_weights(runs, strategy):
    folder = results(runs, strategy)
    base = build_text_model()
    frozen = {name: param.numel() for name, param in base.named_parameters()}
    adapter = load_file(folder / "run" / "adapter" / "adapter_model.safetensors")
    trainable = sum(t.numel() for t in adapter.values())
    assert sum(frozen.values()) > 4 * trainable  # a base in a checkpoint would show
    for step in (2, 4):
        checkpoint = folder / "run" / "checkpoints" / f"checkpoint-{step}"
        tensors = checkpoint_tensors(checkpoint)
        assert set(adapter) <= {key.split("/", 1)[1] for key in tensors
                                if key.startswith("adapter_model.safetensors/")}
        named_base = [key for key, tensor in tensors.items() if tensor.numel() > 0 and any(
            key.endswith(name) or key.endswith(name.replace("model.", "", 1))
            for name in frozen)]
        assert named_base == []
        # the adapter, and per trainable element the optimizer's two moments (and under
        # DeepSpeed its float32 copy): the base alone has more elements than all of it.
        # (Floating-point tensors: the RNG states are bytes.)
        total = sum(t.numel() for t in tensors.values() if t.is_floating_point())
        assert trainable * 3 <= total <= trainable * 4.2, (step, total, trainable)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", ZERO3_CASE])
def test_resume_last_continues_the_loss_curve_of_the_uninterrupted_run(runs, strategy):
    folder = results(runs, strategy)
    succeeded(folder, "resume")
    whole, resumed = losses(folder / "run"), losses(folder / "resumed")
    assert [step for step, _ in resumed] == [1, 2, 3, 4]  # the checkpoint's, then its own
    assert "resuming from" in command(folder, "resume", 0)[1]
    for (step, a), (_, b) in zip(whole, resumed):
        assert abs(a - b) <= 1e-6 * abs(a), (step, a, b)
    assert adapter_error(folder / "run" / "adapter", folder / "resumed" / "adapter") < 1e-6


@pytest.mark.parametrize("strategy", ["fsdp", ZERO3_CASE])
def test_sharded_training_trains_what_ddp_trains(runs, strategy):
    folder = results(runs, strategy)
    ddp = results(runs, "ddp")
    assert adapter_error(folder / "run" / "adapter", ddp / "run" / "adapter") < 1e-5
    for (step, a), (_, b) in zip(losses(folder / "run"), losses(ddp / "run")):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)


@pytest.mark.parametrize("strategy", ["fsdp", ZERO3_CASE])
def test_sharded_training_runs_with_bf16_and_activation_checkpointing(runs, strategy):
    folder = results(runs, strategy)
    succeeded(folder, "mixed")
    steps = losses(folder / "mixed")
    assert [step for step, _ in steps] == [1, 2]
    assert all(0 < loss < 20 for _, loss in steps)
    adapter = load_file(folder / "mixed" / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 and t.isfinite().all() for t in adapter.values())


def test_an_out_holding_another_run_is_refused_on_every_rank_with_one_line(runs):
    folder = results(runs, "ddp")
    lines = []
    for rank in range(WORLD_SIZE):
        code, out, err, _ = command(folder, "refused", rank)
        assert code == 1 and out == ""
        lines.append([line for line in err.splitlines() if line.startswith("moa: ")])
    assert lines[0] == lines[1] and len(lines[0]) == 1
    assert "holds another run" in lines[0][0] and "--resume last" in lines[0][0]


def test_a_checkpoint_that_rank_0_cannot_write_fails_the_run_on_every_rank(runs):
    folder = results(runs, "ddp")
    for rank in range(WORLD_SIZE):
        code, _, err, _ = command(folder, "disk-full", rank)
        lines = [line for line in err.splitlines() if line.startswith("moa: ")]
        assert code == 1 and len(lines) == 1, err[-2000:]
        assert lines[0].startswith("moa: error: cannot write the checkpoint of step 1 into ")
        assert lines[0].endswith("nothing of it was kept (the earlier checkpoints are as "
                                 "they were)")
        reason = "No space left on device" if rank == 0 else \
            "another process failed to write its part of it"
        assert reason in lines[0]
    assert list((folder / "disk-full" / "checkpoints").iterdir()) == []


def test_a_ddp_checkpoint_continues_in_one_process_at_the_same_global_batch(runs, tmp_path):
    folder = results(runs, "ddp")
    out = tmp_path / "one"
    shutil.copytree(folder / "run" / "checkpoints" / "checkpoint-2",
                    out / "checkpoints" / "checkpoint-2")
    options = TrainOptions(data=str(runs[0] / "inputs" / "train.jsonl"), epochs=1.0, lr=1e-2,
                           batch_size=8, save_interval=2, save_total_limit=5, out=str(out),
                           resume="last")
    run_train(options, log=lambda _: None, progress=False)
    whole, resumed = losses(folder / "run"), losses(out)
    assert [step for step, _ in resumed] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(whole, resumed):
        assert abs(a - b) <= 1e-5 * abs(a), (step, a, b)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
def test_a_deepspeed_checkpoint_of_two_processes_is_refused_in_one_before_the_model_loads(
        runs, tmp_path, capsys, monkeypatch):
    folder = results(runs, "zero3")
    monkeypatch.setattr("moa.cli.loading.load_base_model", lambda *a, **k: pytest.fail("loaded"))
    argv = ["train", "--data", str(runs[0] / "inputs" / "train.jsonl"), "--deepspeed",
            str(runs[0] / "inputs" / "zero3.json"), "--out", str(folder / "run"),
            "--resume", "last"]
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("moa: error: --resume ") and "\n" not in error
    assert "written by 2 process(es), this run has 1" in error and "launch 2" in error


@pytest.mark.parametrize("strategy,flag,message", [
    # a DDP checkpoint under --fsdp: optimizer.pt is not FSDP's optimizer state
    ("ddp", ["--fsdp"], "written without --fsdp or --deepspeed and this run is with --fsdp: "
                        "resume it without --fsdp or --deepspeed"),
    # an FSDP checkpoint without --fsdp
    ("fsdp", [], "written with --fsdp and this run is without --fsdp or --deepspeed: resume "
                 "it with --fsdp"),
])
def test_resuming_under_another_strategy_is_refused_naming_the_one_to_use(
        runs, strategy, flag, message, capsys, monkeypatch):
    folder = results(runs, strategy)
    monkeypatch.setattr("moa.cli.loading.load_base_model", lambda *a, **k: pytest.fail("loaded"))
    argv = ["train", "--data", str(runs[0] / "inputs" / "train.jsonl"), *flag,
            "--out", str(folder / "run"), "--resume", "last"]
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error


def test_fsdp_in_one_process_is_one_line_before_the_model_loads(tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setattr("moa.cli.loading.load_base_model", lambda *a, **k: pytest.fail("loaded"))
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    assert main(["train", "--data", str(data), "--fsdp", "--out", str(tmp_path / "o")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("moa: error: --fsdp shards the model over several processes")
    assert "torchrun --nproc-per-node" in error and "\n" not in error


def test_deepspeed_without_the_package_or_a_launcher_is_one_line(tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setattr("moa.cli.loading.load_base_model", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    config = tmp_path / "ds.json"
    config.write_text(json.dumps(ZERO3))
    argv = ["train", "--data", str(data), "--deepspeed", str(config), "--out",
            str(tmp_path / "o")]
    if HAS_DEEPSPEED:
        assert main(argv) == 1
        assert "--deepspeed needs a launcher" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    assert main(argv) == 1
    error = capsys.readouterr().err.strip()
    assert "the deepspeed package is not installed (pip install deepspeed)" in error
    assert "\n" not in error


# ---------------------------------------------------------------------------------------
# moa evaluate and moa compare
# ---------------------------------------------------------------------------------------

def test_evaluation_shared_by_two_processes_scores_what_one_process_scores(runs, tmp_path):
    folder = results(runs, "evaluate")
    succeeded(folder, "evaluate")
    adapter = runs[0] / "ddp" / "run" / "adapter"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run_evaluate(EvaluateOptions(
            data=str(runs[0] / "inputs" / "eval.jsonl"), adapter=str(adapter), batch_size=2,
            max_new_tokens=4, out=str(tmp_path / "alone.json")), log=lambda _: None,
            progress=False)
    finally:
        torch.set_num_threads(threads)
    shared = json.loads((folder / "results.json").read_text())
    assert shared["records"] == alone.records == 7
    assert set(shared["tasks"]) == {"multiple_choice", "arithmetic"}
    assert shared["accuracy"] == alone.accuracy
    assert shared["tasks"] == json.loads(json.dumps(alone.tasks))
    for mine, theirs in zip(shared["predictions"], alone.predictions):
        likelihoods = (mine.pop("log_likelihoods", None), theirs.get("log_likelihoods"))
        assert mine == {k: v for k, v in theirs.items() if k != "log_likelihoods"}
        if likelihoods[0] is not None:  # rounded to 4 digits; batches padded otherwise
            assert likelihoods[0] == pytest.approx(likelihoods[1], abs=2e-4)
    _, out1, _, writes1 = command(folder, "evaluate", 1)
    assert out1 == "" and [path for path in writes1 if Path(path).is_relative_to(folder)] == []
    assert command(folder, "evaluate", 0)[1].count("results written to") == 1


def test_compare_trains_each_run_data_parallel_and_rank_0_writes_the_results(runs):
    folder = results(runs, "compare")
    succeeded(folder, "compare")
    result = json.loads((folder / "dir" / "runs" / "soft_moa" / "seed-0.json").read_text())
    assert result["steps"] == 4 and result["examples"] == RECORDS  # 32 / (2 x 4)
    assert result["questions"] == 7 and len(result["correct"]) == 7
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (folder / "dir" / name).is_file()
    _, out1, _, writes1 = command(folder, "compare", 1)
    assert out1 == ""
    run_dir = folder / "dir" / "runs" / "soft_moa" / "seed-0"
    # The zero3 scenario ran before in these processes, and accelerate leaves
    # ACCELERATE_USE_DEEPSPEED=true in their environment: run_train puts it back, so this
    # run is not a DeepSpeed one (no global_stepN folder in its checkpoint).
    assert any("checkpoint-4" in path for path in writes1)  # the audit sees the checkpoint
    assert not any("global_step" in path for path in writes1), writes1
    assert all(Path(path).is_relative_to(run_dir) and
               in_staging(Path(path).relative_to(run_dir))
               for path in writes1 if Path(path).is_relative_to(folder / "dir")), writes1


# ---------------------------------------------------------------------------------------
# the real launcher
# ---------------------------------------------------------------------------------------

def test_moa_train_through_torchrun_trains_data_parallel_and_rank_0_speaks(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    write_inputs(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[3])}
    if loopback_interface() is not None:
        env["GLOO_SOCKET_IFNAME"] = loopback_interface()
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "moa",
            "train", "--data", str(tmp_path / "train.jsonl"), *TRAIN, "--out", str(out)]
    launcher = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, 9)  # torchrun and its workers: a session of their own
        launcher.communicate()
        pytest.fail(f"torchrun did not finish within {DEADLINE_S} s")
    assert launcher.returncode == 0, stderr[-3000:]
    assert [step for step, _ in losses(out)] == [1, 2, 3, 4]
    for line in ("done in", "adapter saved to", "trainable params", "2 processes (gloo"):
        assert stdout.count(line) == 1, (line, stdout)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
