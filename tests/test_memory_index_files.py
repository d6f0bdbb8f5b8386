"""Saved index files: damage is rebuilt from the rows with a warning; saves are atomic.

Real SQLite files and real faiss indexes. "Forged" damage also rewrites the fingerprint's file
digests, so the fingerprint still vouches for the damaged file and faiss itself (or the kind,
dimension and id checks) must catch it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pytest

from engine.memory import MemoryStore, index_files
from engine.memory import ann as ann_module
from engine.memory.index_files import SavedIndexWarning
from tests.memory_fixtures import brute_force_l2, random_rows

DIM = 16
ROWS = 300


def _saved_store(tmp_path: Path, kind: str = "hnsw", rows: int = ROWS) -> tuple[Path, np.ndarray]:
    """A store whose table "t" was closed with its index saved; returns (path, keys)."""
    path = tmp_path / "m.db"
    keys, values = random_rows(rows, DIM, 4, seed=1)
    with MemoryStore.open(path) as store:
        store.create_table("t", DIM, 4, index=kind).insert(keys, values)
    assert _file(path, ".json").exists()
    return path, keys


def _file(path: Path, part: str) -> Path:
    return path.with_name(path.name + ".index") / f"table-1{part}"


def _forge_digests(path: Path) -> None:
    """Make the fingerprint vouch for the index files as they are now."""
    fingerprint = _file(path, ".json")
    data = json.loads(fingerprint.read_text())
    data["files"] = {part: index_files.file_digest(_file(path, part)) for part in data["files"]}
    fingerprint.write_text(json.dumps(data))


def _hnsw(keys: np.ndarray) -> faiss.Index:
    index = faiss.IndexHNSWFlat(keys.shape[1], 32)
    index.add(keys)
    return index


def _check_exact_queries(path: Path, keys: np.ndarray, rebuilt: bool) -> None:
    """The table answers exactly like brute force over its rows (HNSW searched exhaustively)."""
    queries = np.concatenate([keys[::7], random_rows(20, DIM, 1, seed=9)[0]])
    with MemoryStore.open(path) as store:
        table = store.table("t")
        stats = table.stats()
        assert stats["index_rebuilt_on_open"] is rebuilt
        assert stats["index"]["ntotal"] == len(keys)
        table.tune(ef_search=4096)
        result = table.query(queries, 10, record_access=False)
        ids, _, _ = table.export_arrays()
    positions, distances = brute_force_l2(keys, queries, 10)
    np.testing.assert_array_equal(result.ids, ids[positions])
    np.testing.assert_allclose(result.distances, distances, rtol=1e-4, atol=1e-4)


def _reopens_cleanly(path: Path, keys: np.ndarray) -> None:
    """After the rebuild, the next close saved a good index: it loads with no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SavedIndexWarning)
        _check_exact_queries(path, keys, rebuilt=False)


def _write(part: str, data: Callable[[Path, np.ndarray], bytes]) -> Callable[..., None]:
    def damage(path: Path, keys: np.ndarray) -> None:
        target = _file(path, part)
        target.write_bytes(data(target, keys))

    return damage


def _write_index(part: str, make: Callable[[np.ndarray], faiss.Index]) -> Callable[..., None]:
    def damage(path: Path, keys: np.ndarray) -> None:
        faiss.write_index(make(keys), str(_file(path, part)))

    return damage


def _fewer_vectors(path: Path, keys: np.ndarray) -> None:
    faiss.write_index(_hnsw(keys[: len(keys) // 2]), str(_file(path, ".faiss")))
    slots = np.load(_file(path, ".slots.npy"))
    np.save(_file(path, ".slots.npy"), slots[: len(keys) // 2])


def _other_ids(path: Path, keys: np.ndarray) -> None:
    np.save(_file(path, ".slots.npy"), np.load(_file(path, ".slots.npy")) + 1000)


def _pickled_slots(path: Path, keys: np.ndarray) -> None:
    marker = path.with_name("unpickled")
    payload = np.array([_Boom(str(marker))] * len(keys), dtype=object)
    np.save(_file(path, ".slots.npy"), payload, allow_pickle=True)


class _Boom:
    """Unpickling this creates a marker file: proof that something used pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str, str]]:
        return (open, (self.marker, "w"))


DAMAGE = {
    "truncated": _write(".faiss", lambda f, _: f.read_bytes()[: f.stat().st_size // 2]),
    "random bytes": _write(".faiss", lambda f, _: np.random.default_rng(3).bytes(f.stat().st_size)),
    "zero length": _write(".faiss", lambda f, _: b""),
    "header then garbage": _write(".faiss", lambda f, _: f.read_bytes()[:64] + b"\xff" * 4096),
    "another kind": _write_index(".faiss", lambda k: faiss.IndexFlatL2(DIM)),
    "another dimension": _write_index(".faiss", lambda k: _hnsw(np.ascontiguousarray(k[:, :8]))),
    "fewer vectors": _fewer_vectors,
    "other row ids": _other_ids,
    "slots random bytes": _write(".slots.npy", lambda f, _: b"\x93NUMPY" + b"\x01" * 300),
    "slots pickled objects": _pickled_slots,
}


@pytest.mark.parametrize("forged", [False, True], ids=["digest-caught", "forged-digest"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_hnsw_file_is_rebuilt_with_a_warning(
    tmp_path: Path, damage: str, forged: bool
) -> None:
    path, keys = _saved_store(tmp_path)
    DAMAGE[damage](path, keys)
    if forged:
        _forge_digests(path)
    part = r"slots\.npy" if damage.startswith("slots") else r"(faiss|slots\.npy)"
    with pytest.warns(SavedIndexWarning, match=rf"table-1\.{part} is damaged.*rebuilt it") as got:
        _check_exact_queries(path, keys, rebuilt=True)
    assert len(got) == 1 and "\n" not in str(got[0].message)
    assert not path.with_name("unpickled").exists()
    _reopens_cleanly(path, keys)


def test_missing_index_part_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    path, keys = _saved_store(tmp_path)
    _file(path, ".slots.npy").unlink()
    with pytest.warns(SavedIndexWarning, match=r"table-1\.slots\.npy is unreadable"):
        _check_exact_queries(path, keys, rebuilt=True)
    _reopens_cleanly(path, keys)


FINGERPRINT_DAMAGE = {
    "binary garbage": b"\x00\xff\xfe garbage \x80",
    "truncated json": b'{"format": 2, "version": ',
    "a list": b"[1, 2, 3]",
    "no file digests": b'{"format": 2, "version": 1, "rows": 300}',
    "wrong types": None,  # filled in from the real fingerprint
}


@pytest.mark.parametrize("damage", list(FINGERPRINT_DAMAGE))
def test_damaged_fingerprint_is_rebuilt_with_a_warning(tmp_path: Path, damage: str) -> None:
    path, keys = _saved_store(tmp_path)
    fingerprint = _file(path, ".json")
    data = FINGERPRINT_DAMAGE[damage]
    if data is None:
        real = json.loads(fingerprint.read_text())
        data = json.dumps({**real, "rows": str(real["rows"])}).encode()
    fingerprint.write_bytes(data)
    with pytest.warns(SavedIndexWarning, match=r"fingerprint .*table-1\.json is unreadable"):
        _check_exact_queries(path, keys, rebuilt=True)
    _reopens_cleanly(path, keys)


def test_damage_is_reported_once_then_distrusted(tmp_path: Path) -> None:
    path, keys = _saved_store(tmp_path)
    _file(path, ".faiss").write_bytes(b"")
    with pytest.warns(SavedIndexWarning):
        first = MemoryStore.open(path)
        first.table("t")
    with warnings.catch_warnings():  # another process opening meanwhile rebuilds quietly
        warnings.simplefilter("error", SavedIndexWarning)
        _check_exact_queries(path, keys, rebuilt=True)
    first.close()
    _reopens_cleanly(path, keys)


def test_unusable_fingerprint_path_warns_on_save_and_open(tmp_path: Path) -> None:
    path, keys = _saved_store(tmp_path)
    fingerprint = _file(path, ".json")
    fingerprint.unlink()
    fingerprint.mkdir()  # neither readable as a file nor replaceable by one
    with pytest.warns(SavedIndexWarning) as got:
        _check_exact_queries(path, keys, rebuilt=True)
    messages = [str(w.message) for w in got]
    assert any("table-1.json is unreadable" in m for m in messages)
    assert any("could not save the memory index" in m for m in messages)


@pytest.mark.parametrize("damage", ["truncated", "another dimension", "fewer vectors"])
def test_damaged_ivfpq_file_is_rebuilt_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    monkeypatch.setattr(ann_module, "IVF_TRAIN_MIN_ROWS", 800)
    path, keys = _saved_store(tmp_path, "ivfpq", rows=1200)
    probe = keys[::5]
    with MemoryStore.open(path) as store:
        table = store.table("t")
        assert table.stats()["index"]["trained"] and not table.stats()["index_rebuilt_on_open"]
        before = table.query(probe, 5, record_access=False)
    target = str(_file(path, ".faiss"))
    if damage == "truncated":
        _file(path, ".faiss").write_bytes(_file(path, ".faiss").read_bytes()[:1000])
    else:
        dim, rows = (8, 1200) if damage == "another dimension" else (DIM, 900)
        quantizer = faiss.IndexFlatL2(dim)
        other = faiss.IndexIVFPQ(quantizer, dim, 16, 4, 4)
        sample = np.ascontiguousarray(keys[:rows, :dim])
        other.train(sample)
        other.add_with_ids(sample, np.arange(1, rows + 1))
        faiss.write_index(other, target)
        _forge_digests(path)
    with pytest.warns(SavedIndexWarning, match=r"table-1\.faiss is damaged.*rebuilt it"):
        store = MemoryStore.open(path)
        table = store.table("t")
    with store:
        info = table.stats()["index"]
        assert table.stats()["index_rebuilt_on_open"] and info["trained"]
        assert info["ntotal"] == 1200
        after = table.query(probe, 5, record_access=False)
    # The rebuilt index is the one a fresh build from the same rows gives: the same answers.
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_allclose(after.distances, before.distances, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(after.ids[:, 0], np.arange(1, 1201)[::5])


def test_reading_a_saved_index_never_unpickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, keys = _saved_store(tmp_path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used while reading a saved index")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    _reopens_cleanly(path, keys)


def test_save_writes_temp_files_then_renames_and_fingerprint_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, keys = _saved_store(tmp_path)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", f"{Path(src).name} -> {Path(dst).name}"))
        real_replace(src, dst)

    with MemoryStore.open(path) as store:
        store.table("t").insert(*random_rows(5, DIM, 4, seed=5))
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
    monkeypatch.undo()
    names = [f"{kind} {name}" for kind, name in events]
    index_dir = path.name + ".index"
    expected = [
        f"fsync {index_dir}",  # the old fingerprint's removal
        "fsync table-1.faiss.*.tmp",
        "fsync table-1.slots.npy.*.tmp",
        "replace table-1.faiss.*.tmp -> table-1.faiss",
        "replace table-1.slots.npy.*.tmp -> table-1.slots.npy",
        f"fsync {index_dir}",
        "fsync table-1.json.*.tmp",
        "replace table-1.json.*.tmp -> table-1.json",
        f"fsync {index_dir}",
    ]
    assert len(names) == len(expected), names
    for name, pattern in zip(names, expected, strict=True):
        regex = pattern.replace(".", r"\.").replace("*", r"[0-9a-f]+")
        assert re.fullmatch(regex, name), (name, pattern)
    assert not list(_file(path, "").parent.glob("*.tmp"))
    _check_exact_queries(path, np.concatenate([keys, random_rows(5, DIM, 4, seed=5)[0]]), False)


def test_leftover_temp_files_are_ignored_then_cleaned_up(tmp_path: Path) -> None:
    path, keys = _saved_store(tmp_path)
    index_dir = _file(path, "").parent
    leftovers = [index_dir / "table-1.faiss.0123abcd.tmp", index_dir / "table-1.json.99.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half a file")
    other_table = index_dir / "table-10.faiss.0123abcd.tmp"
    other_table.write_bytes(b"not ours")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SavedIndexWarning)
        _check_exact_queries(path, keys, rebuilt=False)  # and the close saved again
    assert not any(leftover.exists() for leftover in leftovers)
    assert other_table.exists()
