"""One named memory table: batched kNN over SQL rows, with LRFU eviction and recombination.

Reads, queries and the in-memory mirror are :class:`engine.memory.reader.TableReader`'s. Every
write here is one transaction that first catches up with other processes' commits (by the
table's version counter), then writes rows (``statements``), bumps the version and flushes
pending access statistics; the mirror and index change only after the commit succeeded.
Eviction and merging follow ``policy``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import repeat
from typing import Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.engine import Connection

from engine.errors import InputError
from engine.memory import statements as sql
from engine.memory.database import read_transaction, write_transaction
from engine.memory.lrfu import check_lambda
from engine.memory.policy import (
    check_capacity,
    check_fraction,
    merged_rows,
    plan_eviction,
    recombination_groups,
)
from engine.memory.reader import TableReader
from engine.memory.recombination import MergePlan
from engine.memory.records import (
    QueryResult,
    decode_meta,
    label_column,
    meta_column,
    provenance_column,
    select_rows,
    tags_column,
)
from engine.memory.sync import new_rows
from engine.memory.vectors import Int64Array, as_ids, as_matrix, to_blobs


class MemoryTable(TableReader):
    """Batched kNN table. Obtain through :meth:`MemoryStore.create_table` / :meth:`table`."""

    @contextmanager
    def _write(self) -> Iterator[tuple[Connection, int]]:
        """Lock the table row, catch up, yield (connection, new version), bump the version.

        The caller applies its change to the mirror and then sets ``_mirror.version``."""
        self._check_open()
        with write_transaction(self._engine) as conn:
            current = self._mirror.sync(conn, lock=True)
            if current is None:
                self._dropped()
            new_version = current + 1
            yield conn, new_version
            sql.set_version(conn, self.table_id, new_version)
            self._flush_stats(conn)

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
                ids = sql.reserve_ids(conn, rows)
                tick = self.clock
                sql.insert_entries(
                    conn,
                    self.table_id,
                    version,
                    ids,
                    key_rows,
                    value_rows,
                    now=now,
                    tick=tick,
                    options=(label_it, tags_it, meta_it, prov_it),
                )
                evicted = self._plan_eviction(ids, None)
                sql.delete_entries(conn, self.table_id, evicted, version)
            # Appending re-sorts if another process's ids interleaved with ours.
            self._mirror.append([new_rows(ids, key_rows, value_rows, now, tick)])
            self.index.add(ids, key_rows)
            self._mirror.forget(evicted)
            self._mirror.version = version
            self.counters["inserted"] += rows
            self.counters["evicted"] += len(evicted)
            if self.index.wants_rebuild(len(self)):
                self._mirror.rebuild_index()
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
                    name: select_rows(value, novel, name) for name, value in insert_options.items()
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
                pos = self._mirror.positions(id_rows)
                sql.update_entries(
                    conn,
                    list(columns),
                    zip(*columns.values(), repeat(version), id_rows.tolist()),
                )
            if key_rows is not None:
                self._cols.col("key")[pos] = key_rows
                self.index.remove(id_rows)
                self.index.add(id_rows, key_rows)
            if value_rows is not None:
                self._cols.col("value")[pos] = value_rows
            self._mirror.version = version

    def delete(self, ids: object) -> None:
        """Delete entries: rows go, and they leave the index in this and other processes."""
        with self._lock:
            self._check_open()
            id_rows = np.unique(as_ids(ids))
            if not len(id_rows):
                return
            with self._write() as (conn, version):
                self._mirror.positions(id_rows)
                sql.delete_entries(conn, self.table_id, id_rows, version)
            self._mirror.forget(id_rows)
            self._mirror.version = version
            self.counters["deleted"] += len(id_rows)

    def restore(
        self,
        ids: object,
        keys: object,
        values: object,
        *,
        stats: Sequence[tuple[float, float, int]] | None = None,
        **options: Any,
    ) -> None:
        """Put deleted entries back under their old ids (the undo of a delete).

        ``options`` are :meth:`insert`'s (meta, labels, tags, provenance); ``stats`` gives
        each row's (created, last access, access count) back. The ids must be ones this store
        handed out and no table holds now; nothing is evicted (over capacity is an error)."""
        with self._lock:
            self._check_open()
            id_rows = as_ids(ids)
            key_rows = as_matrix(keys, self.key_dim, "keys")
            value_rows = as_matrix(values, self.value_dim, "values")
            rows = len(id_rows)
            if len(key_rows) != rows or len(value_rows) != rows:
                raise InputError(f"got {rows} ids, {len(key_rows)} keys, {len(value_rows)} values")
            if len(np.unique(id_rows)) != rows:
                raise InputError("restored ids must not repeat")
            if stats is not None and len(stats) != rows:
                raise InputError(f"got {len(stats)} stats for {rows} rows")
            columns = (
                label_column(options.get("labels"), rows),
                tags_column(options.get("tags"), rows),
                meta_column(options.get("meta"), rows),
                provenance_column(options.get("provenance"), rows),
            )
            if not rows:
                return
            if self.capacity is not None and len(self) + rows > self.capacity:
                raise InputError(f"table {self.name!r} has no room for {rows} restored rows")
            now, tick = time.time(), self.clock
            with self._write() as (conn, version):
                self._check_restorable(conn, id_rows)
                sql.insert_entries(conn, self.table_id, version, id_rows, key_rows, value_rows,
                                   now=now, tick=tick, options=columns)
                if stats is not None:
                    sql.update_entries(conn, ("created", "last_access", "access_count"),
                                       [(*s, version, i)
                                        for s, i in zip(stats, id_rows.tolist(), strict=True)])
                # A later delete of the same id leaves a tombstone again; the restored row's
                # newer version already tells other processes it is back.
                gone = sql.TOMBSTONES.c.id.in_(id_rows.tolist())
                conn.execute(delete(sql.TOMBSTONES).where(gone))
            chunk = new_rows(id_rows, key_rows, value_rows, now, tick)
            if stats is not None:
                created, last_access, counts = zip(*stats, strict=True)
                chunk["created"] = np.asarray(created, dtype=np.float64)
                chunk["last_access"] = np.asarray(last_access, dtype=np.float64)
                chunk["access_count"] = np.asarray(counts, dtype=np.int64)
            self._mirror.append([chunk])
            self.index.add(id_rows, key_rows)
            self._mirror.version = version
            self.counters["inserted"] += rows

    def _check_restorable(self, conn: Connection, ids: Int64Array) -> None:
        issued = conn.execute(select(sql.INFO.c.next_entry_id)).scalar_one()
        if int(ids.min()) < 1 or int(ids.max()) >= issued:
            raise InputError(f"ids {ids[:5].tolist()} were never handed out by this store")
        taken = conn.execute(select(sql.ENTRY.c.id).where(sql.ENTRY.c.id.in_(ids.tolist())))
        present = taken.scalars().all()
        if present:
            raise InputError(f"ids {list(present)[:5]} are in use; they cannot be restored")

    def metas(self) -> tuple[Int64Array, list[dict[str, Any]]]:
        """Every row's id and meta, in id order (no vectors: cheap to read for all rows)."""
        with self._lock:
            self._check_open()
            with read_transaction(self._engine) as conn:
                found = conn.execute(
                    select(sql.ENTRY.c.id, sql.ENTRY.c.meta)
                    .where(sql.ENTRY.c.table_id == self.table_id)
                    .order_by(sql.ENTRY.c.id)
                ).all()
            return np.asarray([r[0] for r in found], dtype=np.int64), [
                decode_meta(r[1]) for r in found
            ]

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
                changes["capacity"] = check_capacity(capacity)
            if lrfu_lambda is not None:
                changes["lrfu_lambda"] = check_lambda(lrfu_lambda)
            if evict_fraction is not None:
                changes["evict_fraction"] = check_fraction(evict_fraction)
            if not changes:
                return
            with write_transaction(self._engine) as conn:
                sql.set_policy(conn, self.table_id, changes)
            self.capacity = changes.get("capacity", self.capacity)
            self._lambda = changes.get("lrfu_lambda", self._lambda)
            self.evict_fraction = changes.get("evict_fraction", self.evict_fraction)

    def _plan_eviction(self, fresh_ids: Int64Array | None, count: int | None) -> Int64Array:
        return plan_eviction(
            self._mirror,
            fresh_ids,
            count,
            capacity=self.capacity,
            fraction=self.evict_fraction,
            clock=self.clock,
            lam=self._lambda,
        )

    def evict(self, count: int | None = None) -> Int64Array:
        """Evict ``count`` lowest-LRFU entries (default: down to capacity minus the slack)."""
        with self._lock:
            self._check_open()
            if count is not None and (not isinstance(count, int) or count < 0):
                raise InputError(f"evict count must be an integer >= 0, got {count!r}")
            with self._write() as (conn, version):
                evicted = self._plan_eviction(None, count)
                sql.delete_entries(conn, self.table_id, evicted, version)
            self._mirror.forget(evicted)
            self._mirror.version = version
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
                groups = recombination_groups(self._mirror, ids, distance)
                if not groups:
                    return []
                # Flush first so the absolute counts written below already include them.
                self._flush_stats(conn)
                plan = MergePlan.of(groups)
                merged = merged_rows(self._mirror, plan, self.clock, self._lambda)
                sql.write_merged(conn, merged, self.clock, version)
                sql.delete_entries(conn, self.table_id, plan.gone, version)
            kept_pos = self._mirror.positions(plan.kept)
            for name in ("key", "value", "access_count", "created", "last_access", "crf"):
                self._cols.col(name)[kept_pos] = merged[name]
            self._cols.col("last_tick")[kept_pos] = self.clock
            self.index.remove(plan.kept)
            self.index.add(plan.kept, merged["key"])
            self._mirror.forget(plan.gone)
            self._mirror.version = version
            self.counters["merged"] += len(plan.gone)
            return groups
