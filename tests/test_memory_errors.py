"""Bad input gets a clear one-line error and writes nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from engine.errors import InputError
from engine.memory import MAX_K, MemoryStore
from tests import memory_fixtures
from tests.memory_fixtures import random_rows

# Shared fixtures: the same test on SQLite and PostgreSQL.
store_url = memory_fixtures.store_url
postgres_url = memory_fixtures.postgres_url


def _unchanged(table, ids: np.ndarray, keys: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    exported_ids, exported_keys, _ = table.export_arrays()
    np.testing.assert_array_equal(exported_ids, ids)
    np.testing.assert_array_equal(exported_keys, keys)
    assert table.count() == len(ids)


def test_bad_vectors_are_refused_and_nothing_is_written(store_url: str) -> None:
    keys, values = random_rows(10, 8, 4, seed=1)
    with MemoryStore.open(store_url) as store:
        table = store.create_table("t", 8, 4)
        ids = table.insert(keys, values)
        bad_key = keys.copy()
        bad_key[3, 2] = np.nan
        cases = [
            (lambda: table.insert(keys[:, :7], values), "dimension 7, this table expects 8"),
            (lambda: table.insert(keys, values[:, :3]), "dimension 3"),
            (lambda: table.insert(bad_key, values), "NaN or infinite values \\(first at row 3\\)"),
            (lambda: table.insert(keys, np.full((10, 4), np.inf)), "NaN or infinite"),
            (lambda: table.insert(keys[:5], values), "5 keys but 10 values"),
            (lambda: table.insert(keys, values, labels=["a"]), "labels has 1 entries for 10"),
            (lambda: table.insert(keys, values, tags=["a,b"]), "tag 'a,b' is not allowed"),
            (lambda: table.insert(keys, values, meta={"x": object()}), "JSON"),
            (lambda: table.insert("text", values), "numeric array"),
            (lambda: table.query(keys[:, :3], 2), "dimension 3"),
            (lambda: table.query(bad_key, 2), "NaN"),
            (lambda: table.query(keys, 0), "k must be an integer between 1"),
            (lambda: table.query(keys, MAX_K + 1), "k must be an integer"),
            (lambda: table.query(keys, 2.5), "k must be an integer"),  # type: ignore[arg-type]
            (lambda: table.update([ids[0], 999_999], label="x"), "unknown ids .*999999"),
            (lambda: table.update(ids[:2], keys=keys[:3]), "2 ids but 3 keys"),
            (lambda: table.update(ids[:1], keys=bad_key[3:4]), "NaN"),
            (lambda: table.delete([ids[0], -5]), "unknown ids"),
            (lambda: table.delete([1.5]), "must be integers"),
            (lambda: table.get([123_456]), "unknown ids"),
            (lambda: table.evict(-1), "evict count"),
            (lambda: table.page(-1, 10), "offset"),
            (lambda: table.page(0, 10, colour="red"), "unknown filter 'colour'"),
            (lambda: table.page(0, 10, order_by="key"), "cannot order by"),
            (lambda: table.insert_novel(keys, values, float("nan")), "threshold"),
            (lambda: table.set_policy(lrfu_lambda=-1.0), "lambda"),
            (lambda: table.set_policy(capacity=0), "capacity"),
            (lambda: store.create_table("t", 8, 4), "already exists"),
            (lambda: store.create_table("u", 0, 4), "key_dim must be"),
            (lambda: store.create_table("u", 4, 4, index="lsh"), "unknown index kind 'lsh'"),
            (lambda: store.create_table("bad name!", 4, 4), "invalid table name"),
            (lambda: store.create_table("t", 8, 5, exist_ok=True), "exists with key_dim=8"),
            (lambda: store.table("missing"), "no memory table named 'missing'"),
        ]
        for call, message in cases:
            with pytest.raises(InputError, match=message) as info:
                call()
            assert "\n" not in str(info.value)
        _unchanged(table, ids, keys)
        assert table.get([ids[0]])[0].label is None
        assert store.table_names() == ["t"]


def test_failed_batch_leaves_no_partial_rows(store_url: str) -> None:
    keys, values = random_rows(10, 4, 2, seed=2)
    with MemoryStore.open(store_url) as store:
        table = store.create_table("t", 4, 2)
        ids = table.insert(keys, values)
        before = table.stats()["version"]
        with pytest.raises(InputError):
            table.delete([ids[0], ids[1], 10**9])  # two good ids, one unknown
        with pytest.raises(InputError):
            table.update([ids[2], 10**9], label="half")
        assert table.stats()["version"] == before
        _unchanged(table, ids, keys)
        assert table.count(label_contains="half") == 0


def test_foreign_and_corrupt_files_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.db"
    text.write_text("hello, this is not a database\n" * 10)
    with pytest.raises(InputError, match="not a memory store \\(not an SQLite database file\\)"):
        MemoryStore.open(text)
    assert text.read_text().startswith("hello")

    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(
        InputError, match="not a memory store: it holds other tables \\(customers\\)"
    ):
        MemoryStore.open(foreign)
    with sqlite3.connect(foreign) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert names == ["customers"]

    damaged = tmp_path / "damaged.db"
    with MemoryStore.open(damaged) as store:
        store.create_table("t", 4, 2).insert(*random_rows(50, 4, 2, seed=3))
    data = bytearray(damaged.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)
    damaged.write_bytes(bytes(data))
    (tmp_path / "damaged.db-wal").unlink(missing_ok=True)
    with pytest.raises(InputError, match=r"damaged\.db"):
        MemoryStore.open(damaged).table("t")

    with pytest.raises(InputError, match="is a directory"):
        MemoryStore.open(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        MemoryStore.open(tmp_path / "missing" / "m.db")
    with pytest.raises(InputError, match="unsupported memory store URL"):
        MemoryStore.open("mysql://localhost/db")


def test_closed_store_and_dropped_table(tmp_path: Path) -> None:
    store = MemoryStore.open(tmp_path / "m.db")
    table = store.create_table("t", 4, 2)
    store.drop_table("t")
    with pytest.raises(InputError, match="closed or was dropped"):
        table.insert(*random_rows(1, 4, 2, seed=4))
    store.close()
    with pytest.raises(InputError, match="closed"):
        store.table_names()
