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

from moa.data import (
    DataError,
    check_data_file,
    load_evaluation_items,
    load_training_examples,
    read_records,
    training_example,
)


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


# ---- records that are refused ----------------------------------------------------------------

@pytest.mark.parametrize("record, says", [
    pytest.param({"question": "q", "choices": ["a", "a"], "answer": 0},
                 "'choices' 0 and 1 (from 0) are the same text 'a'", id="question-format"),
    pytest.param({"question": "q", "choices": ["x", "a", " a "], "answer": 0},
                 "'choices' 1 and 2 (from 0) are the same text 'a'",
                 id="same-after-stripping-spaces"),
    pytest.param({"prompt": "2+2=", "choices": ["4", "5", "4"], "answer": 0},
                 "'choices' 0 and 2 (from 0) are the same text '4'", id="prompt-format"),
    pytest.param({"instruction": "Pick one.\n\nAnswer format: answer1/answer2/answer1",
                  "answer": "answer2"},
                 "the instruction's answer labels 0 and 2 (from 0) are the same text "
                 "'answer1'", id="published-format-labels"),
])
def test_repeated_choices_are_refused_naming_the_record(record, says, tmp_path):
    data = write_records(tmp_path / "d.jsonl", [{"question": "ok", "choices": ["a", "b"],
                                                 "answer": 0}, record])
    with pytest.raises(DataError, match=f"d.jsonl: record 2: {re.escape(says)}"):
        load_evaluation_items(data)
    if "question" in record:  # training reads the choices of this format too
        with pytest.raises(DataError, match=f"record 2: {re.escape(says)}"):
            training_example({**record, "answer": 1}, "d.jsonl: record 2")


@pytest.mark.parametrize("answer_text", [
    pytest.param("NaN", id="nan-literal"),
    pytest.param("Infinity", id="infinity-literal"),
    pytest.param("-Infinity", id="minus-infinity-literal"),
    pytest.param("1e999", id="a-number-that-overflows-to-inf"),
])
def test_a_non_finite_answer_is_refused_naming_the_record(answer_text, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1 + 1 = ?", "answer": 2}\n'
                    f'{{"question": "2 + 2 = ?", "answer": {answer_text}}}\n')
    with pytest.raises(DataError, match="d.jsonl: record 2: 'answer' is .*, not a finite "
                                        "number"):
        load_training_examples(data)  # would train on the text " nan" / " inf"
    with pytest.raises(DataError, match="d.jsonl: record 2: 'answer' is .*, not a finite "
                                        "number"):
        load_evaluation_items(data)


# ---- records prepared for another harness ---------------------------------------------------

def test_pre_templated_questions_warn_once_per_file_with_counts(tmp_path):
    data = write_records(tmp_path / "d.jsonl", [
        {"question": "Question: Which is a metal?\nAnswer:", "choices": [" iron", " wood"],
         "answer": 0},  # the whole template, and choices with their space
        {"question": "Which is a gas?\nAnswer:", "choices": ["air", "rock"], "answer": 0},
        {"question": "Which is wet?", "choices": ["water", "sand"], "answer": 0},  # plain
        {"prompt": "Question: as given\nAnswer:", "choices": [" a", " b"], "answer": 0}])
    lines = []
    items = load_evaluation_items(data, warn=lines.append)
    assert len(lines) == 2, lines
    assert "d.jsonl: 2 of 3 'question' records already hold the question template" in lines[0]
    assert "d.jsonl: 1 of 3 'question' records have answers or choices that start with a " \
           "space" in lines[1]
    assert items[0].continuations == [" iron", " wood"]  # no second space
    assert items[2].continuations == [" water", " sand"]
    assert items[3].continuations == [" a", " b"]  # prompt records: as given
    with pytest.warns(UserWarning) as caught:  # without warn=: Python warnings
        load_evaluation_items(data)
    assert [str(warning.message) for warning in caught] == lines
    training = []
    records = [json.loads(line) for line in data.read_text().splitlines()][:3]
    examples = load_training_examples(write_records(tmp_path / "t.jsonl", records + [
        {"question": "Name a gas.", "answer": " air"}]), warn=training.append)
    assert [e.completion for e in examples] == [" iron", " air", " water", " air"]
    assert len(training) == 2 and "2 of 4" in training[0] and "2 of 4" in training[1]
    plain = write_records(tmp_path / "plain.jsonl", [
        {"question": "Which is wet?", "choices": ["water", "sand"], "answer": 0}])
    quiet = []
    load_evaluation_items(plain, warn=quiet.append)
    load_training_examples(plain, warn=quiet.append)
    assert quiet == []
