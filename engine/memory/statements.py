"""The SQL a memory table runs: table objects, column lists and the batched statements.

Bulk statements go through the driver (``exec_driver_sql`` with executemany parameters): for
batches of thousands of rows that is several times faster than SQLAlchemy Core inserts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Any

import numpy as np
from sqlalchemy import select, update
from sqlalchemy.engine import Connection, CursorResult

from engine.memory.columns import GrowableColumns
from engine.memory.schema import MemoryEntry, MemoryTableRow, MemoryTombstone, StoreInfo
from engine.memory.vectors import Float32Array, Int64Array, to_blobs

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
# What a table holds in memory per row (see engine.memory.sync).
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
MERGED_COLUMNS = ("key", "value", "access_count", "created", "last_access", "crf", "last_tick")


def _mark(conn: Connection) -> str:
    return "?" if conn.dialect.paramstyle == "qmark" else "%s"


def _placeholders(conn: Connection, count: int) -> str:
    return ", ".join([_mark(conn)] * count)


def table_version(conn: Connection, table_id: int, *, for_update: bool = False) -> int | None:
    """The table's committed version (None: dropped); ``for_update`` locks its row."""
    statement = select(TABLES.c.version).where(TABLES.c.id == table_id)
    if for_update:
        statement = statement.with_for_update()
    version: int | None = conn.execute(statement).scalar_one_or_none()
    return version


def set_version(conn: Connection, table_id: int, version: int) -> None:
    conn.execute(update(TABLES).where(TABLES.c.id == table_id).values(version=version))


def set_policy(conn: Connection, table_id: int, changes: dict[str, Any]) -> None:
    conn.execute(update(TABLES).where(TABLES.c.id == table_id).values(**changes))


def reserve_ids(conn: Connection, rows: int) -> Int64Array:
    """``rows`` new entry ids, unique across the store's tables."""
    next_id = conn.execute(
        update(INFO)
        .where(INFO.c.id == 1)
        .values(next_entry_id=INFO.c.next_entry_id + rows)
        .returning(INFO.c.next_entry_id)
    ).scalar_one()
    return np.arange(next_id - rows, next_id, dtype=np.int64)


def insert_entries(
    conn: Connection,
    table_id: int,
    version: int,
    ids: Int64Array,
    keys: Float32Array,
    values: Float32Array,
    *,
    now: float,
    tick: int,
    options: Sequence[Iterable[Any]],
) -> None:
    """Insert new rows: fresh statistics (no accesses, CRF 1 at ``tick``) and the per-row
    option columns (label, tags, meta, provenance, already encoded)."""
    constant = (repeat(now), repeat(now), repeat(0), repeat(1.0), repeat(tick))
    conn.exec_driver_sql(
        f"INSERT INTO {ENTRY.name} ({', '.join(INSERT_COLUMNS)}) "
        f"VALUES ({_placeholders(conn, len(INSERT_COLUMNS))})",
        list(
            zip(
                ids.tolist(),
                repeat(table_id),
                to_blobs(keys),
                to_blobs(values),
                *constant,
                *options,
                repeat(version),
            )
        ),
    )


def delete_entries(conn: Connection, table_id: int, ids: Int64Array, version: int) -> None:
    """Delete rows and leave tombstones, so other processes drop them from their index."""
    if len(ids):
        conn.exec_driver_sql(
            f"DELETE FROM {ENTRY.name} WHERE id = {_mark(conn)}", [(i,) for i in ids.tolist()]
        )
        conn.exec_driver_sql(
            f"INSERT INTO {TOMBSTONES.name} (id, table_id, version) "
            f"VALUES ({_placeholders(conn, 3)})",
            list(zip(ids.tolist(), repeat(table_id), repeat(version))),
        )


def add_access_stats(conn: Connection, cols: GrowableColumns, rows: Int64Array) -> None:
    """Write the pending accesses of mirror ``rows``: counts add, the rest replace."""
    mark = _mark(conn)
    conn.exec_driver_sql(
        f"UPDATE {ENTRY.name} SET access_count = access_count + {mark}, "
        f"last_access = {mark}, crf = {mark}, last_tick = {mark} WHERE id = {mark}",
        list(
            zip(
                *[
                    cols.col(name)[rows].tolist()
                    for name in ("pending", "last_access", "crf", "last_tick", "id")
                ],
                strict=True,
            )
        ),
    )


def update_entries(conn: Connection, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Rows of (the values of ``columns``..., version, id)."""
    mark = _mark(conn)
    assignments = "".join(f"{name} = {mark}, " for name in columns)
    conn.exec_driver_sql(
        f"UPDATE {ENTRY.name} SET {assignments}version = {mark} WHERE id = {mark}", list(rows)
    )


def write_merged(conn: Connection, merged: dict[str, Any], tick: int, version: int) -> None:
    """Give each kept row of a recombination its merged columns (see ``policy.merged_rows``)."""
    update_entries(
        conn,
        MERGED_COLUMNS,
        zip(
            to_blobs(merged["key"]),
            to_blobs(merged["value"]),
            merged["access_count"].tolist(),
            merged["created"].tolist(),
            merged["last_access"].tolist(),
            merged["crf"].tolist(),
            repeat(tick),
            repeat(version),
            merged["id"].tolist(),
        ),
    )


def removed_since(conn: Connection, table_id: int, since: int) -> list[int]:
    """Ids tombstoned after version ``since``."""
    return list(
        conn.execute(
            select(TOMBSTONES.c.id).where(
                (TOMBSTONES.c.table_id == table_id) & (TOMBSTONES.c.version > since)
            )
        )
        .scalars()
        .all()
    )


def mirror_rows(conn: Connection, where: Any) -> CursorResult[Any]:
    """The ``MIRROR_COLUMNS`` of matching rows, in id order."""
    columns = [ENTRY.c[name] for name in MIRROR_COLUMNS]
    return conn.execute(select(*columns).where(where).order_by(ENTRY.c.id))
