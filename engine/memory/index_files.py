"""Saved ANN indexes: slow-to-build indexes (HNSW, IVF-PQ) kept beside a SQLite store.

``<store>.index/table-<id>.faiss`` (and, for HNSW, ``table-<id>.slots.npy``) hold the index;
``table-<id>.json`` holds the fingerprint of the rows it was built from (version, row count,
id sum, kind, dimension) and the size and SHA-256 of each index file. SQL rows stay the truth:

* On open, an index whose fingerprint does not describe the rows (or that has none) is rebuilt
  from them. One whose files are damaged although the fingerprint matches (truncated, changed,
  of another kind or dimension, holding other ids), or whose fingerprint file is unreadable, is
  rebuilt too, with a :class:`SavedIndexWarning` naming the file. Files are read with
  ``faiss.read_index`` and ``numpy.load(allow_pickle=False)``: never pickle.
* Saving writes each file to a temporary file in the same directory, fsyncs it, renames it
  over the final name and fsyncs the directory. The old fingerprint is removed first and the
  new one written last, so a crash anywhere in between leaves no fingerprint and the next open
  rebuilds. Leftover temporary files (``*.tmp``) are never read and are removed by the next save.
* A per-table lock file (``table-<id>.lock``, ``flock``) keeps a reader from seeing a save
  half-done and lets a save know that any temporary file it finds belongs to a dead writer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from engine.atomic import fsync_dir
from engine.errors import one_line
from engine.memory.ann import AnnIndex, SavedIndexError
from engine.memory.vectors import Float32Array, Int64Array

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: saves are still atomic, just unlocked
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT = 2  # fingerprints without file digests (format 1) count as stale
TEMP_SUFFIX = ".tmp"
_ROW_FIELDS = {"format": int, "version": int, "rows": int, "id_sum": int, "kind": str, "dim": int}


class SavedIndexWarning(UserWarning):
    """A saved index file was damaged or unreadable and was rebuilt from the rows."""


def index_path(index_dir: Path | None, table_id: int) -> Path | None:
    """Where a table's index is saved (None: an in-memory or PostgreSQL store saves none)."""
    return None if index_dir is None else index_dir / f"table-{table_id}.faiss"


def remove_saved(index_dir: Path | None, table_id: int) -> None:
    if index_dir is not None:
        for path in index_dir.glob(f"table-{table_id}.*"):
            path.unlink(missing_ok=True)


def fingerprint(ids: Int64Array, version: int, kind: str, dim: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": version,
        "rows": len(ids),
        "id_sum": int(ids.sum()),
        "kind": kind,
        "dim": dim,
    }


def part_path(path: Path, part: str) -> Path:
    """The file of one part of the index saved at ``path`` (``table-<id>.faiss``)."""
    return path.with_suffix(part)


def file_digest(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file, as the fingerprint records them."""
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
        return {"bytes": os.fstat(file.fileno()).st_size, "sha256": digest}


# ---------------------------------------------------------------------------- opening
def open_index(
    index: AnnIndex,
    path: Path | None,
    expected: dict[str, Any],
    ids: Int64Array,
    keys: Float32Array,
    name: str,
) -> bool:
    """Load the saved index if it matches the rows, else build it from them.

    Returns True when a saved index existed but was stale or damaged (so it was rebuilt).
    """
    if path is None:
        index.rebuild(ids, keys)
        return False
    with _locked(path, exclusive=False):
        problem = _load_saved(index, path, expected, ids)
        if problem not in (None, "absent", "stale"):
            # Distrust it from now on (other processes rebuild quietly) until the next save.
            with suppress(OSError):
                path.with_suffix(".json").unlink(missing_ok=True)
    if problem is None:
        return False
    if problem == "stale":
        log.warning("memory table %s: saved index does not match its rows; rebuilding", name)
    elif problem != "absent":
        warnings.warn(
            f"memory table {name!r}: saved index {problem}; rebuilt it from the rows",
            SavedIndexWarning,
            stacklevel=3,
        )
    index.rebuild(ids, keys)
    return problem != "absent"


def _load_saved(
    index: AnnIndex, path: Path, expected: dict[str, Any], ids: Int64Array
) -> str | None:
    """Load the saved index into ``index``: None when it was used, else why not ("absent",
    "stale", or a description of the damage that names the file)."""
    fingerprint_path = path.with_suffix(".json")
    paths = {part: part_path(path, part) for part in index.parts}
    if not fingerprint_path.exists() and not fingerprint_path.is_symlink():
        return "stale" if any(p.exists() for p in paths.values()) else "absent"
    saved, files = _read_fingerprint(fingerprint_path)
    if saved is None:
        return f"fingerprint {fingerprint_path} is unreadable or damaged"
    if saved != expected:
        return "stale"
    if set(files) != set(paths):
        return f"fingerprint {fingerprint_path} lists files {sorted(files)}, not {sorted(paths)}"
    for part, part_file in paths.items():
        try:
            actual = file_digest(part_file)
        except OSError as exc:
            return f"file {part_file} is unreadable ({exc.strerror or exc})"
        if actual["bytes"] != files[part]["bytes"]:
            return (
                f"file {part_file} is damaged (it has {actual['bytes']} bytes, its "
                f"fingerprint says {files[part]['bytes']})"
            )
        if actual["sha256"] != files[part]["sha256"]:
            return f"file {part_file} is damaged (its contents changed since it was saved)"
    try:
        index.load(paths, ids)
    except SavedIndexError as exc:
        return f"file {paths.get(exc.part, path)} is damaged: {exc}"
    except Exception as exc:  # never let a damaged derived file stop the table from opening
        return f"file {paths[index.parts[0]]} is damaged: {one_line(exc)}"
    return None


def _read_fingerprint(path: Path) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(row fingerprint, file digests) of a fingerprint file; (None, {}) if malformed."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None, {}
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None, {}
    files = data.pop("files")
    if set(data) != set(_ROW_FIELDS) or any(
        type(data[field]) is not kind for field, kind in _ROW_FIELDS.items()
    ):
        return None, {}
    for digest in files.values():
        if (
            not isinstance(digest, dict)
            or set(digest) != {"bytes", "sha256"}
            or type(digest["bytes"]) is not int
            or not isinstance(digest["sha256"], str)
        ):
            return None, {}
    return data, files


# ---------------------------------------------------------------------------- saving
def save_index(index: AnnIndex, path: Path, current: dict[str, Any]) -> bool:
    """Save the index atomically, then its fingerprint. False: this kind is not saved now,
    or saving failed (with a warning; the next open rebuilds from the rows)."""
    parts = index.saved_parts()
    if not parts and not path.parent.is_dir():
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path, exclusive=True):
            _remove_leftovers(path)
            fingerprint_path = path.with_suffix(".json")
            if fingerprint_path.exists() or fingerprint_path.is_symlink():
                fingerprint_path.unlink()
                fsync_dir(path.parent)
            if not parts:
                return False
            _write_parts(index, path, parts, current)
    except (OSError, RuntimeError) as exc:  # faiss reports failed writes as RuntimeError
        warnings.warn(
            f"could not save the memory index {path} ({exc}); it will be rebuilt on next open",
            SavedIndexWarning,
            stacklevel=2,
        )
        return False
    return True


def _write_parts(
    index: AnnIndex, path: Path, parts: tuple[str, ...], current: dict[str, Any]
) -> None:
    temps: list[tuple[Path, Path]] = []
    try:
        files = {}
        for part in parts:
            final = part_path(path, part)
            temp = _new_temp(final)
            temps.append((temp, final))
            index.write_part(part, temp)
            files[part] = _fsync_and_digest(temp)
        for temp, final in temps:
            os.replace(temp, final)
        fsync_dir(path.parent)
        # Only now, with every index file in place, the fingerprint that vouches for them.
        text = json.dumps({**current, "files": files}).encode()
        _atomic_write_bytes(path.with_suffix(".json"), text)
    finally:
        for temp, _ in temps:
            temp.unlink(missing_ok=True)


def _new_temp(final: Path) -> Path:
    """A fresh, empty temporary file beside ``final`` (``<final name>.<random>.tmp``)."""
    temp = final.with_name(f"{final.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return temp


def _atomic_write_bytes(final: Path, data: bytes) -> None:
    temp = _new_temp(final)
    try:
        with temp.open("wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, final)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(final.parent)


def _fsync_and_digest(path: Path) -> dict[str, Any]:
    with path.open("rb") as file:
        os.fsync(file.fileno())
    return file_digest(path)


def _remove_leftovers(path: Path) -> None:
    """Temporary files of this table's index left by a writer that died mid-save (the
    exclusive lock guarantees no live writer owns one)."""
    stem = path.name.removesuffix(path.suffix)
    for leftover in path.parent.glob(f"{stem}.*{TEMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)


@contextmanager
def _locked(path: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold the table's index lock (shared: reading; exclusive: saving), if one can be had."""
    lock_path = path.with_suffix(".lock")
    if fcntl is None or not lock_path.parent.is_dir():
        yield
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # a read-only directory: no writer can be saving there either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock
