"""moa/cli/outputs.py: atomic writes say which file could not be written; an --out through
a link that leads nowhere is refused by every command before any work."""

import json
import os
import tempfile

import pytest

from moa.cli.main import main
from moa.cli.outputs import write_json_atomic, write_text_atomic


def test_an_atomic_write_keeps_the_old_file_or_writes_the_new_one(tmp_path):
    path = tmp_path / "deep" / "result.json"
    write_json_atomic(path, {"a": 1})
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary left


def test_a_folder_that_refuses_the_write_is_named_by_the_target(tmp_path, monkeypatch):
    # (a read-only folder: as root chmod cannot make one, so the refusal is simulated)
    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", f"{dir}/.result.json.abc123.tmp")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    target = tmp_path / "result.json"
    with pytest.raises(PermissionError) as raised:
        write_json_atomic(target, {"a": 1})
    message = str(raised.value)
    assert str(target) in message and "Permission denied" in message
    assert ".tmp" not in message


@pytest.mark.parametrize("command", [
    ["train", "--data", "train.jsonl"],
    ["evaluate", "--data", "test.jsonl"],
    ["compare", "--data", "train.jsonl", "--eval-data", "test.jsonl", "--variants", "lora"],
    ["demo"],
], ids=["train", "evaluate", "compare", "demo"])
@pytest.mark.parametrize("link,out,words", [
    ("loop", "loop", "is a symbolic link that loops (it leads back to itself)"),
    ("loop", "loop/inner", "is a symbolic link that loops"),  # a folder on the way
    ("dangling", "dangling", "is a symbolic link to 'nowhere/at/all', which does not exist"),
], ids=["loop", "loop-above", "dangling"])
def test_an_out_through_a_link_that_leads_nowhere_is_refused_before_any_work(
        tmp_path, monkeypatch, capsys, command, link, out, words):
    # (a loop gave train and demo a traceback, and evaluate scored everything first)
    monkeypatch.chdir(tmp_path)
    os.symlink("loop" if link == "loop" else "nowhere/at/all", link)
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "2+2=", "completion": "4"}))
    (tmp_path / "test.jsonl").write_text(json.dumps(
        {"question": "Which is a metal?", "choices": ["iron", "wood"], "answer": 0}))
    assert main([*command, "--out", out]) == 1
    error = capsys.readouterr().err
    assert f"--out '{out}': {tmp_path / link} {words}" in error and "name another path" in error
    assert sorted(os.listdir(tmp_path)) == sorted([link, "train.jsonl", "test.jsonl"])
