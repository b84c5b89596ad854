"""moa/data.py: what a data path must be, what records are refused, and tokenising a cut
text exactly as the whole text would be tokenised and then cut."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from moa.data import DataError, check_data_file, read_records


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@contextlib.contextmanager
def fifo_unblocked_after(path: Path, seconds: float):
    """A FIFO at `path`; after `seconds` a writer opens and closes it, so a reader that
    blocked on it gets end-of-file (and a test that would hang fails instead)."""
    os.mkfifo(path)
    done = threading.Event()

    def unblock() -> None:
        deadline = time.monotonic() + seconds
        while not done.wait(0.05):
            if time.monotonic() < deadline:
                continue
            try:  # a non-blocking open for writing fails (ENXIO) while no reader waits
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as error:
                if error.errno != errno.ENXIO:
                    raise

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        thread.join()


# ---- data paths ------------------------------------------------------------------------------

def test_a_regular_file_is_accepted_and_a_missing_one_is_not_found(tmp_path):
    data = write_records(tmp_path / "d.jsonl", [{"prompt": "p", "completion": "c"}])
    assert check_data_file(data) == data
    with pytest.raises(FileNotFoundError, match="no such data file: '.*none.jsonl'"):
        check_data_file(tmp_path / "none.jsonl")
    with pytest.raises(FileNotFoundError, match="no such data file"):  # under a file
        check_data_file(data / "inner.jsonl")


@pytest.mark.parametrize("make, says", [
    pytest.param(lambda tmp: tmp, "is a directory, not a JSON or JSONL data file",
                 id="a-directory"),
    pytest.param(lambda tmp: Path(os.devnull), "is not a regular file (it is a character "
                 "device)", id="dev-null"),
])
def test_a_path_that_is_not_a_regular_file_says_what_it_is(make, says, tmp_path):
    with pytest.raises(DataError, match=f"{make(tmp_path)}.*{_escape(says)}"):
        check_data_file(make(tmp_path))
    with pytest.raises(DataError, match=_escape(says)):
        read_records(make(tmp_path))


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path):
    with fifo_unblocked_after(tmp_path / "pipe.jsonl", seconds=20) as fifo:
        started = time.monotonic()
        with pytest.raises(DataError, match=_escape("is not a regular file (it is a FIFO")):
            read_records(fifo)
        assert time.monotonic() - started < 10


def _escape(text: str) -> str:
    return re.escape(text)
