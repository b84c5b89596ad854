"""moa/cli/outputs.py: atomic writes say which file could not be written."""

import tempfile

import pytest

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
