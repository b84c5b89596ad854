"""The GPU suite's harness (benchmarks/gpu_suite.sh, benchmarks/gpu_suite.py), tested
without a GPU: its dry run end to end (CPU, the Triton interpreter, tiny shapes), its
outputs within what a GPU session returns (at most 8 files, none over 16 MB, at most 2
folders deep), a result line per test, a failing test making it exit 1, a hanging one
stopped at the step's limit with every thread's stack in the log, a machine without CUDA
refused, and its tables from known rows. The suite runs once on a GPU session with no
second chance, so a typo or a missing file must fail here first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"


def _suite_module():
    return benchmark_script("gpu_suite")


def _suite(out: Path, *args: str, extra_env: dict | None = None, timeout: int = 900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    env.update(extra_env or {})
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def _archived(out: Path) -> dict[str, str]:
    """The files in OUT/suite.tar.gz, by name, as text."""
    with tarfile.open(out / "suite.tar.gz") as archive:
        return {member.name: archive.extractfile(member).read().decode()
                for member in archive.getmembers()}


def test_dry_run_end_to_end(tmp_path):
    pytest.importorskip("triton")
    result = _suite(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # what a GPU session returns: three files beside each other, everything in the archive
    assert sorted(path.name for path in tmp_path.rglob("*")) == [
        "results.json", "suite.tar.gz", "summary.md"]
    assert all(path.stat().st_size < 16 * 2**20 for path in tmp_path.iterdir())
    assert "suite.tar.gz" in result.stdout and "0 folders deep" in result.stdout
    archived = _archived(tmp_path)
    assert set(archived) == {"tests-collect.log", "tests.log", "tests.xml", "check.log",
                             "bench.log", "bench.json", "bench.md", "results.json",
                             "summary.md"}
    results = json.loads((tmp_path / "results.json").read_text())
    assert json.loads(archived["results.json"]) == results
    assert results["mode"] == "dry-run"
    assert [s["name"] for s in results["steps"]] == ["tests", "check", "bench"]
    assert all(s["status"] == "passed" for s in results["steps"]), results["steps"]
    # the whole CUDA selection collected (a renamed file or test would fail above)
    assert results["steps"][0]["collected"] > 100
    assert results["tests"]["tests"] >= 1 and results["tests"]["failures"] == 0
    module = _suite_module()
    for node in module.DRY_TESTS:  # a result line per test
        assert f"{node} PASSED" in archived["tests.log"].splitlines(), node
    rows = results["bench"]["rows"]
    cases = {"L1 soft", "L1 topk2", "M8 soft", "M8 topk2", "8B layer"}
    grouped = {("L1 topk2", module.GROUPED_VARIANT), ("M8 topk2", module.GROUPED_VARIANT)}
    assert {(r["case"], r["variant"]) for r in rows} == {
        (case, variant) for case in cases for variant in module.VARIANTS} | grouped
    timed = [f"{part}{kind}" for part in ("fwd_", "fwd_bwd_") for kind in ("ms", "launch_ms",
                                                                         "wall_ms")]
    assert all("error" not in r and all(r[key] > 0 for key in timed) for r in rows)
    summary = (tmp_path / "summary.md").read_text()
    assert archived["summary.md"] == summary
    for text in ("| step | status | seconds | limit (s) |",
                 "| case | variant | fwd ms | launch | wall | fwd x base |",
                 "| target | goal | measured | met |", "Dry run",
                 "| case | grouped / masked fwd | grouped / masked fwd+bwd |",
                 "| M8 topk2 | ", "| L1 topk2 | "):
        assert text in summary


def test_a_failing_and_a_hanging_test(tmp_path):
    # a failing test, then one that would sleep past the step's limit: the log has a
    # result line for the first and, at the limit, every thread's stack (the hanging
    # test's frame in it); the step is stopped, tests.xml still written, and the suite
    # exits 1 with its outputs in place
    tests = tmp_path / "test_broken_and_hanging.py"
    tests.write_text("import time\n\n\ndef test_broken():\n    assert 1 == 2\n\n\n"
                     "def test_hangs():\n    time.sleep(600)\n")
    out = tmp_path / "out"
    result = _suite(out, "--dry-run", "--steps", "tests",
                    extra_env={"MOA_GPU_SUITE_DRY_TESTS": str(tests),
                               "MOA_GPU_SUITE_DRY_TEST_LIMIT": "20"})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    step = results["steps"][0]
    assert step["status"] == "timed out" and step["limit"] == 20
    assert results["tests"]["failures"] == 1
    assert "FAILED: tests" in result.stdout
    log = _archived(out)["tests.log"]
    assert any(line.endswith("test_broken_and_hanging.py::test_broken FAILED")
               for line in log.splitlines()), log[:3000]
    stopped = log.index("[gpu suite] time limit of 20 s reached")
    assert "in test_hangs" in log[stopped:], log[-3000:]
    assert sorted(path.name for path in out.iterdir()) == [
        "results.json", "suite.tar.gz", "summary.md"]


def test_a_used_output_folder_is_refused(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    result = _suite(tmp_path, "--dry-run", timeout=300)
    assert result.returncode == 2 and "not an empty folder" in result.stderr
    assert (tmp_path / "results.json").read_text() == "{}"


@pytest.mark.parametrize("layout, broken", [
    # what the suite leaves: within every limit
    ({"suite.tar.gz": 10, "results.json": 10, "summary.md": 10}, []),
    # eight files, two folders deep, exactly 16 MB: the limits themselves
    ({**{f"f{i}": 1 for i in range(7)}, "a/b/deep.log": 16 * 2**20}, []),
    # nine files
    ({f"f{i}": 1 for i in range(9)}, ["9 files, over 8"]),
    # one byte over 16 MB
    ({"big.log": 16 * 2**20 + 1}, ["big.log: 16,777,217 bytes, over 16,777,216"]),
    # three folders deep
    ({"a/b/c/deep.log": 1}, ["a/b/c/deep.log: 3 folders deep, over 2"]),
    # a name the session cannot bring back
    ({"odd name.log": 1}, ["odd name.log: a name with other characters"]),
])
def test_output_limits_are_checked(tmp_path, layout, broken):
    module = _suite_module()
    for name, size in layout.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.truncate(size)  # sparse: no disk written
    listing, problems = module.check_outputs(tmp_path)
    assert len(problems) == len(broken), problems
    for problem, expected in zip(problems, broken):
        assert problem.startswith(expected), problems
    assert sum("folders deep" in line for line in listing) == len(layout)


def test_a_link_in_the_output_is_a_problem(tmp_path):
    (tmp_path / "real.log").write_text("x")
    (tmp_path / "link.log").symlink_to(tmp_path / "real.log")
    _, problems = _suite_module().check_outputs(tmp_path)
    assert problems == ["link.log: a link or not a plain file"]


def test_without_cuda_the_full_suite_refuses(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = _suite(tmp_path, "--quick", timeout=300)
    assert result.returncode == 2 and "no CUDA device" in result.stderr


def test_bad_steps_are_refused(tmp_path):
    result = _suite(tmp_path, "--dry-run", "--steps", "tests,bogus", timeout=300)
    assert result.returncode == 2 and "--steps takes" in result.stderr


@pytest.mark.parametrize("mode", [0, 1], ids=["full", "quick"])
def test_limits_fit_one_session_command(mode):
    # every step stopped at its limit (stack dump, interrupt) still ends, with 30 s for
    # the driver's own start and publishing, inside one command of a GPU session; and a
    # test's own stack dump comes before its step's limit
    module = _suite_module()
    limits = [module.LIMITS[step][mode] for step in module.STEPS]
    stops = sum(limit > 0 for limit in limits) * (module.STACK_DUMP_WAIT_S +
                                                   module.INTERRUPT_WAIT_S)
    assert sum(limits) + stops + 30 <= module.SESSION_COMMAND_S
    assert module.TEST_STACK_DUMP_S < module.LIMITS["tests"][mode]


def test_ratios_and_tables_from_known_rows():
    module = _suite_module()
    rows = []
    for case, base, triton, peft in [("L1 soft", (1.0, 2.0), (1.2, 2.8), (1.5, 4.0)),
                                     ("M8 soft", (1.0, 2.0), (1.3, 3.0), (1.6, 4.2)),
                                     ("M8 topk2", (1.0, 2.0), (1.2, 2.5), (1.6, 4.2))]:
        for variant, (fwd, train) in (("base", base), ("triton", triton), ("peft", peft)):
            rows.append({"case": case, "variant": variant, "fwd_ms": fwd, "fwd_bwd_ms": train})
    rows.append({"case": "M8 topk2", "variant": module.GROUPED_VARIANT, "fwd_ms": 1.8,
                 "fwd_bwd_ms": 3.0})
    # host times beside do_bench's: forward host-bound (launch 1.5 >= 0.8 x 1.8), the
    # training step not (launch 1.0 < 0.8 x 3.0)
    rows[-1].update(fwd_launch_ms=1.5, fwd_wall_ms=1.9, fwd_bwd_launch_ms=1.0,
                    fwd_bwd_wall_ms=3.1)
    rows.append({"case": "8B layer", "variant": "triton", "error": "RuntimeError('x')"})
    ratios = module._ratios(rows)
    assert ratios["M8 topk2 grouped / masked fwd"] == pytest.approx(1.5)
    assert ratios["M8 topk2 grouped / masked fwd+bwd"] == pytest.approx(1.2)
    # against the masked soft case: (3.0 - 2.0) / (3.0 - 2.0)
    assert ratios["M8 triton-grouped top-2 overhead / soft overhead (fwd+bwd)"] == \
        pytest.approx(1.0)
    assert ratios["L1 soft triton fwd+bwd / base"] == pytest.approx(1.4)
    assert ratios["L1 soft triton fwd+bwd speed-up over peft"] == pytest.approx(4.0 / 2.8,
                                                                                 abs=1e-4)
    assert ratios["M8 triton top-2 overhead / soft overhead (fwd+bwd)"] == pytest.approx(0.5)
    table = module.bench_markdown({"device": "cuda", "dtype": "bf16", "shapes": {},
                                   "rows": rows, "ratios": ratios})
    assert "| L1 fwd+bwd / frozen base | <= 1.5 | 1.400 | yes |" in table
    assert "| M8 top-2 adapter overhead / soft overhead (triton, fwd+bwd) | <= 0.6 | 0.500 " \
           "| yes |" in table
    assert "error: RuntimeError('x')" in table
    assert "| M8 topk2 | 1.500 | 1.200 |" in table
    assert "| M8 topk2 | triton-grouped | 1.8000 | 1.5000 | 1.9000 | 1.800 | 3.0000 | " \
           "1.0000 | 3.1000 | 1.500 | fwd |" in table
    # rows without host times (none measured) leave those cells empty, not host-bound
    assert "| L1 soft | triton | 1.2000 |  |  | 1.200 | 2.8000 |  |  | 1.400 |  |" in table


def test_bench_triton_rows_carry_host_times(monkeypatch):
    # benchmarks/bench_triton.py (CUDA only) on the CPU, do_bench and the synchronisation
    # stood in for: every do_bench figure comes with its launch and wall times
    triton_testing = pytest.importorskip("triton.testing")
    torch = pytest.importorskip("torch")
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench_triton = benchmark_script("bench_triton")
    calls = []

    def do_bench(fn, grad_to_none=None, return_mode="median"):
        calls.append(fn)
        fn()
        return 4.0

    monkeypatch.setattr(triton_testing, "do_bench", do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)
    x = torch.randn(3, 8, requires_grad=True)
    times = bench_triton._timings(layer, x, torch.randn(3, 8))
    assert set(times) == {"fwd", "fwd_launch", "fwd_wall", "train", "train_launch",
                          "train_wall"} and len(calls) == 2
    assert all(0 < times[key] < 4.0 for key in times if key not in ("fwd", "train"))
    row = bench_triton._row("L1 soft", "triton", times, times)
    assert row.split()[3:10] == [f"{times[k]:.3f}" for k in (
        "fwd", "fwd_launch", "fwd_wall", "train", "train_launch", "train_wall")] + ["1.00"]
    assert "host" not in row  # launch far below the 4 ms median
