"""Core behaviour of the memory store, on SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest

from engine.memory import MemoryStore, QueryResult
from engine.memory import ann as ann_module
from tests import memory_fixtures
from tests.memory_fixtures import brute_force_l2, random_rows

# Shared fixtures: the same test on SQLite and PostgreSQL.
store_url = memory_fixtures.store_url
postgres_url = memory_fixtures.postgres_url


def test_insert_query_matches_brute_force(store_url: str) -> None:
    keys, values = random_rows(500, 16, 8, seed=1)
    queries, _ = random_rows(40, 16, 8, seed=2)
    with MemoryStore.open(store_url) as store:
        table = store.create_table("layer0", 16, 8)
        ids = table.insert(keys, values)
        assert ids.dtype == np.int64 and len(np.unique(ids)) == 500
        result = table.query(queries, 10)
        assert isinstance(result, QueryResult)
        assert result.ids.shape == (40, 10) and result.keys.shape == (40, 10, 16)
        positions, distances = brute_force_l2(keys, queries, 10)
        np.testing.assert_array_equal(result.ids, ids[positions])
        np.testing.assert_allclose(result.distances, distances, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(result.keys, keys[positions])
        np.testing.assert_array_equal(result.values, values[positions])


def test_fewer_rows_than_k_pads_with_minus_one(store_url: str) -> None:
    keys, values = random_rows(3, 4, 2, seed=3)
    with MemoryStore.open(store_url) as store:
        table = store.create_table("small", 4, 2)
        table.insert(keys, values)
        result = table.query(keys[:1], 5)
        assert (result.ids[0, :3] >= 0).all() and (result.ids[0, 3:] == -1).all()
        assert np.isinf(result.distances[0, 3:]).all()
        assert not result.keys[0, 3:].any() and not result.values[0, 3:].any()
        empty = store.create_table("empty", 4, 2)
        assert (empty.query(keys, 2).ids == -1).all()


@pytest.mark.parametrize("kind", ["flat-l2", "hnsw", "ivfpq"])
def test_deleted_entries_leave_the_index(store_url: str, kind: str) -> None:
    keys, values = random_rows(200, 8, 4, seed=4)
    with MemoryStore.open(store_url) as store:
        table = store.create_table("t", 8, 4, index=kind)
        ids = table.insert(keys, values)
        table.delete(ids[:50])
        result = table.query(keys[:50], 200)
        assert not np.isin(result.ids, ids[:50]).any()
        assert (result.ids >= 0).sum(axis=1).tolist() == [150] * 50
        assert len(table) == 150 and table.count() == 150
        exported_ids, exported_keys, _ = table.export_arrays()
        np.testing.assert_array_equal(exported_ids, ids[50:])
        np.testing.assert_array_equal(exported_keys, keys[50:])


def test_flat_ip_ranks_by_inner_product(store_url: str) -> None:
    keys, values = random_rows(100, 8, 4, seed=5)
    with MemoryStore.open(store_url) as store:
        table = store.create_table("ip", 8, 4, index="flat-ip")
        ids = table.insert(keys, values)
        result = table.query(keys[:5], 3)
        expected = np.argsort(-(keys[:5] @ keys.T), axis=1)[:, :3]
        np.testing.assert_array_equal(result.ids, ids[expected])


def test_update_keys_values_and_labels(store_url: str) -> None:
    keys, values = random_rows(50, 8, 4, seed=6)
    with MemoryStore.open(store_url) as store:
        table = store.create_table("t", 8, 4)
        ids = table.insert(keys, values, labels="old", tags=["a"])
        target = np.full((1, 8), 100.0, dtype=np.float32)
        table.update(ids[:1], keys=target, values=np.ones((1, 4), np.float32), label="new")
        table.update(ids[1:3], tags=["b", "c"], meta={"source": "edit"})
        hit = table.query(target, 1)
        assert hit.ids[0, 0] == ids[0] and hit.values[0, 0].tolist() == [1.0] * 4
        assert table.query(keys[:1], 1).ids[0, 0] != ids[0]  # the old key is gone
        row = table.get([ids[0]])[0]
        assert row.label == "new" and row.key.tolist() == [100.0] * 8
        edited = table.get(ids[1:3])
        assert [r.tags for r in edited] == [["b", "c"], ["b", "c"]]
        assert edited[0].meta == {"source": "edit"}
        table.update(ids[:1], label="")
        assert table.get([ids[0]])[0].label is None


def test_page_and_filters(store_url: str) -> None:
    keys, values = random_rows(30, 4, 2, seed=7)
    with MemoryStore.open(store_url) as store:
        table = store.create_table("t", 4, 2)
        labels = [f"Fact number {i}" for i in range(30)]
        tags = [["even"] if i % 2 == 0 else ["odd", "x"] for i in range(30)]
        ids = table.insert(keys, values, labels=labels, tags=tags, provenance="unit-test")
        table.query(keys[:3], 1)  # ids[0..2] get one access each
        assert [r.id for r in table.page(0, 5)] == ids[:5].tolist()
        assert [r.id for r in table.page(5, 5)] == ids[5:10].tolist()
        assert all(r.id % 2 == ids[0] % 2 for r in table.page(0, 100, tag="even"))
        assert table.count(tag="odd") == 15 and table.count(tag="x") == 15
        assert table.count(tag="od") == 0  # whole tags only
        assert [r.label for r in table.page(0, 100, label_contains="NUMBER 1")] == [
            "Fact number 1",
            *[f"Fact number {i}" for i in range(10, 20)],
        ]
        accessed = table.page(0, 100, min_access=1)
        assert sorted(r.id for r in accessed) == ids[:3].tolist()
        assert table.page(0, 2, order_by="access_count", descending=True)[0].access_count == 1
        ranged = table.page(0, 100, id_min=int(ids[10]), id_max=int(ids[12]))
        assert [r.id for r in ranged] == ids[10:13].tolist()
        assert ranged[0].provenance == "unit-test"


def test_rows_survive_reopen_with_access_statistics(store_url: str) -> None:
    keys, values = random_rows(64, 8, 4, seed=8)
    with MemoryStore.open(store_url) as store:
        table = store.create_table("t", 8, 4, index="hnsw", capacity=1000, lrfu_lambda=0.5)
        ids = table.insert(keys, values)
        table.query(keys[:4], 1)
        table.query(keys[:2], 1)
    with MemoryStore.open(store_url) as store:
        assert store.table_names() == ["t"]
        table = store.table("t")
        assert table.capacity == 1000 and table.lrfu_lambda == 0.5
        assert len(table) == 64
        counts = {row.id: row.access_count for row in table.get(ids[:5])}
        assert counts == {ids[0]: 2, ids[1]: 2, ids[2]: 1, ids[3]: 1, ids[4]: 0}
        np.testing.assert_array_equal(table.query(keys, 1).ids[:, 0], ids)


def test_recombine_merges_near_duplicates(store_url: str) -> None:
    with MemoryStore.open(store_url) as store:
        table = store.create_table("t", 2, 1)
        keys = np.array([[0, 0], [0.1, 0], [5, 5], [5.1, 5], [20, 20]], dtype=np.float32)
        values = np.array([[1], [3], [10], [20], [7]], dtype=np.float32)
        ids = table.insert(keys, values)
        table.query(keys[1:2], 1)  # ids[1] accessed once -> weight 2 against 1
        result = table.query(keys[[0, 2, 4]], 2, record_access=False)
        groups = table.recombine(result, distance=0.5)
        assert groups == [(int(ids[0]), [int(ids[1])]), (int(ids[2]), [int(ids[3])])]
        assert len(table) == 3
        merged = table.get([ids[0]])[0]
        np.testing.assert_allclose(merged.key, [0.2 / 3, 0], atol=1e-6)
        np.testing.assert_allclose(merged.value, [7 / 3], atol=1e-5)
        assert merged.access_count == 1
        np.testing.assert_allclose(table.get([ids[2]])[0].value, [15.0])
        assert table.query(np.array([[0.1, 0]], np.float32), 1).ids[0, 0] == ids[0]
        assert table.recombine(table.query(keys, 2), distance=0.5) == []


def test_insert_novel_only_inserts_far_keys(store_url: str) -> None:
    with MemoryStore.open(store_url) as store:
        table = store.create_table("t", 2, 1)
        table.insert(np.array([[0, 0]], np.float32), np.zeros((1, 1), np.float32))
        new = np.array([[0.1, 0], [3, 0], [0, -0.2], [0, 4]], dtype=np.float32)
        ids = table.insert_novel(
            new, np.ones((4, 1), np.float32), threshold=1.0, labels=list("abcd")
        )
        assert (ids[[0, 2]] == -1).all() and (ids[[1, 3]] > 0).all()
        assert [r.label for r in table.get(ids[[1, 3]])] == ["b", "d"]
        assert len(table) == 3


def test_lrfu_lambda_zero_evicts_least_frequent(store_url: str) -> None:
    keys, values = random_rows(10, 4, 2, seed=9)
    with MemoryStore.open(store_url) as store:
        table = store.create_table("t", 4, 2, lrfu_lambda=0.0)
        ids = table.insert(keys, values)
        for _ in range(3):
            table.query(keys[:1], 1)  # ids[0]: 3 accesses, long ago
        for _ in range(5):
            table.query(keys[1:5], 1)  # ids[1..4]: 5 accesses each, recent
        table.query(keys[5:10], 1)  # ids[5..9]: 1 access each, most recent
        evicted = table.evict(5)
        np.testing.assert_array_equal(evicted, ids[5:10])
        table.set_policy(lrfu_lambda=5.0)  # nearly LRU: the old, frequent ids[0] goes first
        np.testing.assert_array_equal(table.evict(1), ids[:1])


def test_capacity_evicts_in_batches(store_url: str) -> None:
    keys, values = random_rows(150, 4, 2, seed=10)
    with MemoryStore.open(store_url) as store:
        table = store.create_table("t", 4, 2, capacity=100, evict_fraction=0.1)
        ids = table.insert(keys[:100], values[:100])
        table.query(keys[:50], 1)  # the first 50 are used, the rest never
        fresh = table.insert(keys[100:101], values[100:101])
        assert len(table) == 90  # 101 -> capacity minus a 10% slack
        survivors = table.export_arrays()[0]
        assert np.isin(ids[:50], survivors).all()  # used entries stay
        assert fresh[0] in survivors  # the fresh entry stays
        table.insert(keys[101:111], values[101:111])
        assert len(table) == 100  # no eviction until the capacity is passed again
        with pytest.raises(ValueError, match="capacity"):
            table.insert(keys[:101], values[:101])


def test_ivfpq_trains_and_keeps_high_recall(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ann_module, "IVF_TRAIN_MIN_ROWS", 800)
    keys, values = random_rows(1200, 16, 2, seed=11)
    with MemoryStore.open(store_url) as store:
        table = store.create_table("t", 16, 2, index="ivfpq")
        ids = table.insert(keys[:500], values[:500])
        assert table.stats()["index"]["trained"] is False
        ids = np.concatenate([ids, table.insert(keys[500:], values[500:])])
        info = table.stats()["index"]
        assert info["trained"] is True and info["ntotal"] == 1200
        table.delete(ids[:10])
        table.tune(nprobe=info["nlist"])  # every list: what is left is PQ error, re-ranked away
        result = table.query(keys[:100], 5)
        assert not np.isin(result.ids, ids[:10]).any()
        positions, _ = brute_force_l2(keys[10:], keys[:100], 5)
        expected = ids[10:][positions]
        recall = np.mean(
            [len(set(a) & set(b)) / 5 for a, b in zip(result.ids, expected, strict=True)]
        )
        assert recall > 0.9
        exact_rows = result.ids >= 0
        true_d = ((result.keys - keys[:100, None, :]) ** 2).sum(-1)
        np.testing.assert_allclose(result.distances[exact_rows], true_d[exact_rows], rtol=1e-4)


def test_tables_are_independent_and_droppable(store_url: str) -> None:
    keys, values = random_rows(20, 4, 2, seed=12)
    with MemoryStore.open(store_url) as store:
        a = store.create_table("a", 4, 2)
        b = store.create_table("b", 4, 2, index="hnsw")
        a.insert(keys, values)
        b.insert(keys[:5], values[:5])
        assert store.table_names() == ["a", "b"] and len(a) == 20 and len(b) == 5
        assert store.create_table("a", 4, 2, exist_ok=True) is a
        store.drop_table("a")
        assert store.table_names() == ["b"]
        with pytest.raises(ValueError, match="no memory table"):
            store.table("a")
        stats = b.stats()
        assert stats["rows"] == 5 and stats["index"]["kind"] == "hnsw"
