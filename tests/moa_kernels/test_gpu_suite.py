"""The GPU suite's harness (benchmarks/gpu_suite.sh, benchmarks/gpu_suite.py), tested
without a GPU: its dry run end to end (CPU, the Triton interpreter, tiny shapes), a failing
test making it exit 1, a machine without CUDA refused, and its tables from known rows. The
suite runs once on a GPU session with no second chance, so a typo or a missing file must
fail here first."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "benchmarks" /
                                                  "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _suite(out: Path, *args: str, extra_env: dict | None = None, timeout: int = 900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    env.update(extra_env or {})
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def test_dry_run_end_to_end(tmp_path):
    pytest.importorskip("triton")
    result = _suite(tmp_path, "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["mode"] == "dry-run"
    assert [s["name"] for s in results["steps"]] == ["tests", "check", "bench"]
    assert all(s["status"] == "passed" for s in results["steps"]), results["steps"]
    # the whole CUDA selection collected (a renamed file or test would fail above)
    assert results["steps"][0]["collected"] > 100
    assert results["tests"]["tests"] >= 1 and results["tests"]["failures"] == 0
    rows = results["bench"]["rows"]
    module = _suite_module()
    cases = {"L1 soft", "L1 topk2", "M8 soft", "M8 topk2", "8B layer"}
    grouped = {("L1 topk2", module.GROUPED_VARIANT), ("M8 topk2", module.GROUPED_VARIANT)}
    assert {(r["case"], r["variant"]) for r in rows} == {
        (case, variant) for case in cases for variant in module.VARIANTS} | grouped
    assert all("error" not in r and r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 for r in rows)
    summary = (tmp_path / "summary.md").read_text()
    for text in ("| step | status | seconds |", "| case | variant | fwd ms |",
                 "| target | goal | measured | met |", "Dry run",
                 "| case | grouped / masked fwd | grouped / masked fwd+bwd |",
                 "| M8 topk2 | ", "| L1 topk2 | "):
        assert text in summary
    for name in ("tests.log", "tests-collect.log", "check.log", "bench.log", "bench.md"):
        assert (tmp_path / name).exists(), name


def test_a_failing_test_makes_the_suite_exit_1(tmp_path):
    failing = tmp_path / "test_broken.py"
    failing.write_text("def test_broken():\n    assert 1 == 2\n")
    out = tmp_path / "out"
    result = _suite(out, "--dry-run", "--steps", "tests",
                    extra_env={"MOA_GPU_SUITE_DRY_TESTS": str(failing)})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["steps"][0]["status"] == "failed"
    assert results["tests"]["failures"] == 1
    assert "FAILED: tests" in result.stdout


def test_without_cuda_the_full_suite_refuses(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = _suite(tmp_path, "--quick", timeout=300)
    assert result.returncode == 2 and "no CUDA device" in result.stderr


def test_bad_steps_are_refused(tmp_path):
    result = _suite(tmp_path, "--dry-run", "--steps", "tests,bogus", timeout=300)
    assert result.returncode == 2 and "--steps takes" in result.stderr


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
