"""Atomic file writes and careful reads of the small files other processes write.

Writes go to a temporary file in the same directory, are flushed to disk, then moved into
place with ``os.replace`` (and the directory entry is synced too), so a crash (or ``kill -9``)
mid-write leaves the previous file intact. Reads of the small files other processes write
(state, control, job, report, checkpoint manifest) go through :func:`read_regular`, which
refuses anything but a regular file of bounded size: a planted FIFO or ``/dev/zero`` in a
run directory must not hang a reader or fill its memory. Kept free of torch and of every
other engine package, so that distillation runs and the memory store share it.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMALL_FILE_BYTES = 16 * 1024 * 1024  # state, control, job, report: a few hundred bytes


class UnreadableFileError(OSError):
    """A run-directory file that is not a regular file, or is larger than its kind can be."""


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every filesystem allows it)."""
    try:
        handle = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_write(path: Path, write: Callable[[Any], None], *, binary: bool = True) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        mode = "wb" if binary else "w"
        encoding = None if binary else "utf-8"
        with os.fdopen(handle, mode, encoding=encoding) as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda file: file.write(text), binary=False)


def read_regular(path: Path, limit: int = SMALL_FILE_BYTES) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``limit`` bytes.

    Opened without blocking (a FIFO opens at once and is then refused) and without following
    a final symbolic link. Raises FileNotFoundError when it is missing, and
    :class:`UnreadableFileError` (an OSError) when it is something else or too large."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        handle = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnreadableFileError(exc.errno, f"cannot open it ({exc.strerror})") from None
    with os.fdopen(handle, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFileError(0, "it is not a regular file")
        if info.st_size > limit:
            raise UnreadableFileError(0, f"it is larger than {limit:,} bytes")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise UnreadableFileError(0, f"it is larger than {limit:,} bytes")
    return data


def read_json(path: Path, limit: int = SMALL_FILE_BYTES) -> Any:
    """The JSON value in ``path`` (see :func:`read_regular`).

    Raises FileNotFoundError when it is missing and ValueError (with a short reason) for
    anything else that keeps it from being read: not a regular file, too large, not UTF-8,
    not JSON, nested too deep, a number too long to convert."""
    try:
        data = read_regular(path, limit)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ValueError(exc.strerror or str(exc)) from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("it is not UTF-8 text") from None
    except RecursionError:
        raise ValueError("it is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise ValueError(f"it is not valid JSON ({' '.join(str(exc).split())[:200]})") from None


def swap_directory(staging: Path, final: Path) -> None:
    """Put the fully written directory ``staging`` at ``final``: a rename when ``final`` does
    not exist, else rename the old one aside, rename the new one in, and delete the old. A
    crash leaves either the old directory or the new one at ``final`` (or the old one aside,
    beside it), never a half-written one."""
    import shutil
    import uuid

    if final.exists():
        trash = final.parent / f".{final.name}.trash-{uuid.uuid4().hex[:8]}"
        final.rename(trash)
        staging.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(final)
