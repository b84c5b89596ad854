"""Writing files so that a failure leaves no half-written one: `write_new_file` (create,
write, fsync), `write_file_atomically` (replace a file through a temporary one and a
rename), `fsync_directory` (make renames durable) and `remove_quietly`. config.py writes
moa_config.json with them, serialization.py the adapter's two files."""

from __future__ import annotations

import os
import secrets


def write_new_file(path: str, data: bytes) -> None:
    """Create `path` (it must not exist), write `data` and fsync it."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_directory(directory: str) -> None:
    """Make renames in `directory` durable; best effort where directories cannot be opened
    or fsynced (Windows, some network and FUSE filesystems)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_file_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` by a file holding `data`: written and fsynced under a temporary name in
    the same directory, then renamed over `path`. On any failure `path` is as it was and the
    temporary file is gone."""
    path = os.fspath(path)
    directory, name = os.path.split(path)
    while True:
        temporary = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            write_new_file(temporary, data)
            break
        except FileExistsError:
            continue
        except BaseException:
            remove_quietly(temporary)
            raise
    try:
        os.replace(temporary, path)
    except BaseException:
        remove_quietly(temporary)
        raise
    fsync_directory(directory or ".")


def remove_quietly(path: str) -> None:
    """Remove the file `path`; nothing if it does not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


__all__ = ["fsync_directory", "remove_quietly", "write_file_atomically", "write_new_file"]
