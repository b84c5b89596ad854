"""The output folder of `moa train` and `moa demo`: what a run leaves there, and the checks
made before any long work starts, so that a run never writes over its inputs or over another
run, and a folder that cannot be written fails at once instead of after the training.

A run's entries are RUN_ENTRIES (train: adapter/, checkpoints/, log_history.json,
train_options.json, loss.png; demo: adapter/, loss.png and the two router plots). A folder
holding any of them (an empty folder aside) holds another run: the commands refuse it unless
told to continue it (`moa train --resume`) or to replace it (`--overwrite`, which removes
those entries and nothing else). write_json_atomic and write_text_atomic write a file whole
or not at all (a temporary file beside it, renamed onto it).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

CHECKPOINTS = "checkpoints"
RUN_ENTRIES = ("adapter", CHECKPOINTS, "log_history.json", "train_options.json", "loss.png",
               "mean_gate.png", "active_rate.png")


def previous_run(out: str | os.PathLike) -> list[str]:
    """The RUN_ENTRIES that `out` holds, in RUN_ENTRIES' order (an empty folder holds nothing
    to lose and does not count)."""
    out = Path(out)
    found = []
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            if any(path.iterdir()):
                found.append(name)
        elif path.exists() or path.is_symlink():
            found.append(name)
    return found


def describe_entries(out: str | os.PathLike, names: list[str]) -> str:
    """`names` as they read in a message: folders with a trailing slash."""
    return ", ".join(name + "/" if (Path(out) / name).is_dir() else name for name in names)


def remove_previous_run(out: str | os.PathLike) -> list[str]:
    """Remove the RUN_ENTRIES in `out` (only those: anything else there stays); the names
    removed."""
    out = Path(out)
    removed = previous_run(out)
    for name in removed:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def check_links_lead_somewhere(out: str | os.PathLike, flag: str = "--out") -> None:
    """ValueError when `out`, or a folder on the way to it, is a symbolic link that leads
    nowhere: one that loops, or one to a path that does not exist (nothing can be made
    through it, and the existence checks that follow would take it for a free path)."""
    path = Path(os.path.abspath(out))
    for part in (*reversed(path.parents), path):
        if not part.is_symlink():
            continue
        try:
            os.stat(part)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise ValueError(f"{flag} {os.fspath(out)!r}: {part} is a symbolic link that "
                                 "loops (it leads back to itself); name another path") from None
            if error.errno == errno.ENOENT:
                raise ValueError(f"{flag} {os.fspath(out)!r}: {part} is a symbolic link to "
                                 f"{os.readlink(part)!r}, which does not exist; create it, or "
                                 "name another path") from None
            raise


def check_not_an_input(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]
                       ) -> None:
    """ValueError when the output folder `out` is one of `inputs` ({flag: path}; None for a
    flag not given) or contains one: outputs never go where the inputs are; and when a link
    on the way to `out` leads nowhere (check_links_lead_somewhere)."""
    check_links_lead_somewhere(out)
    folder = Path(out).resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        target = Path(path).resolve()
        if target == folder or folder in target.parents:
            relation = "is" if target == folder else "holds"
            raise ValueError(f"--out {os.fspath(out)} {relation} the input {flag} "
                             f"{os.fspath(path)}; the outputs must go elsewhere: choose "
                             "another --out")


def check_writable(out: str | os.PathLike, files: tuple[str, ...] = RUN_ENTRIES) -> None:
    """Create `out` (and its parents) if needed, and check that it can be written: a probe
    file is created and removed in it and in each of its `files` that is an existing folder,
    and each of `files` that is an existing file must be writable. OSError with one line
    naming the place otherwise."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the output folder {out}: "
                      f"{error.strerror or error}; choose another --out") from error
    folders = [out] + [out / name for name in files if (out / name).is_dir()]
    for folder in folders:
        try:
            descriptor, probe = tempfile.mkstemp(prefix=".moa-write-probe-", dir=folder)
            os.close(descriptor)
            os.unlink(probe)
        except OSError as error:
            raise OSError(f"cannot write into {folder}: {error.strerror or error}; choose "
                          "another --out") from error
    for name in files:
        path = out / name
        if path.is_file() and not os.access(path, os.W_OK):
            raise PermissionError(f"cannot write {path}: it is read-only; choose another "
                                  "--out")


def write_json_atomic(path: Path, data, indent: int | None = 2) -> Path:
    """Write JSON to a temporary file beside `path`, then rename it over `path`: a reader
    (or a rerun after a crash) sees the old file or the new one, never a part."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_text_atomic(path: Path, content: str) -> Path:
    """As write_json_atomic, for text. An error of the folder (read-only, no space, not a
    folder) names `path`, not the temporary file beside it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                                             suffix=".tmp")
    except OSError as error:
        raise type(error)(error.errno, f"cannot write here: {error.strerror}",
                          str(path)) from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(content)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


__all__ = ["CHECKPOINTS", "RUN_ENTRIES", "check_links_lead_somewhere", "check_not_an_input",
           "check_writable", "describe_entries", "previous_run", "remove_previous_run",
           "write_json_atomic", "write_text_atomic"]
