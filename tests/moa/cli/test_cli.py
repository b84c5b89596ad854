"""The `moa` command: one-line errors with a non-zero exit, `check`, and a short `demo`."""

import pytest

from moa.cli import main


@pytest.mark.parametrize("argv,message", [
    ([], "COMMAND"),  # no subcommand at all
    (["frob"], "invalid choice: 'frob'"),  # unknown subcommand
    (["demo", "--steps", "x"], "expected a positive integer, got 'x'"),  # non-number
    (["demo", "--steps", "0"], "expected a positive integer, got '0'"),  # zero steps
    (["demo", "--preset", "nope"], "invalid choice: 'nope'"),  # unknown preset
    (["demo", "--device", "meta"], "unsupported device 'meta'"),  # torch knows it, we don't
    (["demo", "--device", "banana"], "unknown device 'banana'"),  # not a device at all
    (["check", "--cases", "-1"], "expected a positive integer"),  # negative count
    (["bench", "--what"], "unrecognized arguments: --what"),  # unknown flag
    (["demo", "--seed", "99999999999999999999999"], "expected a seed in [0, 2**63)"),  # huge
    (["check", "--seed", "1.5"], "expected an integer seed, got '1.5'"),  # not an integer
])
def test_bad_flags_give_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("moa: error: ")
    assert "Traceback" not in err


def test_model_path_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "not a transformers checkpoint (no config.json" in capsys.readouterr().err


def test_checkpoint_with_corrupt_weights_is_one_line(tmp_path, capsys):
    from moa.cli.demo import build_demo_model

    build_demo_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    capsys.readouterr()  # what saving printed
    assert main(["demo", "--model", str(tmp_path), "--steps", "1",
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"moa: error: cannot load the checkpoint {str(tmp_path)!r}")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_an_unexpected_exception_keeps_its_traceback(monkeypatch):
    # only user errors (ValueError, OSError, bad flags) become one line; a bug stays loud
    import moa.cli.demo

    def broken(*args, **kwargs):
        raise TypeError("a bug in moa")

    monkeypatch.setattr(moa.cli.demo, "run_demo", broken)
    with pytest.raises(TypeError, match="a bug in moa"):
        main(["demo", "--steps", "1"])


def test_check_passes_on_cpu(capsys):
    import torch

    from moa.cli.check import available_backends

    assert main(["check", "--cases", "1", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    # one case per mode for each backend (triton runs too: conftest turns the interpreter on)
    backends = available_backends(torch.device("cpu"))
    assert f"{4 * len(backends)} passed, 0 failed" in out
    assert out.startswith("seed 3 (repeat with --seed 3)")


def test_import_notices_of_missing_optional_kernels_are_dropped_and_nothing_else(caplog):
    import logging

    from moa.cli.main import IMPORT_NOTICES, _ImportNotice

    for name in IMPORT_NOTICES:  # as in a fresh process
        logger = logging.getLogger(name)
        for installed in [f for f in logger.filters if isinstance(f, _ImportNotice)]:
            logger.removeFilter(installed)
    assert main(["demo", "--no-such-flag"]) == 2  # main installs the filters first
    notices = {
        "torchao": "Failed to load /venv/torchao/_C_mxfp8.so: Could not load this library",
        "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now "
                               "natively supported by torch.compile as an opaque value type.",
        "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from "
                                         "kernels-community: No module named 'kernels'.",
    }
    others = {
        "torchao": "Failed to load the checkpoint: its weights are damaged",  # no library
        "torch.utils._pytree": "some other notice",
        "bitsandbytes.backends.cpu.ops": "Failed to load CPU something else",
    }
    with caplog.at_level(logging.WARNING):
        for name, message in notices.items():
            logging.getLogger(name).warning(message)
        for name, message in others.items():
            logging.getLogger(name).warning(message)
        logging.getLogger("torchao.quantization").warning(notices["torchao"])  # a child
    assert [r.getMessage() for r in caplog.records] == [*others.values(), notices["torchao"]]


def test_version(capsys):
    from moa import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"moa {__version__}\n"


def test_check_says_when_triton_is_skipped(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU without the interpreter: torch only
    assert main(["check", "--cases", "1", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "triton: skipped (needs a CUDA device" in out and "4 passed, 0 failed" in out


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "training steps (default: 200)" in out and "(default: 0)" in out


def test_demo_runs_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--steps", "3", "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "trainable params: " in out and "chance 2.773, best possible 0.035" in out
    assert "reloaded outputs match exactly" in out
    assert "layers.0" in out  # the router statistics table
    assert "every expert runs on every token" in out  # soft: no activation-rate table
    for name in ("loss.png", "mean_gate.png", "adapter/moa_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out_dir / name).is_file(), name
    assert not (out_dir / "active_rate.png").exists()  # all ones in soft mode: not drawn


def test_demo_of_a_sparse_preset_plots_the_activation_rate(tmp_path, capsys):
    assert main(["demo", "--preset", "sparse_moa", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert "fraction of tokens active over" in capsys.readouterr().out
    assert (tmp_path / "active_rate.png").is_file()


def test_demo_adapters_learn_the_task(tmp_path):
    # The frozen demo model can express the task: 120 steps of soft_moa take the loss from
    # above chance (2.77 nats) to well under a quarter of it (the best possible is 0.035).
    from moa.cli.demo import run_demo

    result = run_demo("soft_moa", steps=120, out_dir=tmp_path, log=lambda *a: None,
                      progress=False)
    assert result.losses[0] > 2.5
    assert sum(result.losses[-10:]) / 10 < 0.5


def test_demo_on_a_local_checkpoint(tmp_path, capsys):
    from moa.cli.demo import build_demo_model

    build_demo_model(seed=3).save_pretrained(tmp_path / "checkpoint")
    assert main(["demo", "--model", str(tmp_path / "checkpoint"), "--steps", "2",
                 "--out", str(tmp_path / "out")]) == 0
    assert "reloaded outputs match exactly" in capsys.readouterr().out
