"""Fixtures and helpers shared by the `moa` command's tests."""

from __future__ import annotations

import pytest
import torch

from moa.cli import main


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_line_error(capsys, argv: list[str]) -> str:
    """The error line of a failing command (a loading progress bar may come before it)."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, err
    lines = [line for line in err.splitlines() if "moa: error" in line]
    assert len(lines) == 1 and lines[0].startswith("moa: error: ") and \
        err.endswith(lines[0] + "\n"), err
    assert "Traceback" not in err
    return lines[0]
