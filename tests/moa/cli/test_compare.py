"""`moa compare` (its statistics: test_statistics.py): a run's results and summary (the
same losses as `moa train`, the same scores as `moa evaluate`), resuming after an
interruption, a failed run that the others survive and a rerun retries, refusing a rerun
with other options, the router statistics, the peak memory, and bad input as one line
before any model loads."""

import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import moa.cli.compare as compare
import moa.cli.compare_runs as compare_runs
import moa.cli.loading
from moa import MoAConfig, get_moa_model
from moa.cli import build_parser, main
from moa.cli.compare import plan_compare, run_compare
from moa.cli.compare_options import CompareOptions
from moa.cli.compare_runs import PeakMemory, RunLock, router_statistics
from moa.cli.compare_summary import format_table, routing_summary
from moa.cli.compare_variants import peft_lora_config, peft_lora_model
from moa.cli.evaluate import EvaluateOptions, run_evaluate
from moa.cli.loading import build_text_model, byte_tokenizer
from moa.cli.train import TrainingInterrupted, TrainOptions, run_train
from tests.moa.tiny import perturb

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[3]


COLOURS = [("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"),
           ("blood", "red"), ("the sun", "yellow")]


def write_records(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture
def data(tmp_path) -> tuple[str, str]:
    """(training file, test file): colour questions with three choices."""
    records = [{"question": f"What colour is {thing}?", "choices": ["purple", colour, "grey"],
                "answer": 1} for thing, colour in COLOURS]
    return (write_records(tmp_path / "train.jsonl", records),
            write_records(tmp_path / "test.jsonl", records[:4]))


def options(data, out, **overrides) -> CompareOptions:
    values = dict(data=data[0], eval_data=data[1], out=str(out), steps=2, batch_size=4,
                  lr={"*": 1e-2}, seeds=1)
    values.update(overrides)
    return CompareOptions(**values)


def quiet(opts: CompareOptions):
    return run_compare(opts, log=lambda _: None, progress=False)


def counting_run_train(monkeypatch, fail=None) -> list[TrainOptions]:
    """Replace compare's run_train by one that records its options and, where fail(options,
    call number) raises, raises."""
    calls = []

    def wrapped(train_options, *args, **kwargs):
        calls.append(train_options)
        if fail is not None:
            fail(train_options, len(calls))
        return run_train(train_options, *args, **kwargs)

    monkeypatch.setattr(compare, "run_train", wrapped)
    return calls


# ---- measuring -----------------------------------------------------------------------------

@pytest.mark.parametrize("preset", [
    "soft_moa",  # layer routers, soft: every expert on every token
    "topk_moelora",  # a router per module, top-2: active fractions 2/8
])
def test_router_statistics_are_the_token_weighted_mean_over_the_prompts(preset):
    tokenizer = byte_tokenizer()
    model = get_moa_model(build_text_model(), MoAConfig.preset(preset))
    perturb(model, scale=0.5)
    model.eval()
    prompts = ["Question: What colour is snow?\nAnswer:", "Hi", "Question: coal?\nAnswer:"]
    expected = {}
    with torch.no_grad():
        for prompt in prompts:
            model(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]]))
            for name, entry in model.router_stats().items():
                total = expected.setdefault(name, [0, 0.0, 0.0])
                total[0] += entry["tokens"]
                total[1] += entry["tokens"] * np.asarray(entry["mean_gate"])
                total[2] += entry["tokens"] * np.asarray(entry["active_fraction"])
    stats = router_statistics(model, tokenizer, prompts, max_length=512)
    assert stats.keys() == expected.keys() and stats
    for name, (tokens, gates, active) in expected.items():
        assert stats[name]["tokens"] == tokens == sum(len(p) for p in prompts)
        np.testing.assert_allclose(stats[name]["mean_gate"], gates / tokens, atol=1e-6)
        np.testing.assert_allclose(stats[name]["active_fraction"], active / tokens, atol=1e-6)
    if preset == "topk_moelora":
        assert all(np.isclose(sum(s["active_fraction"]), 2) for s in stats.values())
    # a mixture without routers has no statistics
    lora = get_moa_model(build_text_model(), MoAConfig.preset("lora"))
    assert router_statistics(lora, tokenizer, prompts, max_length=512) == {}


def test_peft_lora_trains_over_a_gguf_base_whose_weights_were_dequantized_at_load():
    # transformers' GGUF loader leaves its quantizer (is_trainable False) on a model whose
    # weights it dequantized to float; the Trainer's check then refused PEFT's LoRA on it
    from peft import get_peft_model
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
    from transformers.trainer_utils import validate_quantization_for_training
    from transformers.utils.quantization_config import GgufConfig

    def gguf_loaded():
        base = build_text_model()
        quantizer = GgufHfQuantizer(GgufConfig())
        base.hf_quantizer, base.is_quantized = quantizer, True
        base.quantization_method = quantizer.quantization_config.quant_method
        base.config.quantization_config = quantizer.quantization_config
        return base

    with pytest.raises(ValueError, match="do not support training"):
        validate_quantization_for_training(get_peft_model(gguf_loaded(),
                                                          peft_lora_config()))
    model = peft_lora_model(gguf_loaded())
    validate_quantization_for_training(model)
    assert not model.get_base_model().is_quantized
    assert not hasattr(model.get_base_model().config, "quantization_config")


@pytest.mark.parametrize("high_water_mark", [
    pytest.param(True, id="linux-high-water-mark"),  # exact: the kernel's VmHWM, reset
    pytest.param(False, id="sampled-fallback"),  # no /proc: RSS sampled by a thread
])
def test_peak_memory_on_the_cpu_sees_an_allocation_inside_the_block(high_water_mark,
                                                                    monkeypatch):
    if high_water_mark and not PeakMemory._can_reset_high_water_mark():
        pytest.skip("no resettable VmHWM here (not Linux, or /proc/self/clear_refs refused)")
    if not high_water_mark:
        monkeypatch.setattr(PeakMemory, "_can_reset_high_water_mark", classmethod(
            lambda cls: False))
    block = torch.ones(300 * 2**20 // 4)  # a peak before the blocks must not count
    del block
    with PeakMemory(torch.device("cpu")) as before:
        time.sleep(0.15)
    with PeakMemory(torch.device("cpu")) as during:
        block = torch.ones(200 * 2**20 // 4)  # 200 MiB, touched
        time.sleep(0.15 if high_water_mark else 1.0)  # the sampler needs the time
        del block
    assert during.high_water_mark is high_water_mark
    assert "resident set size" in during.kind
    assert during.peak_mb > before.peak_mb + 150
    assert before.peak_mb < during.peak_mb < before.peak_mb + 300


def test_peak_memory_on_the_cpu_leaves_out_memory_freed_before_the_block():
    if not PeakMemory._can_reset_high_water_mark():
        pytest.skip("no resettable VmHWM here (not Linux, or /proc/self/clear_refs refused)")

    def resident_mb() -> float:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmRSS:"))) / 1024

    before = resident_mb()
    pieces = [torch.ones(16384) for _ in range(2000)]  # 125 MiB in 64 KiB heap blocks
    pinned = torch.ones(16384)  # allocated after them: the heap cannot shrink past it
    del pieces
    gc.collect()
    retained = resident_mb()
    if retained < before + 80:
        pytest.skip("this C library handed the freed blocks back by itself")
    with PeakMemory(torch.device("cpu")) as block:
        pass
    assert block.peak_mb < retained - 80  # the freed 125 MiB did not count
    del pinned


# ---- runs ----------------------------------------------------------------------------------

def test_routing_summary_counts_collapsed_routers_and_the_active_fraction():
    # Found on real data (ARC-Challenge, MoLoRA seed 0): a few softmax routers in the last
    # layers put 0.97-0.99 of their gate on one expert, which the table did not show.
    stats = {
        "collapsed": {"experts": ["a", "b", "c"], "mean_gate": [0.95, 0.03, 0.02],
                      "active_fraction": [1.0, 1.0, 1.0]},
        "even": {"experts": ["a", "b"], "mean_gate": [0.5, 0.5],
                 "active_fraction": [0.5, 0.25]},  # sparse: experts skipped
        "one expert": {"experts": ["a"], "mean_gate": [0.8],  # cannot collapse: not counted
                       "active_fraction": [1.0]},
        "silent": {"experts": ["a", "b"], "mean_gate": [0.0, 0.0],  # no gate mass: no share
                   "active_fraction": [0.0, 0.0]},
    }
    diverged = {"experts": ["a", "b"], "mean_gate": [float("nan"), 0.5],  # not "silent"
                "active_fraction": [1.0, 1.0]}
    assert routing_summary({"r": diverged}) == {
        "routers": 1, "collapsed": 0, "silent": 0, "non_finite": 1, "largest_share": None,
        "active_fraction_mean": 1.0, "active_fraction_min": 1.0}
    routing = routing_summary(stats)
    assert routing == {"routers": 3, "collapsed": 1, "silent": 1, "non_finite": 0,
                       "largest_share": pytest.approx(0.95),
                       "active_fraction_mean": pytest.approx(4.75 / 8),
                       "active_fraction_min": 0.0}
    assert routing_summary({}) is None and routing_summary(None) is None
    edge = routing_summary({"r": {"experts": ["a", "b"], "mean_gate": [0.9, 0.1],
                                  "active_fraction": [1.0, 1.0]}})
    assert edge["collapsed"] == 1  # a share of exactly COLLAPSE_SHARE counts
    row = {"name": "molora", "trainable_params": 10, "accuracy_mean": 0.5,
           "accuracy_ci95": [0.4, 0.6], "accuracy_norm_mean": None,
           "seconds_per_step_median": 1.0, "peak_memory_mb_max": 100.0, "paired": None,
           "seeds_finished": [0], "routing": {"routers": 3, "collapsed_max": 1,
                                              "silent_max": 1, "non_finite_max": 0,
                                              "largest_share": 0.95,
                                              "active_fraction_mean": 0.59375,
                                              "active_fraction_min": 0.0}}
    table = format_table({"reference": "molora", "base": None, "seeds": 1, "variants": [row]})
    assert "| collapsed routers | active |" in table and "| 1/3 | 0.594 | 1/1 |" in table


def test_a_comparison_writes_each_run_and_the_summary_as_moa_train_and_evaluate_would(
        data, tmp_path):
    out = tmp_path / "out"
    result = quiet(options(data, out, variants=["soft_moa", "peft_lora"], seeds=2,
                           lr={"soft_moa": 1e-2, "peft_lora": 5e-3}, keep_adapters=True))
    assert result.failed == []
    summary = json.loads((out / "compare.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    assert summary["reference"] == "soft_moa" and summary["test_questions"] == 4
    assert "two-level percentile bootstrap" in summary["ci_method"]
    assert summary["peak_memory"].startswith("cpu: peak resident set size")
    base = json.loads((out / "runs" / "base.json").read_text())
    assert summary["base"] == {"name": "base", "trainable_params": 0,
                               "accuracy": base["accuracy"],
                               "accuracy_ci95": summary["base"]["accuracy_ci95"],
                               "accuracy_norm": base["accuracy_norm"]}
    low, high = summary["base"]["accuracy_ci95"]
    assert low <= base["accuracy"] <= high and len(base["correct"]) == 4
    rows = {row["name"]: row for row in summary["variants"]}
    assert list(rows) == ["soft_moa", "peft_lora"]
    for name, row in rows.items():
        runs = [json.loads((out / "runs" / name / f"seed-{s}.json").read_text())
                for s in (0, 1)]
        for seed, run in enumerate(runs):
            assert run["seed"] == seed and len(run["correct"]) == 4
            assert run["accuracy"] == run["correct"].count("1") / 4
            assert run["accuracy_norm"] == run["correct_norm"].count("1") / 4
            assert [step for step, _ in run["losses"]] == [1, 2]
            assert run["peak_memory_mb"] > 0 and run["seconds_per_step"] > 0
            assert (out / "runs" / name / f"seed-{seed}" / "adapter").is_dir()
            assert sorted(p.name for p in (out / "runs" / name / f"seed-{seed}").iterdir()) \
                == ["adapter"]  # checkpoints, logs and plots go
        assert row["trainable_params"] == runs[0]["trainable_params"] > 0
        assert row["lr"] == {"soft_moa": 1e-2, "peft_lora": 5e-3}[name]
        assert row["accuracy_mean"] == pytest.approx(np.mean([r["accuracy"] for r in runs]))
        low, high = row["accuracy_ci95"]
        assert low <= row["accuracy_mean"] <= high
        assert row["seeds_finished"] == [0, 1]
        assert [r["seed"] for r in row["runs"]] == [0, 1]
        assert set(row["runs"][0]) == {"seed", "accuracy", "accuracy_norm", "train_seconds",
                                       "seconds_per_step", "peak_memory_mb", "steps",
                                       "routing"}
    assert rows["soft_moa"]["paired"] is None
    paired = rows["peft_lora"]["paired"]
    assert paired["reference"] == "soft_moa" and paired["seeds"] == [0, 1]
    assert paired["difference"] == pytest.approx(rows["peft_lora"]["accuracy_mean"]
                                                 - rows["soft_moa"]["accuracy_mean"])
    assert paired["difference_ci95"][0] <= paired["difference"] <= paired["difference_ci95"][1]
    soft = json.loads((out / "runs" / "soft_moa" / "seed-1.json").read_text())
    assert soft["router_stats"] and all(
        len(entry["mean_gate"]) == len(entry["experts"]) == len(entry["active_fraction"])
        for entry in soft["router_stats"].values())
    assert json.loads((out / "runs" / "peft_lora" / "seed-0.json").read_text())[
        "router_stats"] == {}
    assert rows["peft_lora"]["routing"] is None
    assert [r["routing"] for r in rows["soft_moa"]["runs"]] == [
        routing_summary(json.loads((out / "runs" / "soft_moa" / f"seed-{s}.json").read_text())[
            "router_stats"]) for s in (0, 1)]
    assert rows["soft_moa"]["routing"]["active_fraction_mean"] == 1.0  # soft: all run
    table = (out / "compare.md").read_text()
    assert "| base (no adapter) | 0 |" in table and "| peft_lora |" in table
    assert (out / "compare.png").stat().st_size > 0

    # the same losses as `moa train` with that seed, the same scores as `moa evaluate`
    trained = run_train(TrainOptions(data=data[0], out=str(tmp_path / "train"), steps=2,
                                     batch_size=4, lr=1e-2, seed=1, preset="soft_moa"),
                        log=lambda _: None, progress=False)
    assert [list(point) for point in trained.losses] == soft["losses"]
    evaluated = run_evaluate(EvaluateOptions(
        data=data[1], adapter=str(out / "runs" / "soft_moa" / "seed-1" / "adapter"),
        out=str(tmp_path / "eval.json")), log=lambda _: None, progress=False)
    assert "".join("1" if p["correct"] else "0" for p in evaluated.predictions) == \
        soft["correct"]


def test_an_interrupted_comparison_continues_with_the_runs_not_finished(data, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "out"

    def interrupt_the_second(train_options, call):
        if call == 2:  # as if Ctrl-C came mid-run: the run's folder is half written
            Path(train_options.out).mkdir(parents=True)
            (Path(train_options.out) / "train_options.json").write_text("{}")
            raise KeyboardInterrupt

    calls = counting_run_train(monkeypatch, interrupt_the_second)
    with pytest.raises(KeyboardInterrupt):
        quiet(options(data, out, variants=["lora"], seeds=2))
    first = (out / "runs" / "lora" / "seed-0.json").read_bytes()
    assert not (out / "runs" / "lora" / "seed-1.json").exists()
    assert [c.seed for c in calls] == [0, 1]

    scored = []
    monkeypatch.setattr(compare, "_score_base",
                        lambda *args: scored.append(1) or pytest.fail("base scored twice"))
    calls = counting_run_train(monkeypatch)
    result = quiet(options(data, out, variants=["lora"], seeds=2))
    assert [c.seed for c in calls] == [1] and not scored  # only the unfinished run
    assert (out / "runs" / "lora" / "seed-0.json").read_bytes() == first
    assert result.failed == [] and result.summary["variants"][0]["seeds_finished"] == [0, 1]
    assert not (out / "runs" / "lora" / "seed-1").exists()

    calls = counting_run_train(monkeypatch)  # a third time: nothing left to run
    assert quiet(options(data, out, variants=["lora"], seeds=2)).failed == []
    assert calls == []


def test_a_run_another_process_is_making_is_left_to_it_and_its_folder_untouched(
        data, tmp_path, monkeypatch):
    # another `moa compare` on the same DIR holds soft_moa seed 0's lock (another open file
    # description: flock conflicts as between processes) and is writing its folder
    out = tmp_path / "out"
    quiet(options(data, out, variants=["lora"]))  # DIR made, base scored
    lock, holder = RunLock.acquire(out / "runs" / "soft_moa" / "seed-0.lock")
    assert lock is not None and holder == ""
    in_progress = out / "runs" / "soft_moa" / "seed-0" / "checkpoints" / "step-1"
    in_progress.mkdir(parents=True)
    calls, lines = counting_run_train(monkeypatch), []
    result = run_compare(options(data, out, variants=["soft_moa", "lora"]), log=lines.append,
                         progress=False)
    assert calls == [] and result.failed == []  # lora seed 0 was finished already
    assert in_progress.is_dir(), "the other process's run folder was removed"
    assert not (out / "runs" / "soft_moa" / "seed-0.json").exists()
    said = "\n".join(lines)
    assert f"soft_moa seed 0: made by another moa compare (moa compare pid {os.getpid()}" in said
    assert "1 run(s) left to other moa compare processes" in said
    assert result.summary["variants"][0]["seeds_finished"] == []
    _, held_by = RunLock.acquire(out / "runs" / "soft_moa" / "seed-0.lock")
    assert held_by.startswith(f"moa compare pid {os.getpid()} on ")

    lock.release()  # the other process ended (a crash drops its lock just the same)
    calls = counting_run_train(monkeypatch)
    result = quiet(options(data, out, variants=["soft_moa", "lora"]))
    assert [(c.preset, c.seed) for c in calls] == [("soft_moa", 0)] and result.failed == []
    assert result.summary["variants"][0]["seeds_finished"] == [0]


def test_runs_other_processes_finished_meanwhile_are_summarised_not_reported_as_left(
        data, tmp_path, monkeypatch):
    # (the last line named every run another process had held, finished or not, and asked
    # for a rerun to summarise results the summary already held)
    import shutil

    other = tmp_path / "other"
    quiet(options(data, other, variants=["soft_moa"]))  # what the other process will write
    out = tmp_path / "out"
    shutil.copytree(other, out)
    result_path = out / "runs" / "soft_moa" / "seed-0.json"
    result_path.unlink()
    lock, _ = RunLock.acquire(out / "runs" / "soft_moa" / "seed-0.lock")

    def the_other_finishes(train_options, call):  # while this process trains lora seed 0
        shutil.copyfile(other / "runs" / "soft_moa" / "seed-0.json", result_path)
        lock.release()

    calls, lines = counting_run_train(monkeypatch, the_other_finishes), []
    result = run_compare(options(data, out, variants=["soft_moa", "lora"]), log=lines.append,
                         progress=False)
    said = "\n".join(lines)
    assert [(c.preset, c.seed) for c in calls] == [("lora", 0)] and result.failed == []
    assert "soft_moa seed 0: made by another moa compare" in said
    assert "left to other moa compare processes" not in said
    assert [v["seeds_finished"] for v in result.summary["variants"]] == [[0], [0]]


def test_a_file_system_without_locks_grants_every_lock(tmp_path, monkeypatch):
    # some network file systems refuse flock (ENOLCK): then one process per folder, as
    # before locks, instead of a crash
    import errno
    import fcntl

    def refuse(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    lock, holder = RunLock.acquire(tmp_path / "runs" / "lora" / "seed-0.lock")
    assert lock is not None and holder == ""
    lock.release()


def test_other_options_are_refused_while_another_process_makes_a_run(data, tmp_path):
    # nothing finished yet, but another process is making lora seed 0 under the stored
    # options: a comparison with other options on the same DIR would mix the two
    out = tmp_path / "out"
    plan_compare(options(data, out, variants=["lora"]))
    lock, _ = RunLock.acquire(out / "runs" / "lora" / "seed-0.lock")
    try:
        with pytest.raises(ValueError, match=r"other options \(finished, or being made by "
                                             r"another process\): steps \(2 there, 3 here\)"):
            plan_compare(options(data, out, variants=["lora"], steps=3))
    finally:
        lock.release()
    plan_compare(options(data, out, variants=["lora"], steps=3))  # nothing depends on them


def test_a_lock_file_of_another_user_is_locked_read_only(tmp_path, monkeypatch):
    # another user's lock file (mode 0644 in a shared folder) cannot be opened for writing
    import moa.cli.compare_runs as compare_runs

    path = tmp_path / "runs" / "lora" / "seed-0.lock"
    path.parent.mkdir(parents=True)
    path.write_text("moa compare pid 1 on elsewhere since 2026-01-01 00:00:00\n")

    def open_as_another_user(file, mode="r", **kwargs):
        if "r" not in mode or "+" in mode:
            raise PermissionError(13, "Permission denied", str(file))
        return open(file, mode, **kwargs)

    monkeypatch.setattr(compare_runs, "open", open_as_another_user, raising=False)
    lock, holder = RunLock.acquire(path)
    assert lock is not None and holder == ""
    assert RunLock.held(path)  # this process holds it: to another file description, held
    lock.release()
    assert not RunLock.held(path)


def test_a_run_finished_by_another_process_meanwhile_is_not_made_again(data, tmp_path,
                                                                       monkeypatch):
    # this process saw lora seed 1 unfinished at its start; by the time it takes the run's
    # lock, another process has finished it (its result is there)
    out = tmp_path / "out"
    quiet(options(data, out, variants=["lora"]))
    acquire = RunLock.acquire

    def finished_meanwhile(path, wait=False, shared=False):
        if path.name == "seed-1.lock":
            (path.parent / "seed-1.json").write_bytes(
                (path.parent / "seed-0.json").read_bytes())
        return acquire(path, wait, shared)

    monkeypatch.setattr(RunLock, "acquire", staticmethod(finished_meanwhile))
    calls = counting_run_train(monkeypatch)
    result = quiet(options(data, out, variants=["lora"], seeds=2))
    assert calls == [] and result.failed == []
    assert result.summary["variants"][0]["seeds_finished"] == [0, 1]


def test_two_comparisons_on_one_folder_share_the_runs(data, tmp_path):
    # the same command started twice at once: every run made once, by one of the two
    out = tmp_path / "out"
    command = [sys.executable, "-m", "moa", "compare", "--data", data[0], "--eval-data",
               data[1], "--variants", "lora,soft_moa", "--seeds", "2", "--steps", "2",
               "--batch-size", "4", "--lr", "1e-2", "--out", str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=environment, cwd=tmp_path) for _ in range(2)]
    logs = []
    try:
        for worker in workers:
            logs.append(worker.communicate(timeout=300)[0])
    finally:
        for worker in workers:
            worker.kill()
    assert [worker.returncode for worker in workers] == [0, 0], logs
    made = [line.split(":")[0] for log in logs for line in log.splitlines()
            if ": accuracy " in line]
    assert sorted(made) == ["lora seed 0", "lora seed 1", "soft_moa seed 0",
                            "soft_moa seed 1"], logs
    for variant in ("lora", "soft_moa"):
        for seed in (0, 1):
            assert json.loads((out / "runs" / variant / f"seed-{seed}.json").read_text())[
                "seed"] == seed


def test_summary_only_summarizes_the_finished_runs_and_trains_nothing(data, tmp_path,
                                                                     monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="holds no comparison to summarize"):
        quiet(options(data, out, variants=["lora"], summary_only=True))
    assert not out.exists()
    quiet(options(data, out, variants=["lora"]))  # the base and lora seed 0 finished
    (out / "compare.json").unlink()

    calls = counting_run_train(monkeypatch)

    def no_model(*args, **kwargs):
        raise AssertionError("--summary-only loaded a model")

    monkeypatch.setattr(moa.cli.loading, "load_base_model", no_model)
    lines = []
    result = run_compare(options(data, out, variants=["lora", "hydralora"], seeds=2,
                                 summary_only=True), log=lines.append, progress=False)
    assert calls == [] and result.failed == []
    rows = {row["name"]: row for row in result.summary["variants"]}
    assert rows["lora"]["seeds_finished"] == [0] and rows["hydralora"]["seeds_finished"] == []
    assert rows["lora"]["accuracy_mean"] is not None and rows["hydralora"]["runs"] == []
    assert json.loads((out / "compare.json").read_text()) == \
        json.loads(json.dumps(result.summary))
    assert any("2 of 5 runs" in line and "nothing was trained" in line for line in lines)
    assert sorted(p.name for p in (out / "runs").glob("*/seed-*.json")) == ["seed-0.json"]


def test_runs_go_seed_by_seed_so_a_cut_comparison_has_every_variant(data, tmp_path,
                                                                    monkeypatch):
    calls = counting_run_train(monkeypatch)
    assert main(["compare", "--data", data[0], "--eval-data", data[1], "--variants",
                 "lora,hydralora", "--seeds", "2", "--steps", "1", "--batch-size", "4",
                 "--out", str(tmp_path / "out")]) == 0
    assert [(c.preset, c.seed) for c in calls] == [("lora", 0), ("hydralora", 0),
                                                   ("lora", 1), ("hydralora", 1)]


def test_a_failed_run_is_reported_the_others_finish_and_a_rerun_retries_it(
        data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"

    def fail_hydralora(train_options, call):
        if train_options.preset == "hydralora":
            raise RuntimeError("the router exploded\nsecond line")

    argv = ["compare", "--data", data[0], "--eval-data", data[1], "--variants",
            "lora,hydralora", "--seeds", "1", "--steps", "2", "--batch-size", "4", "--out",
            str(out)]
    calls = counting_run_train(monkeypatch, fail_hydralora)
    assert main(argv) == 1
    assert [c.preset for c in calls] == ["lora", "hydralora"]
    output = capsys.readouterr()
    assert "1 run(s) failed: hydralora seed 0" in output.out
    error = (out / "runs" / "hydralora" / "seed-0.error.txt").read_text()
    assert error.startswith("RuntimeError: the router exploded\n\nTraceback")
    assert not (out / "runs" / "hydralora" / "seed-0.json").exists()
    assert (out / "runs" / "lora" / "seed-0.json").is_file()
    rows = json.loads((out / "compare.json").read_text())["variants"]
    assert rows[1]["name"] == "hydralora" and rows[1]["seeds_finished"] == [] and \
        rows[1]["accuracy_mean"] is None

    calls = counting_run_train(monkeypatch)
    assert main(argv) == 0
    assert [c.preset for c in calls] == ["hydralora"]
    assert (out / "runs" / "hydralora" / "seed-0.json").is_file()
    assert not (out / "runs" / "hydralora" / "seed-0.error.txt").exists()


# ---- rerunning with other options ----------------------------------------------------------

def finish(out: Path, variant: str) -> None:
    """Mark a run of `variant` finished (the refusals look at which results are there)."""
    (out / "runs" / variant).mkdir(parents=True, exist_ok=True)
    (out / "runs" / variant / "seed-0.json").write_text("{}")


def test_a_rerun_with_other_options_is_refused_naming_them(data, tmp_path):
    out = tmp_path / "out"
    # before any result is there, other options replace the stored ones
    plan_compare(options(data, out, variants=["lora"], lr={"*": 1e-3}, steps=5))
    plan_compare(options(data, out, variants=["lora"], lr={"*": 1e-3}))
    assert json.loads((out / "compare_options.json").read_text())["options"]["steps"] == 2
    finish(out, "lora")
    with pytest.raises(ValueError, match=r"steps \(2 there, 3 here\)"):
        plan_compare(options(data, out, variants=["lora"], lr={"*": 1e-3}, steps=3))
    with pytest.raises(ValueError, match=r"lr of lora \(0.001 there, 0.002 here\)"):
        plan_compare(options(data, out, variants=["lora"], lr={"*": 2e-3}))
    Path(data[1]).write_text(Path(data[1]).read_text().replace("grey", "gray"))
    with pytest.raises(ValueError, match="the content of --eval-data"):
        plan_compare(options(data, out, variants=["lora"], lr={"*": 1e-3}))
    Path(data[1]).write_text(Path(data[1]).read_text().replace("gray", "grey"))
    # adding variants and seeds is allowed, and the new variant is then part of the run
    plan_compare(options(data, out, variants=["lora", "molora"], lr={"*": 1e-3}, seeds=3))
    stored = json.loads((out / "compare_options.json").read_text())
    assert list(stored["variants"]) == ["lora", "molora"]
    plan_compare(options(data, out, variants=["molora"], lr={"*": 5e-3}))  # nothing finished
    plan_compare(options(data, out, variants=["molora"], lr={"*": 1e-3}))
    finish(out, "molora")
    with pytest.raises(ValueError, match=r"lr of molora \(0.001 there, 0.005 here\)"):
        plan_compare(options(data, out, variants=["molora"], lr={"*": 5e-3}))
    # a MoAConfig file of the same name whose content changed
    config = tmp_path / "mine.json"
    config.write_text(MoAConfig.preset("lora", experts=["lora:4"]).to_json_string())
    plan_compare(options(data, out, variants=[str(config)], lr={"*": 1e-3}))
    finish(out, "mine")
    config.write_text(MoAConfig.preset("lora", experts=["lora:2"]).to_json_string())
    with pytest.raises(ValueError, match="the definition of mine"):
        plan_compare(options(data, out, variants=[str(config)], lr={"*": 1e-3}))


def test_epochs_bind_a_rerun_only_where_they_give_the_length(data, tmp_path):
    out = tmp_path / "out"
    plan_compare(options(data, out, variants=["lora"], lr={"*": 1e-3}, steps=2, epochs=1.0))
    finish(out, "lora")
    # --steps gives both runs' length, so --epochs changes nothing that was trained
    plan_compare(options(data, out, variants=["lora"], lr={"*": 1e-3}, steps=2, epochs=3.0))
    with pytest.raises(ValueError, match=r"steps \(2 there, none here\); epochs \(3.0 there, "
                                         r"2.0 here\)"):
        plan_compare(options(data, out, variants=["lora"], lr={"*": 1e-3}, steps=None,
                             epochs=2.0))


def test_a_copy_of_the_model_elsewhere_continues_a_comparison_another_model_does_not(
        data, tmp_path):
    model_dir, copied, other = (tmp_path / name for name in ("model", "copy", "other"))
    build_text_model().save_pretrained(model_dir)
    shutil.copytree(model_dir, copied)
    other_model = build_text_model()  # the same architecture, other weights
    with torch.no_grad():
        for parameter in other_model.parameters():
            parameter.add_(torch.randn_like(parameter))
    other_model.save_pretrained(other)
    out = tmp_path / "out"
    plan_compare(options(data, out, variants=["lora"], model=str(model_dir)))
    finish(out, "lora")
    plan_compare(options(data, out, variants=["lora"], model=str(copied)))
    refusal = (rf"the model \({re.escape(str(copied.resolve()))} there, "
               rf"{re.escape(str(other.resolve()))} here, with other content\)")
    with pytest.raises(ValueError, match=refusal):
        plan_compare(options(data, out, variants=["lora"], model=str(other)))
    with pytest.raises(ValueError, match=r"the model \(.* there, the embedded text model here"):
        plan_compare(options(data, out, variants=["lora"]))
    # a DIR written before fingerprints were stored: the model's path decides, as it did
    stored = json.loads((out / "compare_options.json").read_text())
    del stored["options"]["model_fingerprint"]
    (out / "compare_options.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=rf"model \({re.escape(str(copied.resolve()))} there, "
                                         rf"{re.escape(str(model_dir.resolve()))} here\)"):
        plan_compare(options(data, out, variants=["lora"], model=str(model_dir)))
    plan_compare(options(data, out, variants=["lora"], model=str(copied)))
    stored = json.loads((out / "compare_options.json").read_text())
    assert stored["options"]["model_fingerprint"] == compare.model_fingerprint(model_dir)


def test_the_model_fingerprint_sees_content_size_and_names_not_the_path(tmp_path):
    single = tmp_path / "a.gguf"
    single.write_bytes(os.urandom(5 << 20))
    moved = tmp_path / "elsewhere" / "renamed.gguf"
    moved.parent.mkdir()
    shutil.copyfile(single, moved)
    assert compare.model_fingerprint(moved) == compare.model_fingerprint(single)
    assert compare.model_fingerprint(None) is None
    for position in (0, (5 << 20) - 1):  # a byte in the first and in the last MiB
        changed = bytearray(single.read_bytes())
        changed[position] ^= 1
        moved.write_bytes(bytes(changed))
        assert compare.model_fingerprint(moved) != compare.model_fingerprint(single)
    moved.write_bytes(single.read_bytes() + b"\0")  # one byte longer
    assert compare.model_fingerprint(moved) != compare.model_fingerprint(single)
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copyfile(single, folder / "weights.bin")
    renamed = tmp_path / "folder2"
    renamed.mkdir()
    shutil.copyfile(single, renamed / "other.bin")  # same bytes under another file name
    assert compare.model_fingerprint(renamed) != compare.model_fingerprint(folder)


def test_a_comparison_running_elsewhere_makes_every_stored_option_binding(data, tmp_path):
    # another process is comparing in DIR (its shared lock on compare.active) and has not
    # started a run yet: a second one with another rate would have mixed rates in one row
    out = tmp_path / "out"
    plan_compare(options(data, out, variants=["lora"], lr={"*": 3e-4}))
    compare._done_comparing(out)
    other, _ = RunLock.acquire(out / compare.ACTIVE_LOCK, shared=True)
    try:
        with pytest.raises(ValueError, match=r"lr of lora \(0.0003 there, 0.01 here\)"):
            plan_compare(options(data, out, variants=["lora"], lr={"*": 1e-2}))
        plan_compare(options(data, out, variants=["lora", "molora"], lr={"*": 3e-4}))
    finally:
        other.release()
        compare._done_comparing(out)
    plan_compare(options(data, out, variants=["lora"], lr={"*": 1e-2}))  # nothing depends


def test_inputs_edited_mid_comparison_do_not_mix_into_its_runs(data, tmp_path, monkeypatch):
    # a variant's config file edited after the first run: every seed still gets the adapter
    # the plan read; the data file edited: the comparison stops, naming it
    config = tmp_path / "mine.json"
    config.write_text(MoAConfig.preset("lora", experts=["lora:4"]).to_json_string())
    out = tmp_path / "out"

    def edit_the_config(train_options, call):
        if call == 2:  # after seed 0's run, before seed 1's
            config.write_text(MoAConfig.preset("lora", experts=["lora:32"]).to_json_string())

    counting_run_train(monkeypatch, edit_the_config)
    result = quiet(options(data, out, variants=[str(config)], seeds=2))
    runs = result.summary["variants"][0]["runs"]
    params = [json.loads((out / "runs" / "mine" / f"seed-{s}.json").read_text())[
        "trainable_params"] for s in (0, 1)]
    assert [r["seed"] for r in runs] == [0, 1] and params[0] == params[1]

    def edit_the_data(train_options, call):
        if call == 1:  # during seed 0's run
            Path(data[0]).write_text(Path(data[0]).read_text() + Path(data[0]).read_text())

    counting_run_train(monkeypatch, edit_the_data)
    with pytest.raises(ValueError, match=r"--data .* changed since this comparison started"):
        quiet(options(data, tmp_path / "out2", variants=["lora"], seeds=2))
    assert (tmp_path / "out2" / "runs" / "lora" / "seed-0.json").is_file()
    assert not (tmp_path / "out2" / "runs" / "lora" / "seed-1.json").exists()
    summary = json.loads((tmp_path / "out2" / "compare.json").read_text())
    assert summary["variants"][0]["seeds_finished"] == [0]  # written on the way out


def test_a_result_file_without_its_fields_is_one_line(tmp_path):
    path = tmp_path / "seed-0.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="is not a result that moa compare wrote"):
        compare_runs.load_result(path)


# ---- options and bad input -----------------------------------------------------------------

def test_a_config_file_gives_the_options_and_flags_override_it(tmp_path):
    config = tmp_path / "compare.yaml"
    config.write_text("data: a.jsonl\neval-data: b.jsonl\nvariants: [soft_moa, lora]\n"
                      "seeds: 2\nlr: {soft_moa: 0.001, lora: 0.0003}\nsteps: 5\n")
    args = build_parser().parse_args(["compare", "--config", str(config), "--steps", "7"])
    opts = CompareOptions.from_args(args)
    assert (opts.data, opts.eval_data, opts.variants, opts.seeds, opts.steps) == \
        ("a.jsonl", "b.jsonl", ["soft_moa", "lora"], 2, 7)
    assert opts.lr == {"soft_moa": 0.001, "lora": 0.0003}
    args = build_parser().parse_args(["compare", "--data", "a", "--eval-data", "b",
                                      "--variants", "lora", "--lr", "1e-3,lora=2e-3"])
    assert CompareOptions.from_args(args).lr == {"*": 1e-3, "lora": 2e-3}
    assert CompareOptions.from_args(build_parser().parse_args(
        ["compare", "--data", "a", "--eval-data", "b", "--variants", "lora"])).lr == \
        {"*": 3e-4}


BAD_INPUT = [  # (argv after the data flags, exit status, what the one line says)
    # a name that is no preset, peft_lora or file
    (["--variants", "lora,nope"], 1, "unknown variant 'nope'; allowed: a preset (soft_moa,"),
    # base is always its own row
    (["--variants", "base"], 1, "'base' is not a variant to train"),
    # a MoAConfig file that does not exist
    (["--variants", "missing.yaml"], 1, "no such MoA config file"),
    # two entries of one name
    (["--variants", "lora,lora"], 1, "two variants are named 'lora'"),
    # a rate for a variant that is not run
    (["--variants", "lora", "--lr", "molora=1e-3"], 1,
     "--lr gives a rate for 'molora', which is not among --variants (lora)"),
    # a variant left without a rate
    (["--variants", "lora,molora", "--lr", "lora=1e-3"], 1, "--lr gives no rate for molora"),
    # a rate that is no number
    (["--variants", "lora", "--lr", "lora=fast"], 2,
     "argument --lr: the rate for lora: expected a number > 0, got 'fast'"),
    # a rate for all variants that is not > 0
    (["--variants", "lora", "--lr", "0"], 2, "argument --lr: expected a number > 0, got '0'"),
    # one variant named twice in --lr
    (["--variants", "lora", "--lr", "lora=1e-3,lora=2e-3"], 2,
     "argument --lr: it gives 'lora' more than once"),
    # two rates for all variants
    (["--variants", "lora", "--lr", "1e-3,2e-3"], 2,
     "argument --lr: it gives more than one value for all variants"),
    # an entry with an empty name
    (["--variants", "lora", "--lr", "=1e-3"], 2, "argument --lr: an entry names no variant"),
    # no seed to run
    (["--variants", "lora", "--seeds", "0"], 2, "argument --seeds: expected a positive "
                                                "integer, got '0'"),
    # the reference must be run
    (["--variants", "lora", "--reference", "molora"], 1, "--reference 'molora' is not among"),
    # an empty entry
    (["--variants", "lora,,molora"], 2, "no empty entry"),
]


@pytest.mark.parametrize("extra, status, message", BAD_INPUT)
def test_bad_input_is_one_line_before_any_model_loads(extra, status, message, data, tmp_path,
                                                      monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(moa.cli.loading, "load_base_model", no_model)
    monkeypatch.setattr(moa.cli.loading, "load_tokenizer", no_model)
    argv = ["compare", "--data", data[0], "--eval-data", data[1], "--out",
            str(tmp_path / "out"), *extra]
    assert main(argv) == status
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("moa: error: ") and message in error


@pytest.mark.parametrize("case", [
    "no_eval_data",  # --eval-data is required
    "missing_data",  # --data names no file
    "missing_eval_data",  # --eval-data names no file
    "data_is_a_directory",  # --data names a directory
    "eval_data_is_a_fifo",  # --eval-data names a FIFO (never opened, so nothing blocks)
    "out_is_a_file",  # --out must be a directory
    "out_holds_other_files",  # nor one that holds something else
    "config_named_as_a_preset",  # a MoAConfig file named lora.json would read as the preset
    "bad_record",  # a training record without the fields of a format
])
def test_bad_paths_are_one_line_before_any_model_loads(case, data, tmp_path, monkeypatch,
                                                       capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(moa.cli.loading, "load_base_model", no_model)
    train, test, out = data[0], data[1], tmp_path / "out"
    variants, message = "lora", ""
    if case == "no_eval_data":
        test, message = None, "moa compare needs --eval-data"
    elif case == "missing_data":
        train, message = str(tmp_path / "nope.jsonl"), "no such data file"
    elif case == "missing_eval_data":
        test, message = str(tmp_path / "nope.jsonl"), "--eval-data: no such data file"
    elif case == "data_is_a_directory":
        train, message = str(tmp_path), f"--data: {tmp_path} is a directory, not a JSON or JSONL"
    elif case == "eval_data_is_a_fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("this platform has no FIFOs")
        test = str(tmp_path / "fifo")
        os.mkfifo(test)
        message = f"--eval-data: {test} is not a regular file (it is a FIFO"
    elif case == "out_is_a_file":
        out.write_text("x")
        message = "is a file, not a directory"
    elif case == "out_holds_other_files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        message = "holds files that are not a moa compare run"
    elif case == "config_named_as_a_preset":
        (tmp_path / "lora.json").write_text(MoAConfig.preset("lora").to_json_string())
        variants, message = str(tmp_path / "lora.json"), "rename the file"
    elif case == "bad_record":
        Path(train).write_text('{"text": "no format"}\n')
        message = "record 1 has none of the fields"
    argv = ["compare", "--data", train, "--variants", variants, "--out", str(out)]
    argv += ["--eval-data", test] if test else []
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("moa: error: ") and message in error
    if case == "out_holds_other_files":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_ctrl_c_says_what_compare_keeps_not_moa_trains_resume_hint(data, tmp_path,
                                                                  monkeypatch, capsys):
    def interrupt(train_options, call):  # as moa train raises it on Ctrl-C
        raise TrainingInterrupted(None, train_options.save_interval, False)

    counting_run_train(monkeypatch, interrupt)
    status = main(["compare", "--data", data[0], "--eval-data", data[1], "--variants", "lora",
                   "--steps", "2", "--batch-size", "4", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 130 and "moa: interrupted" in err
    assert "the runs finished so far are kept" in err
    assert "--save-interval" not in err and "4611686018427387904" not in err
