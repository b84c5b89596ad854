"""`moa compare`: several adapter variants over several seeds on one data set, side by side.

Plan: options (defaults, then a --config file, then the flags given) and the variants, all
checked before any model loads -> DIR/compare_options.json, what defines the runs (a rerun
with other values is refused; variants and seeds may be added) -> the base model loaded
once and scored once, without an adapter (DIR/runs/base.json) -> per variant and seed
0..N-1: `run_train` on a copy of the base (the code path of `moa train`: the same records,
tokens and Trainer, and for one seed the same data order whatever the variant), then
`evaluate_items` on the test records (as `moa evaluate` scores them) and the router
statistics over the first ROUTER_PROMPTS test prompts -> DIR/runs/VARIANT/seed-K.json,
written atomically, made only under its lock (DIR/runs/VARIANT/seed-K.lock, `RunLock`:
several processes on one DIR share the runs). A finished run is skipped when the command is
run again; a run that
raises is written up in DIR/runs/VARIANT/seed-K.error.txt (its reason and traceback), the
others go on, and the next run of the command retries it. -> the summary over the variants
and seeds asked for: DIR/compare.json, DIR/compare.md (the table, also printed) and
DIR/compare.png. --summary-only: that summary from the runs finished, nothing else.

Beside this file (the plan and the runs): compare_options.py (COMPARE_OPTIONS,
CompareOptions), compare_variants.py (the variants), compare_runs.py (the folder's Plan and
what a run measures), statistics.py (the intervals and the paired comparison),
compare_summary.py (compare.json, compare.md, compare.png).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moa.cli.compare_options import CompareOptions
from moa.cli.compare_runs import (
    FORMAT_VERSION,
    ROUTER_PROMPTS,
    RUNS,
    PeakMemory,
    Plan,
    RunLock,
    router_prompts,
    router_statistics,
    score_result,
)
from moa.cli.compare_summary import format_table, summarize, write_summary
from moa.cli.compare_variants import (
    BASE,
    Variant,
    peft_lora_model,
    resolve_learning_rates,
    resolve_variants,
)
from moa.cli.evaluate import evaluate_items
from moa.cli.options import resolve_device
from moa.cli.outputs import check_links_lead_somewhere, write_json_atomic, write_text_atomic
from moa.cli.train import TrainOptions, run_train
from moa.distributed import World, join_world

OPTIONS_FILE = "compare_options.json"
OPTIONS_LOCK = "compare_options.lock"  # held while a process checks and writes OPTIONS_FILE
# Held shared by every process comparing in DIR, from its plan to its summary: a process
# that finds it held by others takes every stored option as binding.
ACTIVE_LOCK = "compare.active"
LOCK_FILES = (OPTIONS_LOCK, ACTIVE_LOCK)
_ACTIVE: dict[Path, RunLock] = {}  # this process's ACTIVE_LOCK per DIR
SAVE_NEVER = 2**62  # Trainer checkpoints in a run: only the one it writes at the end


# ---------------------------------------------------------------------------------------
# the plan: everything checked before a model loads
# ---------------------------------------------------------------------------------------

# What defines a run's result: a rerun into the same DIR must give the same values.
DEFINING = ("model_fingerprint", "data_sha256", "eval_data_sha256", "steps", "epochs", "batch_size",
            "gradient_accumulation", "max_length", "warmup_steps", "weight_decay", "bf16",
            "gradient_checkpointing", "eval_max_length", "max_new_tokens")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(path: str | os.PathLike | None) -> str | None:
    """What identifies a base model wherever it lies (None: the embedded one): a sha256 over
    the size and the first and last MiB of its file, or of every file of its directory with
    their relative names. A copy of the model at another path has the same fingerprint;
    another model, even of the same architecture and size, has another."""
    if path is None:
        return None
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        name = "" if file == root else file.relative_to(root).as_posix()
        digest.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 20))
            if size > 2 << 20:
                handle.seek(size - (1 << 20))
                digest.update(handle.read())
    return digest.hexdigest()


def _check_out(out: Path) -> dict | None:
    """The stored compare_options.json of DIR, None when DIR is new or empty; refuses a file,
    and a directory that holds something other than a compare run."""
    check_links_lead_somewhere(out)
    for folder in (*reversed(out.parents), out):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"--out {str(out)!r}: {folder} is a file, not a "
                                     "directory")
    if not out.exists() or not any(entry.name not in LOCK_FILES for entry in out.iterdir()):
        return None
    stored_path = out / OPTIONS_FILE
    not_ours = (f"--out {str(out)!r} holds files that are not a moa compare run; name a new "
                "or empty directory, or one that moa compare wrote")
    if not stored_path.is_file():
        raise ValueError(f"{not_ours} (no {OPTIONS_FILE} in it)")
    try:
        stored = json.loads(stored_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{not_ours} ({OPTIONS_FILE} is not readable JSON)") from None
    if not isinstance(stored, dict) or stored.get("moa_compare") != FORMAT_VERSION or \
            not isinstance(stored.get("options"), dict) or \
            not isinstance(stored.get("variants"), dict):
        raise ValueError(f"{not_ours} ({OPTIONS_FILE} is not one that this moa writes)")
    return stored


def _finished(out: Path) -> set[str]:
    """The names (variants, "base") with a finished result in DIR."""
    runs = out / RUNS
    names = {path.parent.name for path in runs.glob("*/seed-*.json")}
    return names | ({BASE} if (runs / f"{BASE}.json").is_file() else set())


def _in_progress(out: Path) -> set[str]:
    """The names (variants, "base") with a run that another process is making in DIR (its
    lock held): its result will depend on the stored options as a finished one does."""
    runs = out / RUNS
    locks = [*runs.glob("*/seed-*.lock"), runs / f"{BASE}.lock"]
    return {BASE if path.parent == runs else path.parent.name
            for path in locks if path.is_file() and RunLock.held(path)}


def _differences(stored: dict, defining: dict, variants: dict, finished: set[str]
                 ) -> list[str]:
    """What differs from the stored options where finished results depend on it: every
    option once any result is there, a variant's rate and definition once it has one."""
    from moa.cli.loading import model_description

    def shown(value) -> str:
        return "none" if value is None else str(value)

    steps_decide = stored["options"].get("steps") is not None and \
        defining.get("steps") is not None
    found = []
    for name in DEFINING if finished else ():
        there, here = stored["options"].get(name), defining.get(name)
        if name == "epochs" and steps_decide:  # --steps gives the length; --epochs is unused
            continue
        if name == "model_fingerprint" and name not in stored["options"]:
            name = "model"  # a DIR written before fingerprints: the model's path decides
            there, here = stored["options"].get(name), defining.get(name)
        if there != here and name == "model_fingerprint":
            found.append(f"the model ({model_description(stored['options'].get('model'))} "
                         f"there, {model_description(defining['model'])} here, with other "
                         "content)")
        elif there != here:
            if name.endswith("_sha256"):
                found.append(f"the content of --{name[:-7].replace('_', '-')}")
            else:
                found.append(f"{name.replace('_', '-')} ({shown(there)} there, "
                             f"{shown(here)} here)")
    for name, definition in variants.items():
        before = stored["variants"].get(name)
        if before is None or name not in finished:
            continue
        if before.get("lr") != definition["lr"]:
            found.append(f"lr of {name} ({before.get('lr')} there, {definition['lr']} here)")
        if before.get("kind") != definition["kind"] or \
                before.get("config") != definition["config"]:
            found.append(f"the definition of {name}")
    return found


def plan_compare(options: CompareOptions) -> Plan:
    """The checked plan, and DIR/compare_options.json written (or matched): one ValueError or
    OSError line for bad input, before any model loads."""
    from moa.cli.data import (
        DataError,
        check_data_file,
        load_evaluation_items,
        load_training_examples,
    )
    from moa.cli.loading import check_gguf, check_model_path, is_gguf

    out = Path(options.out)
    # a file, or a folder of something else, refused before any loading
    if _check_out(out) is None and options.summary_only:
        raise ValueError(f"--summary-only: --out {str(out)!r} holds no comparison to "
                         "summarize (no compare_options.json)")
    for what, path in (("--data", options.data), ("--eval-data", options.eval_data)):
        if path is None:
            raise ValueError(f"moa compare needs {what} FILE")
        try:
            check_data_file(path)  # a missing path, a directory, a FIFO: one line each
        except (FileNotFoundError, DataError) as error:
            raise type(error)(f"{what}: {error}") from None
    if options.model is not None:
        check_model_path(options.model)
        if is_gguf(options.model):
            check_gguf(options.model)
    variants = resolve_variants(options.variants)
    rates = resolve_learning_rates(options.lr, variants)
    reference = options.reference or variants[0].name
    if reference not in rates:
        raise ValueError(f"--reference {reference!r} is not among --variants "
                         f"({', '.join(rates)})")
    load_training_examples(options.data)  # a bad record fails here, not in every run
    if not load_evaluation_items(options.eval_data):
        raise ValueError(f"{options.eval_data}: no usable record")
    defining = {
        "model": None if options.model is None else str(Path(options.model).resolve()),
        "model_fingerprint": model_fingerprint(options.model),
        "data": str(Path(options.data).resolve()), "data_sha256": sha256_of(options.data),
        "eval_data": str(Path(options.eval_data).resolve()),
        "eval_data_sha256": sha256_of(options.eval_data),
        **{name: getattr(options, name) for name in DEFINING
           if name not in ("model_fingerprint", "data_sha256", "eval_data_sha256")}}
    definitions = {v.name: {"kind": v.kind, "source": v.source, "lr": rates[v.name],
                            "config": v.config} for v in variants}
    # Other processes may run a comparison on DIR at the same time (they share its runs):
    # the stored options are read, checked and rewritten by one process at a time.
    out.mkdir(parents=True, exist_ok=True)
    options_lock, _ = RunLock.acquire(out / OPTIONS_LOCK, wait=True)
    try:
        mine = _ACTIVE.pop(out.resolve(), None)  # (a plan made before in this process)
        if mine is not None:
            mine.release()
        others_running = RunLock.held(out / ACTIVE_LOCK)
        stored = _check_out(out)
        if stored is not None:
            binding = _finished(out) | _in_progress(out)
            if others_running:  # their runs to come depend on every stored option
                binding |= {*stored["variants"], BASE}
            differences = _differences(stored, defining, definitions, binding)
            if differences:
                raise ValueError(f"--out {str(out)!r} holds results of a comparison with "
                                 f"other options (finished, or being made by another "
                                 f"process): {'; '.join(differences)}. Run it with the same "
                                 "ones (variants and seeds may be added) or name another "
                                 "--out")
            definitions = {**stored["variants"], **definitions}
        write_json_atomic(out / OPTIONS_FILE, {"moa_compare": FORMAT_VERSION,
                                               "options": defining, "variants": definitions})
        _ACTIVE[out.resolve()] = RunLock.acquire(out / ACTIVE_LOCK, wait=True, shared=True)[0]
    finally:
        options_lock.release()
    return Plan(options, variants, rates, reference, out, defining)


def _done_comparing(out: Path) -> None:
    """Drop this process's shared ACTIVE_LOCK on DIR (its comparison there is over)."""
    lock = _ACTIVE.pop(out.resolve(), None)
    if lock is not None:
        lock.release()


def _check_inputs_unchanged(plan: Plan) -> None:
    """The data files as the comparison's plan saw them: every run reads them again, so an
    edit mid-comparison would mix runs on other data."""
    for name, flag in (("data", "--data"), ("eval_data", "--eval-data")):
        if sha256_of(plan.defining[name]) != plan.defining[f"{name}_sha256"]:
            raise ValueError(f"{flag} {plan.defining[name]!r} changed since this comparison "
                             "started (its SHA-256 differs); the runs made so far are kept. "
                             "Restore the file, or compare the new one in another --out")


# ---------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------

@dataclass
class CompareResult:
    """The summary (what compare.json holds), the runs that failed ("variant seed K" or
    "base") and the files written."""

    summary: dict
    failed: list[str]
    files: list[Path]


def _write_failure(path: Path, error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    write_text_atomic(path, reason + "\n\n" + "".join(
        traceback.format_exception(type(error), error, error.__traceback__)))
    return reason


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _score_base(plan: Plan, base, tokenizer, items, device: torch.device,
                progress: bool, world: World) -> dict:
    options = plan.options
    started = time.perf_counter()
    model = copy.deepcopy(base).to(device).eval()
    scores = evaluate_items(model, tokenizer, items, options.eval_batch_size,
                            options.max_new_tokens, options.eval_max_length, device, progress,
                            world=world)
    del model
    return {"variant": BASE, "trainable_params": 0, **score_result(scores),
            "score_seconds": time.perf_counter() - started, "device": str(device)}


def _train_and_score(plan: Plan, variant: Variant, seed: int, base, tokenizer, items,
                     device: torch.device, log: Callable[[str], None],
                     progress: bool, world: World) -> dict:
    options = plan.options
    run_dir = plan.run_path(variant.name, seed, suffix="")
    if run_dir.exists() and world.is_main:  # what an interrupted or failed run left
        shutil.rmtree(run_dir)
    train_options = TrainOptions(
        data=options.data, model=options.model, out=str(run_dir), steps=options.steps,
        epochs=options.epochs, lr=plan.rates[variant.name], batch_size=options.batch_size,
        gradient_accumulation=options.gradient_accumulation, max_length=options.max_length,
        warmup_steps=options.warmup_steps, weight_decay=options.weight_decay,
        bf16=options.bf16, gradient_checkpointing=options.gradient_checkpointing, seed=seed,
        save_interval=SAVE_NEVER, save_total_limit=1, log_interval=options.log_interval,
        device=options.device, **_adapter_options(plan, variant))
    memory = PeakMemory(device)
    with memory:
        trained = run_train(train_options, lambda line: log(f"{variant.name} seed {seed}: "
                                                             f"{line}"),
                            progress=progress, base_model=copy.deepcopy(base),
                            adapt=peft_lora_model if variant.kind == "peft" else None)
    model = trained.model.eval()
    score_device = next(model.parameters()).device
    started = time.perf_counter()
    scores = evaluate_items(model, tokenizer, items, options.eval_batch_size,
                            options.max_new_tokens, options.eval_max_length, score_device,
                            progress, world=world)
    score_seconds = time.perf_counter() - started
    routers = router_statistics(model, tokenizer, router_prompts(items),
                                options.eval_max_length)
    del model, trained.model
    return {"variant": variant.name, "seed": seed, "lr": plan.rates[variant.name],
            **score_result(scores),
            "trainable_params": trained.trainable_parameters,
            "train_seconds": trained.seconds, "seconds_per_step": trained.seconds_per_step,
            "steps": trained.losses[-1][0] if trained.losses else 0,
            "examples": trained.examples, "score_seconds": score_seconds,
            "peak_memory_mb": memory.peak_mb, "peak_memory": memory.kind,
            "device": str(score_device), "losses": [list(point) for point in trained.losses],
            "router_stats": routers,
            "router_prompts": min(ROUTER_PROMPTS, len(items)),
            "adapter": str(trained.adapter_dir) if options.keep_adapters else None}


def _adapter_options(plan: Plan, variant: Variant) -> dict:
    """The TrainOptions fields that select the variant's adapter; a config file's variant
    is trained from the configuration as the plan read it (written beside its runs), so an
    edit of the file mid-comparison cannot give its seeds different adapters."""
    if variant.kind != "config":
        return variant.train_options()
    path = plan.out / RUNS / variant.name / "moa_config.json"
    write_json_atomic(path, variant.config)
    return {"moa_config": str(path)}


def _tidy_run_dir(plan: Plan, variant: str, seed: int) -> None:
    """Delete a finished run's folder (checkpoints, logs, plots), keeping the adapter when
    --keep-adapters is given."""
    run_dir = plan.run_path(variant, seed, suffix="")
    if not run_dir.exists():
        return
    if not plan.options.keep_adapters:
        shutil.rmtree(run_dir)
        return
    for entry in run_dir.iterdir():
        if entry.name != "adapter":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


RUN = "run"
FINISHED = "finished"


def _claim(result_path: Path, world: World) -> tuple[str, RunLock | None]:
    """Whether this process makes the run whose result is `result_path`: (RUN, the lock on
    rank 0) when it holds the run's lock, (FINISHED, None) when another process finished
    it meanwhile, else (who holds it, None). Rank 0 decides; every rank gets its answer."""
    lock, status = None, RUN
    if world.is_main:
        lock, holder = RunLock.acquire(result_path.with_suffix(".lock"))
        if lock is None:
            status = holder
        elif result_path.is_file():
            lock.release()
            lock, status = None, FINISHED
    return world.share(status), lock


def run_compare(options: CompareOptions, log: Callable[[str], None] = print,
                progress: bool = True) -> CompareResult:
    """`moa compare` (see the module docstring). Bad input is a ValueError or OSError before
    any model loads; a run that raises (anything but KeyboardInterrupt) is recorded and the
    others go on.

    Launched as several processes (moa/distributed.py), every process calls this: each
    run trains data-parallel as `moa train` does and each process scores its share of the
    test records; rank 0 alone checks and writes DIR and prints, a run that fails on any
    process fails on all, and every process returns the same summary and failures (files
    only on rank 0).

    Several comparisons on one DIR (the same command started twice, or on purpose to use
    more cores) share the runs: each makes a run only under its lock (`RunLock`) and
    leaves a run that another holds to it, so no run is made twice or has its folder
    removed under it; each writes, when it ends, the summary of the variants and seeds it
    was given, from every finished run of them."""
    from tqdm import tqdm

    from moa.cli.data import load_evaluation_items
    from moa.cli.loading import load_base_model, load_tokenizer, model_description

    world = join_world(cpu=resolve_device(options.device).type == "cpu")
    plan = world.share(world.agree(lambda: plan_compare(options) if world.is_main else None))
    # Seed-major: a comparison cut short has every variant at its first seeds.
    runs = [(variant, seed) for seed in range(options.seeds) for variant in plan.variants]
    done, base_done = world.share(
        ([(v.name, s) for v, s in runs if plan.run_path(v.name, s).is_file()],
         plan.base_path().is_file()))
    if options.summary_only:
        summary, files = _write_summary(plan, world)
        if world.is_main:
            log(format_table(summary))
            log(f"{len(done) + base_done} of {len(runs) + 1} runs (the base model's included) "
                f"finished in {plan.out}: the summary holds those; nothing was trained or "
                "scored (--summary-only)")
            log(f"written: {', '.join(str(f) for f in files)}")
        return CompareResult(summary, [], files)
    bar = tqdm(total=len(runs) + 1, initial=len(done) + base_done, desc="compare",
               unit="run", disable=not (progress and world.is_main), mininterval=0.5,
               position=0)

    def say(line: str) -> None:
        if world.is_main:
            (tqdm.write if progress else log)(line)

    failed: list[str] = []
    elsewhere: list[tuple[str, Path]] = []  # runs other processes were making, their results
    try:
        say(f"moa compare: {len(plan.variants)} variants x {options.seeds} seeds on "
            f"{model_description(options.model)}; {len(done) + base_done} of {len(runs) + 1} "
            f"runs already in {plan.out}"
            + (f"; {world.size} processes (each run data-parallel)" if world.size > 1
               else ""))
        if len(done) + base_done < len(runs) + 1:
            device = world.device(options.device)
            tokenizer, items, base = world.agree(lambda: (
                load_tokenizer(options.model), load_evaluation_items(options.eval_data),
                load_base_model(options.model, torch.bfloat16 if options.bf16 else None)))
            if not base_done:
                bar.set_postfix_str("base model")

                def score_base() -> None:
                    result = _score_base(plan, base, tokenizer, items, device, progress,
                                         world)
                    if world.is_main:
                        write_json_atomic(plan.base_path(), result)
                        plan.base_path(".error.txt").unlink(missing_ok=True)

                status, lock = _claim(plan.base_path(), world)
                try:
                    if status == RUN:
                        world.agree(score_base)
                    elif status != FINISHED:
                        say(f"base model: made by another moa compare ({status}); left to it")
                        elsewhere.append((BASE, plan.base_path()))
                except Exception as error:
                    reason = _record_failure(plan.base_path(".error.txt"), error, world)
                    say(f"base model: failed: {reason} (see {plan.base_path('.error.txt')})")
                    failed.append(BASE)
                finally:
                    if lock is not None:
                        lock.release()
                _free(device)
                bar.update()
            for variant, seed in runs:
                if (variant.name, seed) in done:
                    continue
                bar.set_postfix_str(f"{variant.name} seed {seed}")
                world.agree(lambda: _check_inputs_unchanged(plan) if world.is_main else None)
                status, lock = _claim(plan.run_path(variant.name, seed), world)
                if status != RUN:
                    if status != FINISHED:
                        say(f"{variant.name} seed {seed}: made by another moa compare "
                            f"({status}); left to it")
                        elsewhere.append((f"{variant.name} seed {seed}",
                                          plan.run_path(variant.name, seed)))
                    bar.update()
                    continue
                error_path = plan.run_path(variant.name, seed, ".error.txt")

                def train_and_score(variant=variant, seed=seed, error_path=error_path):
                    result = _train_and_score(plan, variant, seed, base, tokenizer, items,
                                              device, say, progress, world)
                    if world.is_main:
                        write_json_atomic(plan.run_path(variant.name, seed), result,
                                          indent=None)
                        error_path.unlink(missing_ok=True)
                        _tidy_run_dir(plan, variant.name, seed)
                    return result

                try:
                    result = world.agree(train_and_score)
                    say(f"{variant.name} seed {seed}: accuracy {result['accuracy']:.4f}")
                except Exception as error:
                    reason = _record_failure(error_path, error, world)
                    say(f"{variant.name} seed {seed}: failed: {reason} (see {error_path})")
                    failed.append(f"{variant.name} seed {seed}")
                finally:
                    if lock is not None:
                        lock.release()
                _free(device)
                bar.update()
    except BaseException:  # Ctrl-C, or data changed: the summary of what is finished
        if world.is_main:
            try:
                write_summary(plan, summarize(plan))
            except Exception:  # (the error on its way out says more than this one)
                pass
            _done_comparing(plan.out)
        raise
    finally:
        bar.close()

    summary, files = _write_summary(plan, world)
    say(format_table(summary))
    say(f"written: {', '.join(str(f) for f in files)}")
    unfinished = [name for name, result in elsewhere if not result.is_file()]
    if unfinished:  # (those the others finished meanwhile are in the summary)
        say(f"{len(unfinished)} run(s) left to other moa compare processes on {plan.out}: "
            f"{', '.join(unfinished)}; run this command again once they end to write the "
            "summary with their results")
    if failed:
        say(f"{len(failed)} run(s) failed: {', '.join(failed)}; the reasons are in "
            f"{plan.out / RUNS} (*.error.txt). Run the same command again to retry them")
    return CompareResult(summary, failed, files)


def _write_summary(plan: Plan, world: World) -> tuple[dict, list[Path]]:
    """The summary of the runs finished in DIR, written by rank 0 (compare.json, .md, .png),
    and the files written ([] on other ranks); this process's comparison in DIR is over."""
    def summary_and_files():
        if not world.is_main:
            return None, []
        summary = summarize(plan)
        return summary, write_summary(plan, summary)

    try:
        summary, files = world.agree(summary_and_files)
    finally:
        if world.is_main:
            _done_comparing(plan.out)
    return world.share(summary), files


def _record_failure(path: Path, error: BaseException, world: World) -> str:
    """Write up a failed run (rank 0) and return its reason (every rank)."""
    if world.is_main:
        return _write_failure(path, error)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


__all__ = ["CompareResult", "plan_compare", "run_compare"]
