"""The GPU suite: one command on a CUDA machine that runs every CUDA test, `moa check
--device cuda` and the layer benchmarks, and writes what it measured into a folder.

    bash benchmarks/gpu_suite.sh OUT [--quick] [--dry-run]

Needs torch, triton, transformers and pytest installed (no network: it uses this
repository's files only, on PYTHONPATH) and works with the torch / triton it finds (torch
2.11 + triton 3.6 as well as the pinned 2.13 / 3.9: only long-standing APIs are used,
triton.testing.do_bench among them).

Steps, each a subprocess with its own time limit (LIMITS: sized from the JIT builds
each step makes, counted and compiled on a CPU by benchmarks/count_builds.py; the whole
suite fits one 10-minute command on an H100 or H200, compilation included):
  1. tests     pytest over the CUDA tests (TEST_FILES, compiled kernels: TRITON_INTERPRET=0;
               bf16 included; T from 1 to 16384, ranks above 32, NaN-prefilled buffers,
               non-unit strides, and the JIT's registers / spills of the realistic shapes'
               builds; --quick leaves out the inductor compile test); a result line per
               test in its log;
  2. check     `python -m moa check --device cuda` (skipped by --quick);
  3. bench     do_bench medians, forward and forward + backward, of L1, M8 soft and top-2
               (T = 2048, 2048 x 2048) and a Llama-3.1-8B layer (T = 8192; q, k, v, o,
               down with LoRA r=8 and one layer router), bf16: the triton backend, the
               torch backend, PEFT-style LoRA (cuBLAS twice: x A^T, then B, the scaling and
               the add) of the same total rank, and the frozen base alone (--quick: L1).
               Beside each median, the host's time for the same call (host_times: launch
               and wall), so a figure that measures the host, not the kernels, shows.
               The sparse cases (M8 top-2, and L1's experts under a top-2 router, "L1
               topk2") run the triton backend under both sparse plans: "triton" (the
               default, MOA_TRITON_SPARSE=masked) and "triton-grouped"
               (MOA_TRITON_SPARSE=grouped: grouped GEMMs over the active pairs).
A step past its limit has every thread's stack dumped into its log (SIGUSR1), is
interrupted (SIGINT: pytest still writes its summary and tests.xml) and then killed; a
test running past TEST_STACK_DUMP_S dumps its stack earlier (pytest's faulthandler).

Writes three files into OUT (an empty or new folder), what a GPU session brings back
(at most 8 files, none over 16 MB, at most 2 folders deep; checked at the end): results.json
(everything), summary.md (the tables) and suite.tar.gz (every step's log, tests.xml,
bench.json and bench.md, the JIT build tables, results.json and summary.md), republished
after every step, so a suite stopped from outside still leaves the steps it finished.
Exits 1 if a step failed (a test, a check case, a benchmark error, a time limit) or OUT
breaks those limits.

--dry-run runs the same harness on the CPU under the Triton interpreter with tiny shapes:
the test step collects the full CUDA selection (so a missing file or a renamed test fails
here) and runs a few of its cases; check and bench run small. CI runs it
(tests/moa_kernels/test_gpu_suite.py), so the first GPU run cannot fail on a typo.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The CUDA tests. Left out: test_triton_compile's sm_90 ahead-of-time builds (CI's check
# without a GPU, on triton 3.9 internals) and every CPU-only test file.
TEST_FILES = ["tests/moa_kernels/test_triton_gpu.py", "tests/moa_kernels/test_triton_ops.py",
              "tests/moa_kernels/test_triton_grouped.py",
              "tests/moa_kernels/test_triton_compile.py"]
TEST_FILTER = "not sm90_builds and not jit_specialisation"
QUICK_FILTER = TEST_FILTER + " and not inductor"  # --quick: no inductor compile (slowest)
# What --dry-run runs of them under the interpreter (after collecting all of them); the
# environment variable MOA_GPU_SUITE_DRY_TESTS may name others (node ids, space-separated)
DRY_TESTS = ["tests/moa_kernels/test_triton_gpu.py::"
             "test_token_counts_and_ranks_above_32[1-topk-torch.bfloat16]",
             "tests/moa_kernels/test_triton_grouped.py::"
             "test_grouped_matches_reference[t1-topk-lora-ranks-bf16]"]
STEPS = ("tests", "check", "bench")

# Seconds per step: (full, quick). The suite runs on a cold Triton cache, so each step
# pays for its JIT builds, counted and compiled for sm_90 on a CPU by
# benchmarks/count_builds.py (kernels of ed3d228, triton 3.9; one at a time, as the JIT makes
# them, on an empty cache; CPU seconds of the compiler and ptxas, as a loaded 2-core AMD
# EPYC's wall times were 1.8-7.8x those): tests 317 builds, 154.6 s (0.49 s each); check
# 24 builds, 6.8 s; bench 22 builds, 8.6 s. Each limit: the builds' seconds x 1.5 (another
# host CPU; the JIT's binding and cubin loads), plus what the CPU cannot measure, assumed:
#   tests  232 s builds + 40 s for the 312 tests themselves (~0.1 s of Python and float64
#          references each) + 60 s for the inductor test's cold compile (not in --quick)
#          + 15 s start (torch, CUDA context, collection) = 347 s: 360 (quick 290);
#   check  10 s builds + 5 s for its 12 cases x 3 backends + 15 s start = 30 s: 60;
#   bench  13 s builds + 25 s of do_bench (44 medians of ~0.1-0.4 s each) and host_times
#          + 15 s start = 53 s: 100 (quick, L1 only: 40).
# Full: 520 s, with the stops at the limits (STACK_DUMP_WAIT_S + INTERRUPT_WAIT_S a step)
# and the driver's own start under SESSION_COMMAND_S, one command of a GPU session.
LIMITS = {"tests": (360, 290), "check": (60, 0), "bench": (100, 40)}
SESSION_COMMAND_S = 600
DRY_LIMITS = {"tests": 600, "check": 600, "bench": 600}
# The dry run's limit on its test run alone, if set (tests/moa_kernels/test_gpu_suite.py
# lets a hanging test reach it)
DRY_TEST_LIMIT_VARIABLE = "MOA_GPU_SUITE_DRY_TEST_LIMIT"
# A test that runs this long (at most half its step's limit) prints every thread's stack
# (pytest's faulthandler_timeout), long before the step's limit
TEST_STACK_DUMP_S = 90
# At a step's limit: SIGUSR1 (every thread's stack into the log), STACK_DUMP_WAIT_S later
# SIGINT (pytest ends the session: its summary and tests.xml are written), then after
# INTERRUPT_WAIT_S more the step's process group is killed
STACK_DUMP_WAIT_S = 3
INTERRUPT_WAIT_S = 10

# What a GPU session brings back from OUT: at most 8 files, none over 16 MB, at most 2
# folders deep. The suite leaves 3 there (one step's live log more while it runs) and
# checks the limits when it ends.
RETURNED_FILES = 8
RETURNED_BYTES = 16 * 2**20
RETURNED_DEPTH = 2
ARCHIVE = "suite.tar.gz"
# A log is kept whole in the archive up to this size, else its head and tail (so the
# archive stays far below RETURNED_BYTES whatever a step prints)
LOG_KEPT_BYTES = 1_000_000

TARGETS = [  # issue 13, on a GPU
    ("L1 fwd+bwd / frozen base", "<=", 1.5),
    ("L1 fwd+bwd speed-up of triton over PEFT-style cuBLAS twice", ">=", 1.3),
    ("M8 top-2 adapter overhead / soft overhead (triton, fwd+bwd)", "<=", 0.6),
]

# A step's python process: SIGUSR1 dumps every thread's stack into its log (through a copy
# of stderr made before pytest captures it), then it runs `-m MODULE` or a script
_DUMPABLE = ("import faulthandler, os, runpy, signal, sys\n"
             "stacks = os.fdopen(os.dup(2), 'w')\n"
             "faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)\n"
             "sys.argv[:2] = [sys.argv[1]]\n"
             "if sys.argv[0].endswith('.py'):\n"
             "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "else:\n"
             "    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


# ---------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="an empty (or new) folder for the results")
    parser.add_argument("--quick", action="store_true", help="tests and L1 only (4 minutes)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, Triton interpreter, tiny shapes: test the harness")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help="the steps to run, comma-separated (default: all)")
    parser.add_argument("--bench-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    chosen = [step for step in args.steps.split(",") if step]
    if not set(chosen) <= set(STEPS):
        parser.error(f"--steps takes {', '.join(STEPS)}; got {args.steps!r}")
    if args.bench_only:  # the bench step's own process, writing into the work folder
        return run_benchmarks(args.out, quick=args.quick, dry_run=args.dry_run)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"{args.out} is not an empty folder; name a new one (a run never "
                     "writes over another's results)")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    environment = _environment(args.dry_run)
    print(f"gpu suite: {environment['device']}; torch {environment['torch']}, triton "
          f"{environment['triton']}; {_mode(args)}; writing {args.out}", flush=True)
    if not args.dry_run and not environment["cuda"]:
        print("gpu suite: no CUDA device here (use --dry-run to test the harness on a CPU)",
              file=sys.stderr)
        return 2
    runners = {"tests": _tests, "check": _check, "bench": _bench}
    results = {"environment": environment, "mode": _mode(args), "steps": []}
    with tempfile.TemporaryDirectory(prefix="gpu_suite-") as work:
        args.work = Path(work)
        for name in STEPS:
            if name in chosen and not (name == "check" and args.quick):
                results["steps"].append(runners[name](args))
                results["seconds"] = round(time.monotonic() - started, 1)
                _publish(args, results)  # what a suite stopped from outside still returns
        results["seconds"] = round(time.monotonic() - started, 1)
        _publish(args, results)
    failed = [step["name"] for step in results["steps"] if step["status"] != "passed"]
    print(f"gpu suite: {'FAILED: ' + ', '.join(failed) if failed else 'passed'} in "
          f"{results['seconds']:.0f} s; see {args.out / 'summary.md'}", flush=True)
    listing, problems = check_outputs(args.out)
    print(f"gpu suite: {args.out} holds (limits: {RETURNED_FILES} files, "
          f"{RETURNED_BYTES // 2**20} MB each, {RETURNED_DEPTH} folders deep):", flush=True)
    print("\n".join(f"    {line}" for line in listing), flush=True)
    for problem in problems:
        print(f"gpu suite: {args.out} would not come back whole: {problem}", file=sys.stderr)
    return 1 if failed or problems else 0


def _mode(args) -> str:
    return "dry-run" if args.dry_run else "quick" if args.quick else "full"


def _limit(args, step: str) -> int:
    return DRY_LIMITS[step] if args.dry_run else LIMITS[step][1 if args.quick else 0]


def _child_env(args) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env["TRITON_INTERPRET"] = "1" if args.dry_run else "0"
    env["MOA_GPU_SUITE_OUT"] = str(args.work)  # test_triton_gpu's JIT build tables
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice
    return env


def _python(*arguments: str) -> list[str]:
    """A python command (`-m MODULE ...` as "MODULE", or a script path) whose stacks a
    SIGUSR1 dumps."""
    return [sys.executable, "-c", _DUMPABLE, *arguments]


def _run(name: str, command: list[str], args, limit: int) -> dict:
    """Run one step, its output to its log (in OUT while it runs, then in the work folder
    and the archive); passed, failed or timed out. At the limit: a stack dump, then an
    interrupt, then the kill (see STACK_DUMP_WAIT_S)."""
    live = args.out / f"{name}.log"
    shown = command
    if command[1:3] == ["-c", _DUMPABLE]:  # shown as the python command it runs
        target = command[3]
        shown = [command[0], *([target] if target.endswith(".py") else ["-m", target]),
                 *command[4:]]
    print(f"[{name}] {' '.join(shown)} (limit {limit} s)", flush=True)
    started = time.monotonic()
    with open(live, "w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=_child_env(args), stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=limit)
            status = "passed" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            code, status = _stop(process, handle, limit), "timed out"
        finally:
            _kill_group(process)
    seconds = round(time.monotonic() - started, 1)
    log = args.work / live.name
    shutil.move(live, log)
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"[{name}] {status} in {seconds} s", flush=True)
    if status != "passed":
        print("\n".join(f"    {line}" for line in tail), flush=True)
    return {"name": name, "status": status, "returncode": code, "seconds": seconds,
            "limit": limit, "log": log.name, "tail": tail}


def _stop(process: subprocess.Popen, log, limit: int) -> int | None:
    """A step past its limit: every thread's stack into the log (SIGUSR1), an interrupt
    (SIGINT: pytest writes its summary and xml), and if it is still running, the kill."""
    log.write(f"\n[gpu suite] time limit of {limit} s reached: every thread's stack "
              "(SIGUSR1), then SIGINT\n")
    log.flush()
    for sent, wait in ((signal.SIGUSR1, STACK_DUMP_WAIT_S), (signal.SIGINT, INTERRUPT_WAIT_S)):
        try:
            process.send_signal(sent)
            return process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    _kill_group(process)
    return process.wait()


def _kill_group(process: subprocess.Popen) -> None:
    """Kill what is left of a step's process group (its workers, its subprocesses)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pytest_options(limit: int, verbosity: str = "-v") -> list[str]:
    """pytest with a result line per test (-v, and nothing that quietens it) in the log
    as each one ends, no cache written into the checkout, and a stack dump for a test that
    runs past TEST_STACK_DUMP_S or half the step's limit."""
    dump = max(1, min(TEST_STACK_DUMP_S, limit // 2))
    return ["pytest", "-p", "no:cacheprovider", verbosity, "-rfE", "-o",
            "console_output_style=classic", "-o", f"faulthandler_timeout={dump}"]


def _tests(args) -> dict:
    limit = _limit(args, "tests")
    junit = f"--junitxml={args.work / 'tests.xml'}"
    if args.dry_run:  # the whole selection must collect; then a few cases really run
        collect = _run("tests-collect", _python(*_pytest_options(limit, "-q"),
                                                "--collect-only", *TEST_FILES, "-k",
                                                TEST_FILTER), args, limit)
        if collect["status"] != "passed":
            return {**collect, "name": "tests"}
        chosen = os.environ.get("MOA_GPU_SUITE_DRY_TESTS", "").split() or DRY_TESTS
        limit = int(os.environ.get(DRY_TEST_LIMIT_VARIABLE) or limit)
        step = _run("tests", _python(*_pytest_options(limit), junit, *chosen), args, limit)
        step["collected"] = _collected(args.work / "tests-collect.log")
        return step
    return _run("tests", _python(*_pytest_options(limit), junit, *TEST_FILES, "-k",
                                 QUICK_FILTER if args.quick else TEST_FILTER), args, limit)


def _collected(log: Path) -> int | None:
    """The count of pytest's "N tests collected" (or "N/M tests collected": N selected)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        words = line.split()
        if len(words) >= 3 and words[1] in ("test", "tests") and words[2] == "collected":
            count = words[0].split("/")[0]
            if count.isdigit():
                return int(count)
    return None


def _check(args) -> dict:
    device = "cpu" if args.dry_run else "cuda"
    cases = "1" if args.dry_run else "3"
    return _run("check", _python("moa", "check", "--device", device, "--cases", cases,
                                 "--seed", "0"), args, _limit(args, "check"))


def _bench(args) -> dict:
    command = _python(str(Path(__file__).resolve()), str(args.work), "--bench-only")
    command += ["--quick"] if args.quick else []
    command += ["--dry-run"] if args.dry_run else []
    return _run("bench", command, args, _limit(args, "bench"))


def _environment(dry_run: bool) -> dict:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda and not dry_run else \
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"torch": torch.__version__, "triton": triton_version, "cuda": cuda,
            "cuda_version": torch.version.cuda, "device": device,
            "capability": list(torch.cuda.get_device_capability()) if cuda else None,
            "python": platform.python_version(), "commit": _commit(),
            "fp32_output_gemm": _fp32_output_gemm() if cuda and not dry_run else None}


def _fp32_output_gemm() -> bool:
    """Whether torch.mm(bf16, bf16, out_dtype=torch.float32) runs here (the shrink and du
    GEMMs use it; without it they cast their operands to fp32, a slower fallback)."""
    import torch

    try:
        probe = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
        return torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _publish(args, results: dict) -> None:
    """results.json and summary.md into OUT, and OUT/suite.tar.gz: every file the steps
    left in the work folder (logs, tests.xml, bench.json, bench.md, JIT builds) with those
    two; each written whole, then renamed into place."""
    results.update(_collect(args.work))
    results["archive"] = ARCHIVE
    results["archived"] = sorted(path.name for path in args.work.iterdir())
    text = {"results.json": json.dumps(results, indent=1),
            "summary.md": summary(results)}
    for name, content in text.items():
        (args.work / name).write_text(content)
        _replace(args.out / name, lambda path, content=content: path.write_text(content))
    _replace(args.out / ARCHIVE, lambda path: _archive(args.work, path))


def _replace(path: Path, write) -> None:
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
    os.replace(partial, path)


def _archive(folder: Path, path: Path) -> None:
    """A gzipped tar of `folder`'s files (flat), each log over LOG_KEPT_BYTES cut to its
    head and tail."""
    with tarfile.open(path, "w:gz") as archive:
        for member in sorted(folder.iterdir()):
            data = member.read_bytes()
            if member.suffix == ".log" and len(data) > LOG_KEPT_BYTES:
                head, tail = data[:LOG_KEPT_BYTES // 4], data[-(LOG_KEPT_BYTES * 3 // 4):]
                cut = len(data) - len(head) - len(tail)
                data = head + f"\n[gpu suite: {cut} bytes left out here]\n".encode() + tail
            info = tarfile.TarInfo(member.name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            archive.addfile(info, io.BytesIO(data))


def check_outputs(out: Path) -> tuple[list[str], list[str]]:
    """OUT against what a GPU session brings back: a line per entry (size, folders deep),
    and every way it breaks those limits: more than RETURNED_FILES files, a file over
    RETURNED_BYTES, one more than RETURNED_DEPTH folders deep, a link or other non-plain
    file, a name other than letters, digits, '.', '_' and '-'."""
    listing, problems, files = [], [], 0
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out)
        depth = len(relative.parts) - 1
        if not all(part.isascii() and part.replace(".", "").replace("_", "")
                   .replace("-", "").isalnum() for part in relative.parts):
            problems.append(f"{relative}: a name with other characters than letters, "
                            "digits, '.', '_', '-'")
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            listing.append(f"{relative} (not a plain file)")
            problems.append(f"{relative}: a link or not a plain file")
            continue
        if path.is_dir():
            listing.append(f"{relative}/ (a folder)")
            continue
        files += 1
        size = path.stat().st_size
        listing.append(f"{relative}  {size:,} bytes  {depth} folders deep")
        if size > RETURNED_BYTES:
            problems.append(f"{relative}: {size:,} bytes, over {RETURNED_BYTES:,}")
        if depth > RETURNED_DEPTH:
            problems.append(f"{relative}: {depth} folders deep, over {RETURNED_DEPTH}")
    if files > RETURNED_FILES:
        problems.append(f"{files} files, over {RETURNED_FILES}")
    return listing, problems


def _collect(out: Path) -> dict:
    """What the steps left in the work folder: test counts (junit xml), benchmark rows,
    JIT builds."""
    found: dict = {}
    xml = out / "tests.xml"
    if xml.exists():
        suite = ElementTree.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        found["tests"] = {key: int(suite.get(key, 0))
                          for key in ("tests", "failures", "errors", "skipped")}
    bench = out / "bench.json"
    if bench.exists():
        found["bench"] = json.loads(bench.read_text())
    builds = []
    for path in sorted(out.glob("jit_builds_*.json")):
        builds += json.loads(path.read_text())
    if builds:
        found["jit_builds"] = builds
    return found


def summary(results: dict) -> str:
    """The markdown summary of a suite run."""
    env = results["environment"]
    lines = [f"# GPU suite ({results['mode']})", "",
             f"{env['device']}; torch {env['torch']} (CUDA {env['cuda_version']}), triton "
             f"{env['triton']}, Python {env['python']}; commit {env['commit']}; "
             f"fp32-output GEMM (torch.mm out_dtype): {env['fp32_output_gemm']}; "
             f"{results['seconds']:.0f} s in all. Every log, tests.xml, bench.json and the "
             f"JIT build tables are in {results.get('archive', ARCHIVE)}.", "",
             "| step | status | seconds | limit (s) |", "|---|---|---:|---:|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('limit', '')} |"
              for s in results["steps"]]
    if "tests" in results:
        t = results["tests"]
        lines += ["", f"Tests: {t['tests']} run, {t['failures']} failed, {t['errors']} "
                      f"errors, {t['skipped']} skipped."]
    bench = results.get("bench")
    if bench:
        if results["mode"] == "dry-run":
            lines += ["", "Dry run: CPU, Triton interpreter, tiny shapes. These figures test "
                          "the harness; they measure nothing about the kernels."]
        lines += ["", bench_markdown(bench)]
    builds = results.get("jit_builds")
    if builds:
        lines += ["", "Builds the JIT made for the realistic shapes (test_jit_builds_within_"
                      "budget; each build once, with the dtype of the test that compiled it; "
                      "registers and spills from the driver):", "",
                  "| kernel | dtype | warps | registers | spills | shared (B) |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| `{b['kernel']}` | {b['dtype']} | {b['warps']} | {b['registers']} | "
                  f"{b['spills']} | {b['shared']} |" for b in builds]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# the benchmarks (run in their own process: TRITON_INTERPRET is set before triton loads)
# ---------------------------------------------------------------------------------------

FULL = {"tokens": 2048, "features": 2048, "8b_tokens": 8192, "hidden": 4096, "kv": 1024,
        "intermediate": 14336}
TINY = {"tokens": 32, "features": 64, "8b_tokens": 32, "hidden": 64, "kv": 32,
        "intermediate": 96}
VARIANTS = ("base", "triton", "torch", "peft")
# the sparse cases also run the triton backend's grouped sparse plan (MOA_TRITON_SPARSE)
GROUPED_VARIANT = "triton-grouped"


def bench_cases(quick: bool) -> list:
    """The layer cases: moa.cli.bench's (L1 soft, M8 soft, M8 topk2) and L1's experts under a
    top-2 router (L1 topk2, a sparse case with heterogeneous ranks); --quick: L1 soft."""
    from moa.cli.bench import LAYER_CASES, LayerCase
    from moa.config import RouterConfig

    cases = list(LAYER_CASES)
    l1 = next(case for case in cases if case.name == "L1 soft")
    cases.insert(1, LayerCase("L1 topk2", l1.experts, RouterConfig(mode="topk", top_k=2)))
    return [case for case in cases if not quick or case.name == "L1 soft"]


class WithSparsePlan:
    """A module called with MOA_TRITON_SPARSE set to `plan` (restored after the call)."""

    def __init__(self, module, plan: str):
        self.module, self.plan = module, plan

    def __call__(self, *args):
        from moa_kernels.triton.grouped import SPARSE_PLAN_VARIABLE

        saved = os.environ.get(SPARSE_PLAN_VARIABLE)
        os.environ[SPARSE_PLAN_VARIABLE] = self.plan
        try:
            return self.module(*args)
        finally:
            if saved is None:
                os.environ.pop(SPARSE_PLAN_VARIABLE, None)
            else:
                os.environ[SPARSE_PLAN_VARIABLE] = saved


def run_benchmarks(out: Path, *, quick: bool, dry_run: bool) -> int:
    """Time every layer case's variants; bench.json and bench.md into `out`, rewritten
    after each case (a step stopped at its limit keeps the cases it finished)."""
    import torch

    device = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.bfloat16
    shapes = TINY if dry_run else FULL
    timer = _cpu_timer if dry_run else _cuda_timer()
    synchronize = (lambda: None) if dry_run else torch.cuda.synchronize
    calls = HOST_CALLS_DRY if dry_run else HOST_CALLS
    torch.backends.cuda.matmul.allow_tf32 = False
    result = {"device": str(device), "dtype": "bf16", "shapes": shapes, "rows": [],
              "ratios": {}, "host_calls": calls}

    def measure(case: str, modules: dict, tokens: int) -> None:
        result["rows"] += _time_variants(case, modules, timer, synchronize, calls, tokens,
                                         device, dtype)
        result["ratios"] = _ratios(result["rows"])
        (out / "bench.json").write_text(json.dumps(result, indent=1))
        (out / "bench.md").write_text(bench_markdown(result) + "\n")

    for case in bench_cases(quick):
        measure(case.name, _layer_variants(case, shapes, device, dtype), shapes["tokens"])
    if not quick:
        measure("8B layer", _eight_b_variants(shapes, device, dtype), shapes["8b_tokens"])
    print(bench_markdown(result))
    return 1 if any("error" in row for row in result["rows"]) else 0


def _cuda_timer():
    from triton.testing import do_bench

    def timer(fn, grad_to_none):
        return do_bench(fn, grad_to_none=grad_to_none, return_mode="median")

    return timer


def _cpu_timer(fn, grad_to_none):
    """do_bench's contract on the CPU (the dry run): one warm-up call, one timed (ms)."""
    samples = []
    for i in range(2):
        for tensor in grad_to_none or ():
            tensor.grad = None
        started = time.perf_counter()
        fn()
        if i:
            samples.append((time.perf_counter() - started) * 1e3)
    return sorted(samples)[len(samples) // 2]


# Calls per host timing (host_times): enough to fill the GPU's queue well past one call's
# launches, few enough to add under a second per variant
HOST_CALLS = 20
HOST_CALLS_DRY = 1


def host_times(fn, grad_to_none, synchronize, calls: int) -> tuple[float, float]:
    """(launch ms, wall ms) of `fn`, beside its do_bench median. launch: the median host
    time of one call without waiting for the device (what the CPU spends issuing it; a
    host-device sync inside the call makes it wait, and shows here). wall: the wall time
    per call of `calls` calls issued back to back and synchronised once at the end (the
    larger of the host's and the device's time per call). A do_bench median close to the
    launch time measures the host (Python, dispatch, launches), not the kernels.
    `grad_to_none`'s gradients are reset before each call, as do_bench does."""
    synchronize()
    launches = []
    started = time.perf_counter()
    for _ in range(calls):
        for tensor in grad_to_none or ():
            tensor.grad = None
        issued = time.perf_counter()
        fn()
        launches.append(time.perf_counter() - issued)
    synchronize()
    wall = (time.perf_counter() - started) / calls
    return sorted(launches)[len(launches) // 2] * 1e3, wall * 1e3


class CublasTwiceLoRA:
    """PEFT-style LoRA on a frozen linear (what peft's LoraLayer forward does): base(x) +
    B(A(x)) * scaling, two cuBLAS GEMMs and the elementwise scale and add."""

    def __init__(self, base, rank: int, device, dtype):
        import torch
        from torch import nn

        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.lora_B.weight.normal_(0.0, 0.02)
        self.scaling = 1.0

    def __call__(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def parameters(self):
        return [*self.lora_A.parameters(), *self.lora_B.parameters()]


def _layer_variants(case, shapes, device, dtype) -> dict:
    import torch
    from torch import nn

    from moa import MoALinear

    torch.manual_seed(0)
    d = shapes["features"]
    base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
    modules = {"base": (lambda x: base(x), [])}
    for backend in ("triton", "torch"):
        layer = MoALinear(base, list(case.experts), case.router, backend=backend,
                          adapter_dtype="base")
        with torch.no_grad():
            layer.expand_weight.normal_(0.0, 0.02)
        modules[backend] = (layer, list(p for p in layer.parameters() if p.requires_grad))
        if backend == "triton" and case.router.is_sparse:
            modules[GROUPED_VARIANT] = (WithSparsePlan(layer, "grouped"), modules[backend][1])
    lora = CublasTwiceLoRA(base, layer.layout.expand_columns, device, dtype)
    modules["peft"] = (lora, lora.parameters())
    return modules


class EightBLayer:
    """The adapted projections of one Llama-3.1-8B decoder layer: q, k, v, o (hidden 4096,
    8 KV heads of 128) and down (intermediate 14336), each with LoRA r=8, gated by one
    layer router (SwiGLU x4, sigmoid, soft) on the attention input; or the frozen
    projections alone, or PEFT-style LoRA r=8 on each."""

    SHAPES = ("q", "k", "v", "o", "down")

    def __init__(self, bases: dict, variant: str, device, dtype):
        import torch

        from moa import MoALinear, RouterConfig
        from moa.modules.router import MoARouter

        self.variant, self.bases = variant, bases
        self.router = None
        self.parts = dict(bases)
        if variant in ("triton", "torch"):
            hidden = bases["q"].in_features
            self.router = MoARouter(hidden, len(self.SHAPES), RouterConfig()).to(device, dtype)
            self.parts = {name: MoALinear(base, ["lora:8"], None, backend=variant,
                                          adapter_dtype="base") for name, base in bases.items()}
            with torch.no_grad():  # B starts at zero; give the experts real work
                for layer in self.parts.values():
                    layer.expand_weight.normal_(0.0, 0.02)
        elif variant == "peft":
            self.parts = {name: CublasTwiceLoRA(base, 8, device, dtype)
                          for name, base in bases.items()}

    def __call__(self, inputs):
        x_attn, x_o, x_down = inputs
        feeds = {"q": x_attn, "k": x_attn, "v": x_attn, "o": x_o, "down": x_down}
        if self.router is None:
            return [self.parts[name](feeds[name]) for name in self.SHAPES]
        gates = self.router(x_attn)
        return [self.parts[name](feeds[name], gates[:, i:i + 1])
                for i, name in enumerate(self.SHAPES)]

    def parameters(self):
        params = [] if self.router is None else list(self.router.parameters())
        for part in self.parts.values():
            if part not in self.bases.values():
                params += [p for p in part.parameters() if p.requires_grad]
        return params


def _eight_b_variants(shapes, device, dtype) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(0)
    hidden, kv, inter = shapes["hidden"], shapes["kv"], shapes["intermediate"]
    dims = {"q": (hidden, hidden), "k": (hidden, kv), "v": (hidden, kv), "o": (hidden, hidden),
            "down": (inter, hidden)}
    bases = {name: nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
             .requires_grad_(False) for name, (d_in, d_out) in dims.items()}
    modules = {}
    for variant in VARIANTS:
        layer = EightBLayer(bases, variant, device, dtype)
        modules[variant] = (layer, layer.parameters())
    return modules


def _time_variants(case: str, modules: dict, timer, synchronize, calls: int, tokens: int,
                   device, dtype) -> list[dict]:
    """A row per variant: do_bench medians (fwd_ms, fwd_bwd_ms) and beside each, the
    host_times of the same function (*_launch_ms, *_wall_ms)."""
    import torch

    probe = next(iter(modules.values()))[0]
    if isinstance(probe, EightBLayer):
        bases = probe.bases
        inputs = [torch.randn(tokens, bases["q"].in_features, device=device, dtype=dtype),
                  torch.randn(tokens, bases["o"].in_features, device=device, dtype=dtype),
                  torch.randn(tokens, bases["down"].in_features, device=device, dtype=dtype)]
    else:
        base = modules["peft"][0].base
        inputs = [torch.randn(tokens, base.in_features, device=device, dtype=dtype)]
    leaves = [x.requires_grad_(True) for x in inputs]
    rows = []
    for variant, (module, params) in modules.items():
        def call(module=module):
            return module(leaves) if isinstance(module, EightBLayer) else module(leaves[0])

        with torch.no_grad():
            outputs = call()
        outputs = outputs if isinstance(outputs, list) else [outputs]
        grads = [torch.randn_like(y) for y in outputs]

        def forward(call=call):
            with torch.no_grad():
                call()

        def train(call=call, grads=grads):
            outputs = call()
            torch.autograd.backward(outputs if isinstance(outputs, list) else [outputs], grads)

        row = {"case": case, "variant": variant}
        try:
            for name, fn, grad_to_none in (("fwd", forward, None),
                                           ("fwd_bwd", train, leaves + list(params))):
                row[f"{name}_ms"] = round(timer(fn, grad_to_none), 4)
                launch, wall = host_times(fn, grad_to_none, synchronize, calls)
                row[f"{name}_launch_ms"], row[f"{name}_wall_ms"] = round(launch, 4), \
                    round(wall, 4)
        except Exception as error:  # one broken variant must not hide the others' figures
            row = {"case": case, "variant": variant, "error": repr(error)[:300]}
        rows.append(row)
        print(f"{case:9s} {variant:7s} {row}", flush=True)
        synchronize()
    return rows


def _ratios(rows: list[dict]) -> dict:
    times = {(r["case"], r["variant"]): r for r in rows if "error" not in r}
    ratios = {}
    for (case, variant), row in times.items():
        base = times.get((case, "base"))
        if base and variant != "base":
            ratios[f"{case} {variant} fwd / base"] = row["fwd_ms"] / base["fwd_ms"]
            ratios[f"{case} {variant} fwd+bwd / base"] = row["fwd_bwd_ms"] / base["fwd_bwd_ms"]
        peft = times.get((case, "peft"))
        if peft and variant in ("triton", "torch", GROUPED_VARIANT):
            ratios[f"{case} {variant} fwd+bwd speed-up over peft"] = \
                peft["fwd_bwd_ms"] / row["fwd_bwd_ms"]
        masked = times.get((case, "triton"))
        if masked and variant == GROUPED_VARIANT:
            ratios[f"{case} grouped / masked fwd"] = row["fwd_ms"] / masked["fwd_ms"]
            ratios[f"{case} grouped / masked fwd+bwd"] = row["fwd_bwd_ms"] / masked["fwd_bwd_ms"]
    for variant in ("triton", "torch", GROUPED_VARIANT):
        soft = times.get(("M8 soft", "triton" if variant == GROUPED_VARIANT else variant))
        topk = times.get(("M8 topk2", variant))
        base = times.get(("M8 soft", "base"))
        if soft and topk and base:
            dense = soft["fwd_bwd_ms"] - base["fwd_bwd_ms"]
            sparse = topk["fwd_bwd_ms"] - base["fwd_bwd_ms"]
            ratios[f"M8 {variant} top-2 overhead / soft overhead (fwd+bwd)"] = \
                sparse / dense if dense > 0 else float("nan")
    return {key: round(value, 4) for key, value in ratios.items()}


# A do_bench median whose host launch time is at least this share of it measures the host
HOST_BOUND_SHARE = 0.8


def host_bound(row: dict) -> list[str]:
    """The figures of a row ("fwd", "fwd+bwd") that measure the host: launch time at least
    HOST_BOUND_SHARE of the do_bench median."""
    return [label for label, name in (("fwd", "fwd"), ("fwd+bwd", "fwd_bwd"))
            if row.get(f"{name}_launch_ms") is not None
            and row[f"{name}_launch_ms"] >= HOST_BOUND_SHARE * row[f"{name}_ms"]]


def bench_markdown(bench: dict) -> str:
    rows = bench["rows"]
    base = {r["case"]: r for r in rows if r["variant"] == "base" and "error" not in r}
    lines = [f"Layer benchmarks ({bench['device']}, {bench['dtype']}; shapes "
             f"{bench['shapes']}). ms: do_bench median. launch: the host's time for one "
             f"call without waiting for the device (median). wall: wall time per call of "
             f"{bench.get('host_calls', HOST_CALLS)} calls back to back, synchronised once. "
             f"host-bound: launch >= {HOST_BOUND_SHARE} x ms, so the figure measures the "
             f"host (Python, dispatch, launches), not the kernels.", "",
             "| case | variant | fwd ms | launch | wall | fwd x base | fwd+bwd ms | launch | "
             "wall | fwd+bwd x base | host-bound |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]

    def ms(row, key):
        return "" if row.get(key) is None else f"{row[key]:.4f}"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['variant']} | error: {r['error']} "
                         "| | | | | | | | |")
            continue
        b = base.get(r["case"])
        fwd_ratio = f"{r['fwd_ms'] / b['fwd_ms']:.3f}" if b else ""
        train_ratio = f"{r['fwd_bwd_ms'] / b['fwd_bwd_ms']:.3f}" if b else ""
        lines.append(f"| {r['case']} | {r['variant']} | {ms(r, 'fwd_ms')} | "
                     f"{ms(r, 'fwd_launch_ms')} | {ms(r, 'fwd_wall_ms')} | {fwd_ratio} | "
                     f"{ms(r, 'fwd_bwd_ms')} | {ms(r, 'fwd_bwd_launch_ms')} | "
                     f"{ms(r, 'fwd_bwd_wall_ms')} | {train_ratio} | "
                     f"{', '.join(host_bound(r))} |")
    ratios = bench["ratios"]
    measured = {
        TARGETS[0][0]: ratios.get("L1 soft triton fwd+bwd / base"),
        TARGETS[1][0]: ratios.get("L1 soft triton fwd+bwd speed-up over peft"),
        TARGETS[2][0]: ratios.get("M8 triton top-2 overhead / soft overhead (fwd+bwd)"),
    }
    lines += ["", "| target | goal | measured | met |", "|---|---|---:|---|"]
    for name, op, goal in TARGETS:
        value = measured[name]
        met = "" if value is None else ("yes" if (value <= goal if op == "<=" else
                                                  value >= goal) else "no")
        shown = "" if value is None else f"{value:.3f}"
        lines.append(f"| {name} | {op} {goal} | {shown} | {met} |")
    sparse = sorted({key.rsplit(" grouped / masked", 1)[0] for key in ratios
                     if " grouped / masked " in key})
    if sparse:
        lines += ["", "Sparse plans (triton backend): MOA_TRITON_SPARSE=grouped time over the "
                      "default masked plan's (< 1: grouped faster)", "",
                  "| case | grouped / masked fwd | grouped / masked fwd+bwd |",
                  "|---|---:|---:|"]
        for case in sparse:
            fwd = ratios.get(f"{case} grouped / masked fwd")
            train = ratios.get(f"{case} grouped / masked fwd+bwd")
            lines.append(f"| {case} | {'' if fwd is None else f'{fwd:.3f}'} | "
                         f"{'' if train is None else f'{train:.3f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
