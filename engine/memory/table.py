"""One named memory table: SQL rows (truth) mirrored in memory beside a derived faiss index.

The mirror (ids sorted, keys, values, access statistics) serves queries without touching SQL.
Every write is one transaction that first catches up with other processes' commits (by the
table's version counter), then writes rows, bumps the version and flushes pending access
statistics; the mirror and index change only after the commit succeeded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from engine.errors import InputError
from engine.memory import filters as row_filters
from engine.memory.ann import AnnIndex, make_index, read_fingerprint, write_fingerprint
from engine.memory.columns import GrowableColumns
from engine.memory.database import read_transaction, write_transaction
from engine.memory.lrfu import check_lambda, decayed, eviction_order
from engine.memory.recombination import group_members, merge_groups
from engine.memory.records import (
    MemoryRow,
    QueryResult,
    empty_result,
    label_column,
    meta_column,
    provenance_column,
    tags_column,
)
from engine.memory.schema import MemoryEntry, MemoryTableRow, MemoryTombstone, StoreInfo
from engine.memory.vectors import Float32Array, Int64Array, as_ids, as_matrix, from_blobs, to_blobs

if TYPE_CHECKING:
    from engine.memory.store import MemoryStore

log = logging.getLogger(__name__)

MAX_K = 4096
STATS_FLUSH_INTERVAL_S = 5.0
LOAD_CHUNK_ROWS = 65_536

ENTRY = MemoryEntry.__table__  # type: ignore[attr-defined]
TABLES = MemoryTableRow.__table__  # type: ignore[attr-defined]
TOMBSTONES = MemoryTombstone.__table__  # type: ignore[attr-defined]
INFO = StoreInfo.__table__  # type: ignore[attr-defined]

INSERT_COLUMNS = (
    "id",
    "table_id",
    "key",
    "value",
    "created",
    "last_access",
    "access_count",
    "crf",
    "last_tick",
    "label",
    "tags",
    "meta",
    "provenance",
    "version",
)
MIRROR_COLUMNS = (
    "id",
    "key",
    "value",
    "created",
    "last_access",
    "access_count",
    "crf",
    "last_tick",
)


class MemoryTable:
    """Batched kNN table. Obtain through :meth:`MemoryStore.create_table` / :meth:`table`."""

    def __init__(self, store: MemoryStore, row: dict[str, Any]) -> None:
        self._store = store
        self._engine = store.engine
        self.table_id: int = row["id"]
        self.name: str = row["name"]
        self.key_dim: int = row["key_dim"]
        self.value_dim: int = row["value_dim"]
        self.index_kind: str = row["index_kind"]
        self.capacity: int | None = row["capacity"]
        self._lambda: float = row["lrfu_lambda"]
        self.evict_fraction: float = row["evict_fraction"]
        self.version: int = 0
        self.clock = 0
        self.index: AnnIndex = make_index(self.index_kind, self.key_dim)
        self._cols = GrowableColumns(
            {
                "id": (np.int64, ()),
                "key": (np.float32, (self.key_dim,)),
                "value": (np.float32, (self.value_dim,)),
                "created": (np.float64, ()),
                "last_access": (np.float64, ()),
                "access_count": (np.int64, ()),
                "crf": (np.float64, ()),
                "last_tick": (np.int64, ()),
                "pending": (np.int64, ()),  # accesses not yet flushed to SQL
            }
        )
        self._pending_since: float | None = None
        self._lock = threading.RLock()
        self._closed = False
        self.counters = {"inserted": 0, "deleted": 0, "evicted": 0, "merged": 0, "queries": 0}
        self.index_rebuilt_on_open = False
        self._load(row["version"])

    # ----------------------------------------------------------------- loading and syncing
    def _load(self, version: int) -> None:
        with read_transaction(self._engine) as conn:
            version = conn.execute(
                select(TABLES.c.version).where(TABLES.c.id == self.table_id)
            ).scalar_one()
            self._append_rows(self._fetch_rows(conn, ENTRY.c.table_id == self.table_id))
        self.version = version
        ids = self._cols.col("id")
        self.clock = int(self._cols.col("last_tick").max()) if len(ids) else 0
        path = self._index_path()
        fingerprint = self._fingerprint()
        saved = read_fingerprint(path.with_suffix(".json")) if path is not None else None
        if (
            path is not None
            and saved is not None
            and saved == fingerprint
            and self.index.load(path)
        ):
            return
        if path is not None and saved is not None:
            log.warning(
                "memory table %s: saved index does not match its rows; rebuilding", self.name
            )
            self.index_rebuilt_on_open = True
        self.index.rebuild(ids, self._cols.col("key"))

    def _fetch_rows(self, conn: Connection, where: Any) -> Iterator[dict[str, Any]]:
        columns = [ENTRY.c[name] for name in MIRROR_COLUMNS]
        result = conn.execute(select(*columns).where(where).order_by(ENTRY.c.id))
        while True:
            chunk = result.fetchmany(LOAD_CHUNK_ROWS)
            if not chunk:
                return
            ids, keys, values, created, last_access, count, crf, tick = zip(*chunk, strict=True)
            yield {
                "id": np.asarray(ids, dtype=np.int64),
                "key": from_blobs(keys, self.key_dim),
                "value": from_blobs(values, self.value_dim),
                "created": np.asarray(created, dtype=np.float64),
                "last_access": np.asarray(last_access, dtype=np.float64),
                "access_count": np.asarray(count, dtype=np.int64),
                "crf": np.asarray(crf, dtype=np.float64),
                "last_tick": np.asarray(tick, dtype=np.int64),
                "pending": np.zeros(len(ids), dtype=np.int64),
            }

    def _append_rows(self, chunks: Iterator[dict[str, Any]] | list[dict[str, Any]]) -> None:
        for chunk in chunks:
            self._cols.append(chunk)
        ids = self._cols.col("id")
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
            self._cols.reorder(np.argsort(ids, kind="stable").astype(np.int64))

    def _catch_up(self, conn: Connection, target: int) -> None:
        """Apply other processes' commits between our version and ``target``."""
        since = self.version
        gone = (
            conn.execute(
                select(TOMBSTONES.c.id).where(
                    (TOMBSTONES.c.table_id == self.table_id) & (TOMBSTONES.c.version > since)
                )
            )
            .scalars()
            .all()
        )
        changed = list(
            self._fetch_rows(conn, (ENTRY.c.table_id == self.table_id) & (ENTRY.c.version > since))
        )
        drop = np.asarray(gone, dtype=np.int64)
        if changed:
            drop = np.concatenate([drop, *[chunk["id"] for chunk in changed]])
        self._forget(drop)
        self._append_rows(changed)
        for chunk in changed:
            self.index.add(chunk["id"], chunk["key"])
        self.version = target

    def refresh(self) -> None:
        """Catch up with commits made by other processes (queries do this themselves)."""
        with self._lock, read_transaction(self._engine) as conn:
            self._refresh(conn)

    def _refresh(self, conn: Connection) -> None:
        version = conn.execute(
            select(TABLES.c.version).where(TABLES.c.id == self.table_id)
        ).scalar_one_or_none()
        if version is None:
            self._closed = True
            raise InputError(f"memory table {self.name!r} was dropped")
        if version != self.version:
            self._catch_up(conn, version)

    def _forget(self, ids: Int64Array) -> None:
        """Remove ids (those present) from the mirror and the index."""
        if not len(ids):
            return
        present = np.isin(self._cols.col("id"), ids)
        if present.any():
            self.index.remove(self._cols.col("id")[present])
            self._cols.keep(~present)

    # ------------------------------------------------------------------------ helpers
    def _check_open(self) -> None:
        if self._closed or self._store.closed:
            raise InputError(f"memory table {self.name!r} is closed or was dropped")

    def _positions(self, ids: Int64Array) -> Int64Array:
        known = self._cols.col("id")
        pos = np.searchsorted(known, ids)
        found = pos < len(known)
        found[found] = known[pos[found]] == ids[found]
        if not found.all():
            missing = ids[~found][:5].tolist()
            raise InputError(f"unknown ids in memory table {self.name!r}: {missing}")
        return pos.astype(np.int64)

    @contextmanager
    def _write(self) -> Iterator[tuple[Connection, int]]:
        """Lock the table row, catch up, yield (connection, new version), bump the version."""
        self._check_open()
        with write_transaction(self._engine) as conn:
            current = conn.execute(
                select(TABLES.c.version).where(TABLES.c.id == self.table_id).with_for_update()
            ).scalar_one_or_none()
            if current is None:
                self._closed = True
                raise InputError(f"memory table {self.name!r} was dropped")
            if current != self.version:
                self._catch_up(conn, current)
            new_version = current + 1
            yield conn, new_version
            conn.execute(
                update(TABLES).where(TABLES.c.id == self.table_id).values(version=new_version)
            )
            self._flush_stats(conn)

    def _placeholders(self, conn: Connection, count: int) -> str:
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        return ", ".join([mark] * count)

    def _param(self, conn: Connection) -> str:
        return "?" if conn.dialect.paramstyle == "qmark" else "%s"

    def _tombstone(self, conn: Connection, ids: Int64Array, version: int) -> None:
        if len(ids):
            conn.exec_driver_sql(
                f"DELETE FROM {ENTRY.name} WHERE id = {self._param(conn)}",
                [(i,) for i in ids.tolist()],
            )
            conn.exec_driver_sql(
                f"INSERT INTO {TOMBSTONES.name} (id, table_id, version) "
                f"VALUES ({self._placeholders(conn, 3)})",
                list(zip(ids.tolist(), repeat(self.table_id), repeat(version))),
            )

    # ------------------------------------------------------------------------ queries
    def query(self, keys: object, k: int, *, record_access: bool = True) -> QueryResult:
        """Top-k nearest stored entries for each query key; counts an access for each hit."""
        with self._lock:
            self._check_open()
            queries = as_matrix(keys, self.key_dim, "query keys")
            if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= MAX_K:
                raise InputError(f"k must be an integer between 1 and {MAX_K}, got {k!r}")
            k = int(k)
            with read_transaction(self._engine) as conn:
                self._refresh(conn)
            if not len(queries) or not len(self):
                return empty_result(len(queries), k, self.key_dim, self.value_dim)
            if self.index.wants_rebuild(len(self)):
                self.index.rebuild(self._cols.col("id"), self._cols.col("key"))
            distances, ids = self.index.search(queries, k * self.index.candidate_factor)
            pos, valid = self._hit_positions(ids)
            if self.index.candidate_factor > 1:
                distances, ids, pos, valid = self._rerank(queries, ids, pos, valid, k)
            keys_out = self._cols.col("key")[pos]
            values_out = self._cols.col("value")[pos]
            if not valid.all():
                keys_out[~valid] = 0.0
                values_out[~valid] = 0.0
                distances = np.where(valid, distances, np.float32(np.inf)).astype(np.float32)
            self.counters["queries"] += len(queries)
            if record_access:
                self._record_access(pos[valid])
            return QueryResult(ids=ids, distances=distances, keys=keys_out, values=values_out)

    def _hit_positions(self, ids: Int64Array) -> tuple[Int64Array, np.ndarray]:
        valid = ids >= 0
        known = self._cols.col("id")
        pos = np.searchsorted(known, ids)
        if len(known):
            np.minimum(pos, len(known) - 1, out=pos)
        else:
            pos[:] = 0
            valid[:] = False
        return pos, valid

    def _rerank(
        self, queries: Float32Array, ids: Int64Array, pos: Int64Array, valid: np.ndarray, k: int
    ) -> tuple[Float32Array, Int64Array, Int64Array, np.ndarray]:
        """Exact squared-L2 distances on stored keys for approximate candidates; keep top k."""
        cand = self._cols.col("key")[pos]
        diff = cand - queries[:, None, :]
        exact = np.einsum("bkd,bkd->bk", diff, diff)
        exact[~valid] = np.inf
        order = np.argsort(exact, axis=1, kind="stable")[:, :k]
        take = np.take_along_axis
        distances = take(exact, order, axis=1).astype(np.float32)
        ids = take(ids, order, axis=1)
        pos = take(pos, order, axis=1)
        valid = take(valid, order, axis=1)
        ids = np.where(valid, ids, -1)
        return distances, ids, pos, valid

    def _record_access(self, hit_positions: Int64Array) -> None:
        if not len(hit_positions):
            self.clock += 1
            return
        self.clock += 1
        size = self._cols.size
        if size <= 4 * len(hit_positions):
            counts_all = np.bincount(hit_positions, minlength=size)
            where = np.flatnonzero(counts_all)
            counts = counts_all[where]
        else:
            where, counts = np.unique(hit_positions, return_counts=True)
        crf, tick = self._cols.col("crf"), self._cols.col("last_tick")
        crf[where] = decayed(crf[where], tick[where], self.clock, self._lambda) + counts
        tick[where] = self.clock
        self._cols.col("access_count")[where] += counts
        self._cols.col("pending")[where] += counts
        self._cols.col("last_access")[where] = time.time()
        if self._pending_since is None:
            self._pending_since = time.monotonic()
        elif time.monotonic() - self._pending_since > STATS_FLUSH_INTERVAL_S:
            self.flush()

    # ----------------------------------------------------------------- access statistics
    def flush(self) -> None:
        """Write pending access statistics in one batched statement and one transaction."""
        with self._lock:
            if self._pending_since is None or self._closed:
                return
            with write_transaction(self._engine) as conn:
                self._flush_stats(conn)

    def _flush_stats(self, conn: Connection) -> None:
        pending = self._cols.col("pending")
        dirty = np.flatnonzero(pending)
        if len(dirty):
            mark = self._param(conn)
            conn.exec_driver_sql(
                f"UPDATE {ENTRY.name} SET access_count = access_count + {mark}, "
                f"last_access = {mark}, crf = {mark}, last_tick = {mark} WHERE id = {mark}",
                list(
                    zip(
                        pending[dirty].tolist(),
                        self._cols.col("last_access")[dirty].tolist(),
                        self._cols.col("crf")[dirty].tolist(),
                        self._cols.col("last_tick")[dirty].tolist(),
                        self._cols.col("id")[dirty].tolist(),
                        strict=True,
                    )
                ),
            )
            # Cleared before commit: a failed commit then loses at most these statistics.
            pending[dirty] = 0
        self._pending_since = None

    # ------------------------------------------------------------------------ writes
    def insert(
        self,
        keys: object,
        values: object,
        *,
        meta: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        labels: str | Sequence[str | None] | None = None,
        tags: Sequence[str] | Sequence[Sequence[str]] | None = None,
        provenance: str | Sequence[str | None] | None = None,
    ) -> Int64Array:
        """Insert a batch in one transaction; returns the new ids. Evicts (LRFU) when full."""
        with self._lock:
            self._check_open()
            key_rows = as_matrix(keys, self.key_dim, "keys")
            value_rows = as_matrix(values, self.value_dim, "values")
            rows = len(key_rows)
            if len(value_rows) != rows:
                raise InputError(f"got {rows} keys but {len(value_rows)} values")
            if self.capacity is not None and rows > self.capacity:
                raise InputError(
                    f"batch of {rows} is larger than table {self.name!r}'s capacity {self.capacity}"
                )
            label_it = label_column(labels, rows)
            tags_it = tags_column(tags, rows)
            meta_it = meta_column(meta, rows)
            prov_it = provenance_column(provenance, rows)
            if rows == 0:
                return np.zeros(0, dtype=np.int64)
            now = time.time()
            with self._write() as (conn, version):
                next_id = conn.execute(
                    update(INFO)
                    .where(INFO.c.id == 1)
                    .values(next_entry_id=INFO.c.next_entry_id + rows)
                    .returning(INFO.c.next_entry_id)
                ).scalar_one()
                ids = np.arange(next_id - rows, next_id, dtype=np.int64)
                tick = self.clock
                conn.exec_driver_sql(
                    f"INSERT INTO {ENTRY.name} ({', '.join(INSERT_COLUMNS)}) "
                    f"VALUES ({self._placeholders(conn, len(INSERT_COLUMNS))})",
                    list(
                        zip(
                            ids.tolist(),
                            repeat(self.table_id),
                            to_blobs(key_rows),
                            to_blobs(value_rows),
                            repeat(now),
                            repeat(now),
                            repeat(0),
                            repeat(1.0),
                            repeat(tick),
                            label_it,
                            tags_it,
                            meta_it,
                            prov_it,
                            repeat(version),
                        )
                    ),
                )
                fresh = {
                    "id": ids,
                    "key": key_rows,
                    "value": value_rows,
                    "created": np.full(rows, now),
                    "last_access": np.full(rows, now),
                    "access_count": np.zeros(rows, dtype=np.int64),
                    "crf": np.ones(rows),
                    "last_tick": np.full(rows, tick, dtype=np.int64),
                    "pending": np.zeros(rows, dtype=np.int64),
                }
                evicted = self._plan_eviction(fresh, None)
                self._tombstone(conn, evicted, version)
            self._cols.append(fresh)
            self._append_rows([])  # re-sorts if another process's ids interleaved
            self.index.add(ids, key_rows)
            self._forget(evicted)
            self.version = version
            self.counters["inserted"] += rows
            self.counters["evicted"] += len(evicted)
            if self.index.wants_rebuild(len(self)):
                self.index.rebuild(self._cols.col("id"), self._cols.col("key"))
            return ids

    def insert_novel(
        self, keys: object, values: object, threshold: float, **insert_options: Any
    ) -> Int64Array:
        """Insert only keys whose nearest stored key is farther than ``threshold``.

        Distance is squared L2 (for flat-ip: a key is novel when its best inner product is
        below ``threshold``). Returns one id per input row, -1 where nothing was inserted.
        Per-row options (labels, tags, meta, provenance lists) are filtered the same way.
        """
        with self._lock:
            key_rows = as_matrix(keys, self.key_dim, "keys")
            value_rows = as_matrix(values, self.value_dim, "values")
            if len(value_rows) != len(key_rows):
                raise InputError(f"got {len(key_rows)} keys but {len(value_rows)} values")
            if not np.isfinite(threshold):
                raise InputError(f"novelty threshold must be finite, got {threshold}")
            result = np.full(len(key_rows), -1, dtype=np.int64)
            if not len(key_rows):
                return result
            if len(self):
                nearest = self.query(key_rows, 1, record_access=False).distances[:, 0]
                novel = nearest < threshold if self.index.inner_product else nearest > threshold
            else:
                novel = np.ones(len(key_rows), dtype=bool)
            if novel.any():
                options = {
                    name: _select_rows(value, novel, name) for name, value in insert_options.items()
                }
                result[novel] = self.insert(key_rows[novel], value_rows[novel], **options)
            return result

    def update(
        self,
        ids: object,
        *,
        keys: object = None,
        values: object = None,
        label: str | None = None,
        tags: Sequence[str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Change keys, values, label ('' clears it), tags or meta of existing entries."""
        with self._lock:
            self._check_open()
            id_rows = as_ids(ids)
            if len(np.unique(id_rows)) != len(id_rows):
                raise InputError("update ids must not repeat")
            key_rows = None if keys is None else as_matrix(keys, self.key_dim, "keys")
            value_rows = None if values is None else as_matrix(values, self.value_dim, "values")
            for name, matrix in (("keys", key_rows), ("values", value_rows)):
                if matrix is not None and len(matrix) != len(id_rows):
                    raise InputError(f"got {len(id_rows)} ids but {len(matrix)} {name}")
            columns: dict[str, Any] = {}
            if key_rows is not None:
                columns["key"] = to_blobs(key_rows)
            if value_rows is not None:
                columns["value"] = to_blobs(value_rows)
            if label is not None:
                columns["label"] = repeat(label or None)
            if tags is not None:
                columns["tags"] = tags_column(list(tags), len(id_rows))
            if meta is not None:
                columns["meta"] = meta_column(meta, len(id_rows))
            if not len(id_rows):
                return
            with self._write() as (conn, version):
                pos = self._positions(id_rows)
                mark = self._param(conn)
                assignments = ", ".join(f"{name} = {mark}" for name in columns)
                conn.exec_driver_sql(
                    f"UPDATE {ENTRY.name} SET {assignments}{', ' if columns else ''}"
                    f"version = {mark} WHERE id = {mark}",
                    list(zip(*columns.values(), repeat(version), id_rows.tolist())),
                )
            if key_rows is not None:
                self._cols.col("key")[pos] = key_rows
                self.index.remove(id_rows)
                self.index.add(id_rows, key_rows)
            if value_rows is not None:
                self._cols.col("value")[pos] = value_rows
            self.version = version

    def delete(self, ids: object) -> None:
        """Delete entries: rows go, and they leave the index in this and other processes."""
        with self._lock:
            self._check_open()
            id_rows = np.unique(as_ids(ids))
            if not len(id_rows):
                return
            with self._write() as (conn, version):
                self._positions(id_rows)
                self._tombstone(conn, id_rows, version)
            self._forget(id_rows)
            self.version = version
            self.counters["deleted"] += len(id_rows)

    # ------------------------------------------------------------------------ policies
    @property
    def lrfu_lambda(self) -> float:
        return self._lambda

    def set_policy(
        self,
        *,
        capacity: int | object | None = ...,
        lrfu_lambda: float | None = None,
        evict_fraction: float | None = None,
    ) -> None:
        """Change capacity (None = unbounded), LRFU lambda or the eviction batch fraction."""
        with self._lock:
            changes: dict[str, Any] = {}
            if capacity is not ...:
                changes["capacity"] = _check_capacity(capacity)
            if lrfu_lambda is not None:
                changes["lrfu_lambda"] = check_lambda(lrfu_lambda)
            if evict_fraction is not None:
                changes["evict_fraction"] = _check_fraction(evict_fraction)
            if not changes:
                return
            with write_transaction(self._engine) as conn:
                conn.execute(update(TABLES).where(TABLES.c.id == self.table_id).values(**changes))
            self.capacity = changes.get("capacity", self.capacity)
            self._lambda = changes.get("lrfu_lambda", self._lambda)
            self.evict_fraction = changes.get("evict_fraction", self.evict_fraction)

    def _plan_eviction(self, fresh: dict[str, Any] | None, count: int | None) -> Int64Array:
        """Ids to evict: lowest LRFU score first; freshly inserted rows go last."""
        ids = self._cols.col("id")
        crf = self._cols.col("crf")
        tick = self._cols.col("last_tick")
        total = len(ids) + (len(fresh["id"]) if fresh else 0)
        if count is None:
            if self.capacity is None or total <= self.capacity:
                return np.zeros(0, dtype=np.int64)
            slack = int(self.capacity * self.evict_fraction)
            count = min(total - self.capacity + slack, total)
        count = min(count, len(ids)) if fresh is None else count
        if count <= 0:
            return np.zeros(0, dtype=np.int64)
        order = eviction_order(crf, tick, ids, self.clock, self._lambda)
        evicted = ids[order[: min(count, len(ids))]]
        if fresh is not None and count > len(ids):
            evicted = np.concatenate([evicted, fresh["id"][: count - len(ids)]])
        return np.sort(evicted)

    def evict(self, count: int | None = None) -> Int64Array:
        """Evict ``count`` lowest-LRFU entries (default: down to capacity minus the slack)."""
        with self._lock:
            self._check_open()
            if count is not None and (not isinstance(count, int) or count < 0):
                raise InputError(f"evict count must be an integer >= 0, got {count!r}")
            with self._write() as (conn, version):
                evicted = self._plan_eviction(None, count)
                self._tombstone(conn, evicted, version)
            self._forget(evicted)
            self.version = version
            self.counters["evicted"] += len(evicted)
            return evicted

    def recombine(self, result: QueryResult, distance: float) -> list[tuple[int, list[int]]]:
        """Merge entries returned together in one top-k whose keys lie within ``distance``.

        ``distance`` is a squared L2 distance between stored keys. A merged entry keeps the
        smallest id and gets the access-weighted mean key and value (weight = accesses + 1),
        the summed access count and CRF, the oldest creation and the newest access.
        Returns (kept id, merged-away ids) per group.
        """
        with self._lock:
            self._check_open()
            if not np.isfinite(distance) or distance < 0:
                raise InputError(f"recombination distance must be finite and >= 0, got {distance}")
            ids = as_ids(result.ids).reshape(np.shape(result.ids))
            if ids.ndim != 2:
                raise InputError("recombine needs a QueryResult's [batch, k] ids")
            with self._write() as (conn, version):
                known = self._cols.col("id")
                pos = np.searchsorted(known, ids)
                np.minimum(pos, max(len(known) - 1, 0), out=pos)
                present = (ids >= 0) & (known[pos] == ids) if len(known) else ids < -1
                ids = np.where(present, ids, -1)
                keys = (
                    self._cols.col("key")[pos]
                    if len(known)
                    else np.zeros((*ids.shape, self.key_dim), np.float32)
                )
                groups = group_members(merge_groups(ids, keys, distance))
                if not groups:
                    return []
                # Flush first so the absolute counts written below already include them.
                self._flush_stats(conn)
                merged = self._merge_rows(groups)
                mark = self._param(conn)
                conn.exec_driver_sql(
                    f"UPDATE {ENTRY.name} SET key = {mark}, value = {mark}, access_count = {mark}, "
                    f"created = {mark}, last_access = {mark}, crf = {mark}, last_tick = {mark}, "
                    f"version = {mark} WHERE id = {mark}",
                    list(
                        zip(
                            to_blobs(merged["key"]),
                            to_blobs(merged["value"]),
                            merged["access_count"].tolist(),
                            merged["created"].tolist(),
                            merged["last_access"].tolist(),
                            merged["crf"].tolist(),
                            repeat(self.clock),
                            repeat(version),
                            merged["id"].tolist(),
                        )
                    ),
                )
                gone = np.asarray(sorted(m for _, members in groups for m in members), np.int64)
                self._tombstone(conn, gone, version)
            kept_pos = self._positions(merged["id"])
            for name in ("key", "value", "access_count", "created", "last_access", "crf"):
                self._cols.col(name)[kept_pos] = merged[name]
            self._cols.col("last_tick")[kept_pos] = self.clock
            self.index.remove(merged["id"])
            self.index.add(merged["id"], merged["key"])
            self._forget(gone)
            self.version = version
            self.counters["merged"] += len(gone)
            return groups

    def _merge_rows(self, groups: list[tuple[int, list[int]]]) -> dict[str, Any]:
        kept = np.asarray([root for root, _ in groups], dtype=np.int64)
        members = np.concatenate([[root, *rest] for root, rest in groups]).astype(np.int64)
        group_of = np.concatenate([[g] * (1 + len(rest)) for g, (_, rest) in enumerate(groups)])
        pos = self._positions(members)
        count = self._cols.col("access_count")[pos]
        weight = (count + 1).astype(np.float64)
        n = len(groups)

        def weighted_mean(column: str) -> Float32Array:
            data = self._cols.col(column)[pos].astype(np.float64) * weight[:, None]
            total = np.zeros((n, data.shape[1]))
            np.add.at(total, group_of, data)
            weights = np.bincount(group_of, weights=weight, minlength=n)
            return (total / weights[:, None]).astype(np.float32)

        crf_now = decayed(
            self._cols.col("crf")[pos], self._cols.col("last_tick")[pos], self.clock, self._lambda
        )
        created = np.full(n, np.inf)
        np.minimum.at(created, group_of, self._cols.col("created")[pos])
        last_access = np.full(n, -np.inf)
        np.maximum.at(last_access, group_of, self._cols.col("last_access")[pos])
        return {
            "id": kept,
            "key": weighted_mean("key"),
            "value": weighted_mean("value"),
            "access_count": np.bincount(group_of, weights=count, minlength=n).astype(np.int64),
            "created": created,
            "last_access": last_access,
            "crf": np.bincount(group_of, weights=crf_now, minlength=n),
        }

    # ------------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return self._cols.size

    def ids(self) -> Int64Array:
        with self._lock:
            return self._cols.col("id").copy()

    def export_arrays(self) -> tuple[Int64Array, Float32Array, Float32Array]:
        """Every row (ids, keys, values) in id order, as of the latest commit."""
        with self._lock:
            self._check_open()
            self.refresh()
            return (
                self._cols.col("id").copy(),
                self._cols.col("key").copy(),
                self._cols.col("value").copy(),
            )

    def vectors(self, ids: object) -> tuple[Float32Array, Float32Array]:
        """Keys and values of the given ids (from memory)."""
        with self._lock:
            pos = self._positions(as_ids(ids))
            return self._cols.col("key")[pos], self._cols.col("value")[pos]

    def get(self, ids: object) -> list[MemoryRow]:
        """Full rows for ids, in the order given; unknown ids are an error."""
        with self._lock:
            self._check_open()
            id_rows = as_ids(ids)
            self.flush()
            with read_transaction(self._engine) as conn:
                found = {
                    row.id: row
                    for row in row_filters.fetch_rows(
                        conn, self.table_id, self.key_dim, self.value_dim, ids=id_rows.tolist()
                    )
                }
            missing = [i for i in id_rows.tolist() if i not in found]
            if missing:
                raise InputError(f"unknown ids in memory table {self.name!r}: {missing[:5]}")
            return [found[i] for i in id_rows.tolist()]

    def page(self, offset: int = 0, limit: int = 50, **filters: Any) -> list[MemoryRow]:
        """Browse rows in SQL: see :func:`engine.memory.filters.filter_clause` for filters."""
        with self._lock:
            self._check_open()
            self.flush()
            with read_transaction(self._engine) as conn:
                return row_filters.fetch_rows(
                    conn,
                    self.table_id,
                    self.key_dim,
                    self.value_dim,
                    offset=offset,
                    limit=limit,
                    **filters,
                )

    def count(self, **filters: Any) -> int:
        with self._lock:
            self._check_open()
            self.flush()
            with read_transaction(self._engine) as conn:
                return row_filters.count_rows(conn, self.table_id, **filters)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._check_open()
            self.refresh()
            counts = self._cols.col("access_count")
            return {
                "name": self.name,
                "rows": len(self),
                "key_dim": self.key_dim,
                "value_dim": self.value_dim,
                "index": self.index.describe(),
                "capacity": self.capacity,
                "lrfu_lambda": self._lambda,
                "evict_fraction": self.evict_fraction,
                "version": self.version,
                "clock": self.clock,
                "total_accesses": int(counts.sum()),
                "never_accessed": int((counts == 0).sum()),
                "max_access_count": int(counts.max()) if len(counts) else 0,
                "index_rebuilt_on_open": self.index_rebuilt_on_open,
                **{f"{name}_this_session": value for name, value in self.counters.items()},
            }

    def tune(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Search-time speed/recall knobs: IVF lists probed, HNSW candidate list size."""
        from engine.memory.ann import HnswIndex, IvfPqIndex

        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        with self._lock:
            if nprobe is not None and isinstance(self.index, IvfPqIndex):
                self.index.set_nprobe(nprobe)
            if ef_search is not None and isinstance(self.index, HnswIndex):
                self.index.ef_search = ef_search

    def rebuild_index(self) -> None:
        """Rebuild the ANN index from the rows held in memory."""
        with self._lock:
            self.index.rebuild(self._cols.col("id"), self._cols.col("key"))

    # ------------------------------------------------------------------------ persistence
    def _fingerprint(self) -> dict[str, Any]:
        ids = self._cols.col("id")
        return {
            "version": self.version,
            "rows": len(ids),
            "id_sum": int(ids.sum()),
            "kind": self.index_kind,
            "dim": self.key_dim,
        }

    def _index_path(self) -> Path | None:
        folder = self._store.index_dir
        return None if folder is None else folder / f"table-{self.table_id}.faiss"

    def save_index(self) -> bool:
        """Save a slow-to-build index beside the database with the rows' fingerprint."""
        with self._lock:
            path = self._index_path()
            if path is None or self._closed:
                return False
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
            if not self.index.save(path):
                return False
            write_fingerprint(path.with_suffix(".json"), self._fingerprint())
            return True

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
                self.save_index()
            finally:
                self._closed = True


def _select_rows(value: Any, mask: np.ndarray, name: str) -> Any:
    """Keep per-row option entries where ``mask`` is set; shared values pass through."""
    if value is None or isinstance(value, str | dict):
        return value
    if name == "tags" and (len(value) == 0 or isinstance(value[0], str)):
        return value
    if len(value) != len(mask):
        raise InputError(f"{name} has {len(value)} entries for {len(mask)} rows")
    return [item for item, keep in zip(value, mask.tolist(), strict=True) if keep]


def _check_capacity(capacity: object) -> int | None:
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise InputError(f"capacity must be a positive integer or None, got {capacity!r}")
    return capacity


def _check_fraction(fraction: float) -> float:
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"evict fraction must be in [0, 1), got {fraction}")
    return float(fraction)
