"""The read side of a memory table: opening it, keeping it in step with other processes,
queries (with LRFU access bookkeeping), browsing rows, and its saved index.

SQL rows are the truth; the mirror (ids sorted, keys, values, access statistics; see ``sync``)
and the faiss index are derived from them and serve queries without touching SQL. Access
statistics collect in memory and are written in batches (``flush``), at most
``STATS_FLUSH_INTERVAL_S`` late. :class:`engine.memory.table.MemoryTable` adds the writes.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, NoReturn, Protocol

import numpy as np
from sqlalchemy.engine import Connection, Engine

from engine.errors import InputError
from engine.memory import filters as row_filters
from engine.memory import index_files
from engine.memory import statements as sql
from engine.memory.ann import AnnIndex, HnswIndex, IvfPqIndex, make_index
from engine.memory.database import read_transaction, write_transaction
from engine.memory.lrfu import hit_counts, record_hits
from engine.memory.records import MemoryRow, QueryResult, empty_result
from engine.memory.sync import Mirror
from engine.memory.vectors import Float32Array, Int64Array, as_ids, as_matrix

MAX_K = 4096
STATS_FLUSH_INTERVAL_S = 5.0


class StoreHandle(Protocol):
    """What a table needs from its store (the store imports the table, never the reverse)."""

    @property
    def engine(self) -> Engine: ...
    @property
    def index_dir(self) -> Path | None: ...
    @property
    def closed(self) -> bool: ...


class TableReader:
    """Queries and reads of one table; use :class:`MemoryTable`, which adds the writes."""

    def __init__(self, store: StoreHandle, row: dict[str, Any]) -> None:
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
        self.clock = 0
        self._mirror = Mirror(
            self.table_id,
            self.name,
            self.key_dim,
            self.value_dim,
            make_index(self.index_kind, self.key_dim),
        )
        self._cols = self._mirror.cols
        self._pending_since: float | None = None
        self._lock = threading.RLock()
        self._closed = False
        self.counters = {"inserted": 0, "deleted": 0, "evicted": 0, "merged": 0, "queries": 0}
        with read_transaction(self._engine) as conn:
            self._mirror.load(conn)
        self.clock = int(self._cols.col("last_tick").max()) if len(self) else 0
        self.index_rebuilt_on_open = index_files.open_index(
            self.index,
            self._index_path(),
            self._fingerprint(),
            self._cols.col("id"),
            self._cols.col("key"),
            self.name,
        )

    @property
    def index(self) -> AnnIndex:
        return self._mirror.index

    @property
    def version(self) -> int:
        """The table version the rows held in memory reflect."""
        return self._mirror.version

    # ------------------------------------------------------------------------ syncing
    def refresh(self) -> None:
        """Catch up with commits made by other processes (queries do this themselves)."""
        with self._lock, read_transaction(self._engine) as conn:
            self._refresh(conn)

    def _refresh(self, conn: Connection) -> None:
        if self._mirror.sync(conn) is None:
            self._dropped()

    def _dropped(self) -> NoReturn:
        self._closed = True
        raise InputError(f"memory table {self.name!r} was dropped")

    def _check_open(self) -> None:
        if self._closed or self._store.closed:
            raise InputError(f"memory table {self.name!r} is closed or was dropped")

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
                self._mirror.rebuild_index()
            distances, ids = self.index.search(queries, k * self.index.candidate_factor)
            pos, valid = self._mirror.lookup(ids)
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
        self.clock += 1
        if not len(hit_positions):
            return
        where, counts = hit_counts(hit_positions, self._cols.size)
        record_hits(
            self._cols.col("crf"),
            self._cols.col("last_tick"),
            where,
            counts,
            self.clock,
            self._lambda,
        )
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
            sql.add_access_stats(conn, self._cols, dirty)
            # Cleared before commit: a failed commit then loses at most these statistics.
            pending[dirty] = 0
        self._pending_since = None

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
            pos = self._mirror.positions(as_ids(ids))
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
            self._mirror.rebuild_index()

    # ------------------------------------------------------------------------ persistence
    def _fingerprint(self) -> dict[str, Any]:
        return index_files.fingerprint(
            self._cols.col("id"), self.version, self.index_kind, self.key_dim
        )

    def _index_path(self) -> Path | None:
        return index_files.index_path(self._store.index_dir, self.table_id)

    def save_index(self) -> bool:
        """Save a slow-to-build index beside the database with the rows' fingerprint."""
        with self._lock:
            path = self._index_path()
            if path is None or self._closed:
                return False
            return index_files.save_index(self.index, path, self._fingerprint())

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self.flush()
                self.save_index()
            finally:
                self._closed = True
