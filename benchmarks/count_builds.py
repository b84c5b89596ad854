"""How many JIT builds each step of the GPU suite makes on a cold Triton cache, and how
long they take to compile, measured on a machine without a GPU: the basis of the steps'
time limits in benchmarks/gpu_suite.py.

    python benchmarks/count_builds.py OUT.json [--step tests|check|bench] [--compile]
        [-k EXPR] [NODE_ID ...]

A launch's build is what triton's JIT compiles a new binary for: its specialisation by the
JIT's own binder for an sm_90 CUDA backend (integers equal to 1 made constants, pointers
and integers divisible by 16 marked; see tools/triton_builds.py), its constexprs
and options. Each step's launches are recorded as a GPU run makes them:

- tests: the test step's selection (gpu_suite.TEST_FILES, -k gpu_suite.TEST_FILTER, or
  the node ids and -k given) runs in this process with the parameters a CUDA machine
  collects: torch.cuda.is_available() reads True and TRITON_INTERPRET 0 while the test
  modules load, so ON_GPU, the token counts and the dtypes are the GPU's; the tensors stay
  on the CPU and the kernels run under the Triton interpreter, so the values, and every
  launch decision that depends on them, are real. A test that fails here still counts the
  launches it made. test_jit_builds_within_budget (T = 8192 x 4096 in three dtypes: hours
  interpreted) is recorded as --step bench records its layers: its L1 and 8B q shapes on
  the meta device (there the 8B q gates require a gradient; in the test they do not).
- check: `moa check --device cuda --cases 3 --seed 0`'s cases (the same random layers:
  check_backends with the GPU's sizes), interpreted on the CPU.
- bench: one forward and backward of each layer the bench step times (bf16; the layer
  shapes of builds.layer_configs() and L1's experts under a top-2 router), on the meta
  device, the launches intercepted and not run.

--compile: a child process without the interpreter then compiles every distinct build
with triton.compile for sm_90 (the JIT's own pipeline: TTIR, PTX, a cubin from ptxas), one
at a time as the JIT does, and records the seconds of each.

Writes OUT.json: the distinct builds (per kernel, and those new in each test) and with
--compile their compile seconds (total, mean, median, max, the CPU). Slow (the interpreter
runs the tests at the GPU's sizes, T up to 16384): a measurement, not a CI check.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("tests", "check", "bench")
COUNTS = STEPS + ("realistic",)


# ---------------------------------------------------------------------------------------
# recording builds
# ---------------------------------------------------------------------------------------

def _encode(value):
    """A constexpr, attribute or option value as JSON (a tuple becomes {"tuple": [...]})."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return {"tuple": [_encode(item) for item in value]}
    raise TypeError(f"cannot record a launch argument of type {type(value).__name__}: "
                    f"{value!r}")


def _decode(value):
    if isinstance(value, dict):
        return tuple(_decode(item) for item in value["tuple"])
    if isinstance(value, list):
        return [_decode(item) for item in value]
    return value


def _build_record(function, signature, constexprs, attrs, options, origin: str) -> dict:
    """One build as JSON: enough to compile it again in another process."""
    return {"module": function.__module__, "kernel": function.__name__, "origin": origin,
            "key": _build_key(function, signature, constexprs, attrs, options),
            "signature": signature,
            "constexprs": [[list(path), _encode(v)] for path, v in constexprs.items()],
            "attrs": [[list(path), _encode(v)] for path, v in attrs.items()],
            "options": {name: _encode(v) for name, v in options.__dict__.items()}}


def _build_key(function, signature, constexprs, attrs, options) -> str:
    return repr((function.__module__, function.__name__, sorted(signature.items()),
                 sorted((k, repr(v)) for k, v in constexprs.items()),
                 sorted((k, repr(v)) for k, v in attrs.items()), repr(options)))


class InterpretedLaunches:
    """Records the sm_90 build of every interpreted kernel launch (the kernel still runs),
    with the test (or step) that made it first. Also the pytest plugin of the tests step."""

    def __init__(self):
        from tools.triton_builds import _target_backend

        _, self.backend = _target_backend()
        self.binders: dict = {}
        self.builds: dict[str, dict] = {}
        self.new_per_origin: dict[str, list[str]] = {}
        self.outcomes: dict[str, str] = {}
        self.origin = "(outside a test)"

    def install(self) -> None:
        """Wrap the interpreter's launch so that every launch is recorded first."""
        from triton.runtime.interpreter import InterpretedFunction

        interpret, recorder = InterpretedFunction.run, self

        def run(kernel, *args, grid, warmup, **kwargs):
            recorder.record(kernel.fn, args, kwargs)
            return interpret(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        InterpretedFunction.run = run

    def record(self, function, args, kwargs) -> None:
        from triton.runtime.jit import JITFunction, create_function_from_signature

        if function not in self.binders:
            jit = JITFunction(function)
            self.binders[function] = (jit, create_function_from_signature(
                jit.signature, jit.params, self.backend))
        jit, binder = self.binders[function]
        kwargs = {"debug": False, **kwargs}
        if "UPCAST" in kwargs:  # grouped.py upcasts bf16 dots under the interpreter only
            kwargs["UPCAST"] = False
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(
            self.backend, kwargs, bound, specialization, options)
        key = _build_key(function, signature, constexprs, attrs, options)
        if key not in self.builds:
            self.builds[key] = _build_record(function, signature, constexprs, attrs, options,
                                             self.origin)
            self.new_per_origin.setdefault(self.origin, []).append(function.__name__)

    # pytest hooks
    def pytest_collection_finish(self, session):
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels (interpreted) run on the CPU
        for item in session.items:
            module = getattr(item, "module", None)
            if getattr(module, "DEVICE", None) == "cuda":
                module.DEVICE = "cpu"

    def pytest_runtest_setup(self, item):
        self.origin = item.nodeid

    def pytest_runtest_call(self, item):
        if item.funcargs.get("device") == "cuda":  # test_triton_ops' device parameter
            item.funcargs["device"] = "cpu"

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.outcomes.setdefault(report.nodeid, report.outcome)


def _interpreted_recorder() -> InterpretedLaunches:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import moa_kernels.triton  # noqa: F401  (its kernels become interpreted functions)

    recorder = InterpretedLaunches()
    recorder.install()
    return recorder


# Left out of the interpreted run (its realistic shapes, T = 8192 x 4096 in three dtypes,
# take the CPU hours): test_jit_builds_within_budget. Its launches are recorded on the meta
# device instead (--step realistic, a process with compiled kernels): L1 and the 8B q
# projection, as its REALISTIC list has them
SLOW_ON_THE_CPU = "jit_builds_within_budget"


def count_tests(selection: list[str], keyword: str | None) -> dict:
    """The builds of the test step's selection run with the GPU's parameters."""
    recorder = _interpreted_recorder()
    import pytest
    import torch

    torch.cuda.is_available = lambda: True  # the test modules collect the GPU's parameters
    os.environ["TRITON_INTERPRET"] = "0"  # ... and read it as they load
    keyword = f"({keyword or 'True'}) and not {SLOW_ON_THE_CPU}"
    arguments = ["-p", "no:cacheprovider", "-q", "-o", "console_output_style=classic",
                 *selection, "-k", keyword]
    code = pytest.main(arguments, plugins=[recorder])
    outcomes: dict[str, int] = {}
    for outcome in recorder.outcomes.values():
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    builds = dict(recorder.builds)
    for record in _in_child("realistic")["launches"]:
        if builds.setdefault(record["key"], record) is record:
            recorder.new_per_origin.setdefault(record["origin"], []).append(record["kernel"])
    return {"pytest_exit": int(code), "outcomes": outcomes, "selection": selection,
            "keyword": keyword, **_summary(builds),
            "new_builds_per_test": recorder.new_per_origin}


def count_check() -> dict:
    """The builds of the check step (`moa check --device cuda --cases 3 --seed 0`)."""
    recorder = _interpreted_recorder()
    from moa.cli.check import check_backends

    recorder.origin = "moa check --cases 3 --seed 0"
    results = check_backends("cpu", cases_per_mode=3, seed=0, small=False)
    return {"cases": len(results), "failed": sum(not r.passed for r in results),
            **_summary(recorder.builds)}


def count_bench() -> dict:
    """The builds of the bench step: a forward and backward of each layer shape, bf16."""
    from moa.cli.bench import LAYER_CASES
    from moa.config import RouterConfig
    from tools import triton_builds as builds

    l1 = next(case for case in LAYER_CASES if case.name == "L1 soft")
    configs = builds.layer_configs() + [builds.LayerConfig(
        "L1 topk2", 2048, 2048, 2048, tuple(l1.experts), RouterConfig(mode="topk", top_k=2))]
    found = _record_meta([(config, "bf16", config.name) for config in configs])
    return {"configs": [config.name for config in configs], **_summary(found)}


def count_realistic() -> dict:
    """The builds of test_jit_builds_within_budget (see SLOW_ON_THE_CPU)."""
    from tools import triton_builds as builds

    configs = [c for c in builds.layer_configs() if c.name in ("L1 soft", "8B q")]
    return _summary(_record_meta([
        (config, dtype, f"{SLOW_ON_THE_CPU}[torch.{name}]") for name, dtype in
        (("bfloat16", "bf16"), ("float16", "fp16"), ("float32", "fp32"))
        for config in configs]))


def _record_meta(runs: list) -> dict[str, dict]:
    """The distinct builds of (LayerConfig, dtype, origin) runs: a forward and backward
    each on the meta device, launches intercepted (builds.recording)."""
    from tools import triton_builds as builds

    found: dict[str, dict] = {}
    for config, dtype, origin in runs:
        with builds.recording() as launches:
            config.run(builds.DTYPES[dtype])
        for launch in builds.unique(launches):
            found.setdefault(launch.key, _build_record(
                launch.kernel.fn, launch.signature, launch.constexprs, launch.attrs,
                launch.options, origin))
    return found


def _in_child(step: str) -> dict:
    """count_builds --step `step` in a process without the interpreter; its result."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="count_builds-") as folder:
        path = Path(folder) / f"{step}.json"
        subprocess.run([sys.executable, str(Path(__file__).resolve()), str(path), "--step",
                        step], env=env, check=True, cwd=ROOT)
        return json.loads(path.read_text())


def _summary(builds: dict[str, dict]) -> dict:
    kernels: dict[str, int] = {}
    for build in builds.values():
        kernels[build["kernel"]] = kernels.get(build["kernel"], 0) + 1
    return {"builds": len(builds), "builds_by_kernel": dict(sorted(kernels.items())),
            "launches": list(builds.values())}


# ---------------------------------------------------------------------------------------
# compiling (a process of its own: the kernels must be JIT functions)
# ---------------------------------------------------------------------------------------

def compile_all(path: Path) -> None:
    """Compile every build recorded in `path` for sm_90, timing each (wall seconds, and CPU
    seconds of this process and its ptxas children: the figure a busy machine distorts
    least); the times go back into `path`."""
    import importlib
    import resource

    import triton
    from triton.compiler import ASTSource

    from tools.triton_builds import _target_backend

    def cpu_seconds() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + children.ru_utime + children.ru_stime

    target, _ = _target_backend()
    data = json.loads(path.read_text())
    walls, cpus = [], []
    for index, launch in enumerate(data["launches"]):
        kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        constexprs = {tuple(p): _decode(v) for p, v in launch["constexprs"]}
        attrs = {tuple(p): _decode(v) for p, v in launch["attrs"]}
        options = {name: _decode(v) for name, v in launch["options"].items()}
        source = ASTSource(kernel, launch["signature"], constexprs, attrs)
        wall, cpu = time.perf_counter(), cpu_seconds()
        triton.compile(source, target=target, options=options)
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
        launch["compile_seconds"] = {"wall": round(walls[-1], 3), "cpu": round(cpus[-1], 3)}
        print(f"[{index + 1}/{len(data['launches'])}] {launch['kernel']} {walls[-1]:.2f} s "
              f"wall, {cpus[-1]:.2f} s CPU", flush=True)
    data["compile"] = {"builds": len(walls), "wall": _stats(walls), "cpu": _stats(cpus),
                       "processor": _cpu_name(), "cores": os.cpu_count(),
                       "load_average": list(os.getloadavg()), "triton": triton.__version__}
    path.write_text(json.dumps(data, indent=1))


def _stats(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    return {"total_s": round(sum(seconds), 1), "mean_s": round(statistics.mean(seconds), 3),
            "median_s": round(statistics.median(seconds), 3),
            "max_s": round(max(seconds), 3)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compile_in_child(path: Path) -> None:
    """compile_all in a process without the interpreter, on an empty Triton cache (a build
    found in the cache would take no time)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory(prefix="count_builds-cache-") as cache:
        env["TRITON_CACHE_DIR"] = cache
        subprocess.run([sys.executable, str(Path(__file__).resolve()), str(path),
                        "--compile-only"], env=env, check=True, cwd=ROOT)
    timing = json.loads(path.read_text())["compile"]
    print(f"count_builds: compiled {timing['builds']} builds for sm_90 on {timing['cores']} "
          f"cores of {timing['processor']} (load average {timing['load_average']}): wall "
          f"{timing['wall']}, CPU {timing['cpu']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the JSON file to write (must not exist; "
                        "with --compile alone an existing one's builds are compiled again)")
    parser.add_argument("selection", nargs="*", help="--step tests: test files or node ids "
                        "(default: the GPU suite's test step)")
    parser.add_argument("--step", choices=COUNTS, default="tests",
                        help="the suite's step (realistic: test_jit_builds_within_budget's "
                        "shapes, which --step tests counts this way)")
    parser.add_argument("-k", dest="keyword", help="--step tests: pytest -k (default: the "
                        "suite's filter when no selection is given)")
    parser.add_argument("--compile", action="store_true",
                        help="then compile every build for sm_90 and time it")
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_only:  # the child process of --compile
        compile_all(args.out)
        return 0
    if args.compile and args.out.exists() and not args.selection and args.keyword is None:
        _compile_in_child(args.out)  # compile (again) the builds recorded in OUT.json
        return 0
    if args.out.exists():
        parser.error(f"{args.out} exists; name a new file")
    if args.step in ("bench", "realistic") and os.environ.get("TRITON_INTERPRET") == "1":
        parser.error(f"--step {args.step} records compiled kernels' launches: unset "
                     "TRITON_INTERPRET")
    started = time.monotonic()
    if args.step == "tests":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import gpu_suite

        selection = args.selection or list(gpu_suite.TEST_FILES)
        keyword = args.keyword if args.keyword is not None or args.selection else \
            gpu_suite.TEST_FILTER
        result = count_tests(selection, keyword)
    else:
        result = {"check": count_check, "bench": count_bench,
                  "realistic": count_realistic}[args.step]()
    result = {"step": args.step, "seconds": round(time.monotonic() - started, 1), **result}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"count_builds: {args.step}: {result['builds']} distinct sm_90 builds "
          f"{result['builds_by_kernel']} (recorded in {result['seconds']:.0f} s)", flush=True)
    if args.compile:
        _compile_in_child(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
