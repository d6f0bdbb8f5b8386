"""The store against a brute-force in-memory reference, driven by hypothesis.

Inserts (with capacity eviction), queries (with LRFU access bookkeeping), deletes, explicit
evictions and recombinations on an exact index; after every step the rows, the query answers,
the merges and the evicted ids must agree with the reference.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.memory import MemoryStore

DIM, VDIM, CAPACITY, FRACTION = 4, 2, 24, 0.125


class Reference:
    """Plain dict-of-rows memory with the documented semantics."""

    def __init__(self, lam: float) -> None:
        self.lam = lam
        self.clock = 0
        self.rows: dict[int, dict[str, Any]] = {}

    def score(self, row: dict[str, Any]) -> float:
        return row["crf"] * 2.0 ** (-self.lam * (self.clock - row["tick"]))

    def eviction(self, count: int, fresh: list[int]) -> list[int]:
        old = sorted(
            (i for i in self.rows if i not in fresh), key=lambda i: (self.score(self.rows[i]), i)
        )
        chosen = old[:count] + sorted(fresh)[: max(0, count - len(old))]
        return sorted(chosen)

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.array(sorted(self.rows), dtype=np.int64)
        keys = np.array([self.rows[i]["key"] for i in ids], dtype=np.float64).reshape(-1, DIM)
        d2 = ((queries[:, None, :].astype(np.float64) - keys[None]) ** 2).sum(-1)
        order = np.argsort(d2, axis=1, kind="stable")[:, :k]
        found = ids[order]
        dist = np.take_along_axis(d2, order, axis=1)
        pad = k - found.shape[1]
        if pad > 0:
            found = np.pad(found, ((0, 0), (0, pad)), constant_values=-1)
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
        return found, dist

    def access(self, ids: np.ndarray) -> None:
        self.clock += 1
        hit, counts = np.unique(ids[ids >= 0], return_counts=True)
        for i, c in zip(hit.tolist(), counts.tolist(), strict=True):
            row = self.rows[i]
            row["crf"] = self.score(row) + c
            row["tick"] = self.clock
            row["count"] += c


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory()
        self.store = MemoryStore.open(Path(self.folder.name) / "m.db")
        self.table = self.store.create_table(
            "t", DIM, VDIM, capacity=CAPACITY, evict_fraction=FRACTION, lrfu_lambda=0.0
        )
        self.ref = Reference(0.0)

    def teardown(self) -> None:
        self.store.close()
        self.folder.cleanup()

    def _rows(self, count: int, seed: int, near_existing: bool) -> np.ndarray:
        rng = np.random.default_rng(seed)
        keys = rng.normal(size=(count, DIM))
        if near_existing and self.ref.rows:
            existing = np.array([r["key"] for r in self.ref.rows.values()])
            keys = existing[rng.integers(0, len(existing), count)] + 0.2 * keys
        return keys.astype(np.float32)

    @rule(lam=st.sampled_from([0.0, 0.3, 3.0]))
    def set_lambda(self, lam: float) -> None:
        self.table.set_policy(lrfu_lambda=lam)
        self.ref.lam = lam

    @rule(count=st.integers(1, 8), seed=st.integers(0, 10**6), near=st.booleans())
    def insert(self, count: int, seed: int, near: bool) -> None:
        keys = self._rows(count, seed, near)
        values = np.random.default_rng(seed + 1).normal(size=(count, VDIM)).astype(np.float32)
        ids = self.table.insert(keys, values)
        assert len(ids) == count and all(i not in self.ref.rows for i in ids.tolist())
        for i, key, value in zip(ids.tolist(), keys, values, strict=True):
            self.ref.rows[i] = {
                "key": key.astype(np.float64),
                "value": value.astype(np.float64),
                "crf": 1.0,
                "tick": self.ref.clock,
                "count": 0,
            }
        total = len(self.ref.rows)
        if total > CAPACITY:
            evict = self.ref.eviction(total - CAPACITY + int(CAPACITY * FRACTION), ids.tolist())
            for i in evict:
                del self.ref.rows[i]

    @rule(count=st.integers(1, 6), k=st.integers(1, 30), seed=st.integers(0, 10**6))
    def query(self, count: int, k: int, seed: int) -> None:
        queries = self._rows(count, seed, near_existing=False)
        result = self.table.query(queries, k)
        expected_ids, expected_d = self.ref.top_k(queries, k)
        np.testing.assert_array_equal(result.ids, expected_ids)
        finite = np.isfinite(expected_d)
        np.testing.assert_allclose(
            result.distances[finite], expected_d[finite], rtol=1e-4, atol=1e-4
        )
        assert np.isinf(result.distances[~finite]).all()
        self.ref.access(expected_ids)

    @precondition(lambda self: len(self.ref.rows) > 0)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.ref.rows)), min_size=1, max_size=4))
        self.table.delete(ids)
        for i in set(ids):
            del self.ref.rows[i]

    @rule(count=st.integers(0, 5))
    def evict(self, count: int) -> None:
        expected = self.ref.eviction(min(count, len(self.ref.rows)), [])
        evicted = self.table.evict(count)
        assert evicted.tolist() == expected
        for i in expected:
            del self.ref.rows[i]

    @precondition(lambda self: len(self.ref.rows) > 1)
    @rule(
        seed=st.integers(0, 10**6), k=st.integers(2, 4), distance=st.sampled_from([0.1, 0.5, 2.0])
    )
    def recombine(self, seed: int, k: int, distance: float) -> None:
        queries = self._rows(2, seed, near_existing=True)
        result = self.table.query(queries, k, record_access=False)
        found, _ = self.ref.top_k(queries, k)
        np.testing.assert_array_equal(result.ids, found)
        groups = self.table.recombine(result, distance)
        expected = self._reference_groups(found, distance)
        assert groups == expected
        for kept, members in expected:
            rows = [self.ref.rows[i] for i in [kept, *members]]
            weights = np.array([r["count"] + 1 for r in rows], dtype=np.float64)
            merged = self.ref.rows[kept]
            merged["key"] = (np.array([r["key"] for r in rows]) * weights[:, None]).sum(
                0
            ) / weights.sum()
            merged["value"] = (np.array([r["value"] for r in rows]) * weights[:, None]).sum(
                0
            ) / weights.sum()
            merged["crf"] = sum(self.ref.score(r) for r in rows)
            merged["count"] = sum(r["count"] for r in rows)
            merged["tick"] = self.ref.clock
            for i in members:
                del self.ref.rows[i]

    def _reference_groups(self, found: np.ndarray, distance: float) -> list[tuple[int, list[int]]]:
        parent = {i: i for i in found[found >= 0].tolist()}

        def root(i: int) -> int:
            while parent[i] != i:
                i = parent[i]
            return i

        for row in found:
            live = [i for i in row.tolist() if i >= 0]
            for a in range(len(live)):
                for b in range(a + 1, len(live)):
                    ka, kb = self.ref.rows[live[a]]["key"], self.ref.rows[live[b]]["key"]
                    if ((ka - kb) ** 2).sum() <= distance:
                        ra, rb = root(live[a]), root(live[b])
                        parent[max(ra, rb)] = min(ra, rb)
        groups: dict[int, list[int]] = {}
        for i in parent:
            if root(i) != i:
                groups.setdefault(root(i), []).append(i)
        return sorted((kept, sorted(members)) for kept, members in groups.items())

    @invariant()
    def rows_match(self) -> None:
        ids, keys, values = self.table.export_arrays()
        assert ids.tolist() == sorted(self.ref.rows)
        if len(ids):
            np.testing.assert_allclose(
                keys, [self.ref.rows[i]["key"] for i in ids.tolist()], atol=1e-5
            )
            np.testing.assert_allclose(
                values, [self.ref.rows[i]["value"] for i in ids.tolist()], atol=1e-5
            )
        assert len(self.table) <= CAPACITY

    @rule()
    def access_counts_in_sql(self) -> None:
        rows = self.table.page(0, 1000)
        assert {r.id: r.access_count for r in rows} == {
            i: r["count"] for i, r in self.ref.rows.items()
        }


StoreMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStoreAgainstReference = StoreMachine.TestCase
