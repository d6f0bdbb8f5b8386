"""A table's rows held in memory beside their ANN index, kept in step with SQL across processes.

Every committed batch bumps the table's version and stamps the rows it wrote with it; removed
rows leave tombstones stamped the same way. A mirror at version ``v`` catches up with a newer
one by re-reading the rows stamped after ``v`` and dropping the tombstoned ids, so readers in
other processes see each other's writes without reloading the table.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from sqlalchemy.engine import Connection

from engine.errors import InputError
from engine.memory import statements as sql
from engine.memory.ann import AnnIndex
from engine.memory.columns import GrowableColumns
from engine.memory.vectors import Int64Array, from_blobs

LOAD_CHUNK_ROWS = 65_536

Chunk = dict[str, Any]


class Mirror:
    """The rows of one table (sorted by id) and the index over their keys, as of ``version``.

    Columns: those of ``MIRROR_COLUMNS`` plus ``pending``, the accesses not yet written to SQL.
    """

    def __init__(
        self, table_id: int, name: str, key_dim: int, value_dim: int, index: AnnIndex
    ) -> None:
        self.table_id, self.name = table_id, name
        self.key_dim, self.value_dim = key_dim, value_dim
        self.index = index
        self.version = 0
        self.cols = GrowableColumns(
            {
                "id": (np.int64, ()),
                "key": (np.float32, (key_dim,)),
                "value": (np.float32, (value_dim,)),
                "created": (np.float64, ()),
                "last_access": (np.float64, ()),
                "access_count": (np.int64, ()),
                "crf": (np.float64, ()),
                "last_tick": (np.int64, ()),
                "pending": (np.int64, ()),
            }
        )

    def __len__(self) -> int:
        return self.cols.size

    def load(self, conn: Connection) -> None:
        """Read every row and the version they belong to (the index is the caller's)."""
        version = sql.table_version(conn, self.table_id)
        if version is None:
            raise InputError(f"memory table {self.name!r} was dropped")
        self.append(self._fetch(conn, sql.ENTRY.c.table_id == self.table_id))
        self.version = version

    def sync(self, conn: Connection, *, lock: bool = False) -> int | None:
        """Catch up with the committed version and return it (None: the table was dropped).

        ``lock`` takes the table row's lock first (writers: no commit can slip in between).
        """
        current = sql.table_version(conn, self.table_id, for_update=lock)
        if current is not None and current != self.version:
            self._catch_up(conn, current)
        return current

    def _catch_up(self, conn: Connection, target: int) -> None:
        """Apply other processes' commits between our version and ``target``."""
        since = self.version
        gone = sql.removed_since(conn, self.table_id, since)
        changed = list(
            self._fetch(
                conn,
                (sql.ENTRY.c.table_id == self.table_id) & (sql.ENTRY.c.version > since),
            )
        )
        drop = np.asarray(gone, dtype=np.int64)
        if changed:
            drop = np.concatenate([drop, *[chunk["id"] for chunk in changed]])
        self.forget(drop)
        self.append(changed)
        for chunk in changed:
            self.index.add(chunk["id"], chunk["key"])
        self.version = target

    def _fetch(self, conn: Connection, where: Any) -> Iterator[Chunk]:
        result = sql.mirror_rows(conn, where)
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

    def append(self, chunks: Iterable[Chunk]) -> None:
        """Add rows (not to the index); re-sorts if ids arrived out of order."""
        for chunk in chunks:
            self.cols.append(chunk)
        ids = self.cols.col("id")
        if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
            self.cols.reorder(np.argsort(ids, kind="stable").astype(np.int64))

    def forget(self, ids: Int64Array) -> None:
        """Remove ids (those present) from the rows and the index."""
        if not len(ids):
            return
        present = np.isin(self.cols.col("id"), ids)
        if present.any():
            self.index.remove(self.cols.col("id")[present])
            self.cols.keep(~present)

    def positions(self, ids: Int64Array) -> Int64Array:
        """Row positions of ids that must all be present."""
        known = self.cols.col("id")
        pos = np.searchsorted(known, ids)
        found = pos < len(known)
        found[found] = known[pos[found]] == ids[found]
        if not found.all():
            missing = ids[~found][:5].tolist()
            raise InputError(f"unknown ids in memory table {self.name!r}: {missing}")
        return pos.astype(np.int64)

    def lookup(self, ids: Int64Array) -> tuple[Int64Array, np.ndarray]:
        """(positions, present) for ids that may be -1 or gone; absent ones point at row 0."""
        known = self.cols.col("id")
        pos = np.searchsorted(known, ids)
        if not len(known):
            return np.zeros_like(pos), np.zeros(ids.shape, dtype=bool)
        np.minimum(pos, len(known) - 1, out=pos)
        return pos, (ids >= 0) & (known[pos] == ids)

    def rebuild_index(self) -> None:
        self.index.rebuild(self.cols.col("id"), self.cols.col("key"))


def new_rows(ids: Int64Array, keys: np.ndarray, values: np.ndarray, now: float, tick: int) -> Chunk:
    """Mirror columns of just-inserted rows: no accesses yet, CRF 1 as of ``tick``."""
    rows = len(ids)
    return {
        "id": ids,
        "key": keys,
        "value": values,
        "created": np.full(rows, now),
        "last_access": np.full(rows, now),
        "access_count": np.zeros(rows, dtype=np.int64),
        "crf": np.ones(rows),
        "last_tick": np.full(rows, tick, dtype=np.int64),
        "pending": np.zeros(rows, dtype=np.int64),
    }
