"""Async API for the workbench: browsing and edits through SQLAlchemy async (aiosqlite /
psycopg async), vector work (query, insert) on a worker thread over the synchronous store.

Edits made here bump the table's version like any other writer, so synchronous tables in any
process (a training job, this process's own worker) drop or refresh those rows on their next
call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import event, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from engine.errors import InputError
from engine.memory.database import _begin_sqlite, _configure_sqlite, async_url
from engine.memory.filters import count_statement, decode_row, page_statement
from engine.memory.records import MemoryRow, QueryResult, encode_meta, encode_tags
from engine.memory.schema import MemoryEntry, MemoryTableRow, MemoryTombstone
from engine.memory.store import MemoryStore
from engine.memory.vectors import Int64Array, as_ids

TABLES = MemoryTableRow.__table__  # type: ignore[attr-defined]
ENTRY = MemoryEntry.__table__  # type: ignore[attr-defined]
TOMBSTONES = MemoryTombstone.__table__  # type: ignore[attr-defined]


class AsyncMemoryStore:
    """Non-blocking access to a memory store from an asyncio event loop."""

    def __init__(self, store: MemoryStore, engine: AsyncEngine) -> None:
        self.store = store
        self.engine = engine

    @classmethod
    async def open(cls, url_or_path: str | Path) -> AsyncMemoryStore:
        store = await asyncio.to_thread(MemoryStore.open, url_or_path)
        engine = create_async_engine(async_url(store.url))
        if engine.dialect.name == "sqlite":
            event.listen(engine.sync_engine, "connect", _configure_sqlite)
            event.listen(engine.sync_engine, "begin", _begin_sqlite)
        return cls(store, engine)

    async def close(self) -> None:
        await self.engine.dispose()
        await asyncio.to_thread(self.store.close)

    async def __aenter__(self) -> AsyncMemoryStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def _transaction(self, write: bool) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn:
            conn.info["write"] = write
            try:
                async with conn.begin():
                    yield conn
            finally:
                conn.info.pop("write", None)

    async def _table(self, conn: AsyncConnection, name: str) -> dict[str, Any]:
        row = (await conn.execute(select(TABLES).where(TABLES.c.name == name))).mappings().first()
        if row is None:
            raise InputError(f"no memory table named {name!r}")
        return dict(row)

    # ------------------------------------------------------------------------ browsing
    async def table_names(self) -> list[str]:
        async with self._transaction(write=False) as conn:
            return list(
                (await conn.execute(select(TABLES.c.name).order_by(TABLES.c.name))).scalars()
            )

    async def page(
        self, name: str, offset: int = 0, limit: int = 50, **filters: Any
    ) -> list[MemoryRow]:
        await asyncio.to_thread(self._flush_local, name)
        async with self._transaction(write=False) as conn:
            table = await self._table(conn, name)
            statement = page_statement(table["id"], offset=offset, limit=limit, **filters)
            rows = (await conn.execute(statement)).all()
        return [decode_row(row, table["key_dim"], table["value_dim"]) for row in rows]

    async def count(self, name: str, **filters: Any) -> int:
        await asyncio.to_thread(self._flush_local, name)
        async with self._transaction(write=False) as conn:
            table = await self._table(conn, name)
            return int((await conn.execute(count_statement(table["id"], **filters))).scalar_one())

    async def get(self, name: str, ids: object) -> list[MemoryRow]:
        wanted = as_ids(ids).tolist()
        async with self._transaction(write=False) as conn:
            table = await self._table(conn, name)
            found = {}
            for start in range(0, len(wanted), 10_000):
                statement = page_statement(
                    table["id"], ids=wanted[start : start + 10_000], limit=10_000
                )
                for row in (await conn.execute(statement)).all():
                    found[int(row.id)] = decode_row(row, table["key_dim"], table["value_dim"])
        missing = [i for i in wanted if i not in found]
        if missing:
            raise InputError(f"unknown ids in memory table {name!r}: {missing[:5]}")
        return [found[i] for i in wanted]

    async def stats(self, name: str) -> dict[str, Any]:
        """Row count and access figures straight from SQL (no index needed)."""
        await asyncio.to_thread(self._flush_local, name)
        async with self._transaction(write=False) as conn:
            table = await self._table(conn, name)
            rows, total, never = (
                await conn.execute(
                    select(
                        func.count(),
                        func.coalesce(func.sum(ENTRY.c.access_count), 0),
                        func.coalesce(
                            func.sum((ENTRY.c.access_count == 0).cast(TABLES.c.version.type)), 0
                        ),
                    ).where(ENTRY.c.table_id == table["id"])
                )
            ).one()
        return {
            "name": name,
            "rows": int(rows),
            "key_dim": table["key_dim"],
            "value_dim": table["value_dim"],
            "index_kind": table["index_kind"],
            "capacity": table["capacity"],
            "lrfu_lambda": table["lrfu_lambda"],
            "version": table["version"],
            "total_accesses": int(total),
            "never_accessed": int(never),
        }

    # ------------------------------------------------------------------------ edits
    async def update(
        self,
        name: str,
        ids: object,
        *,
        label: str | None = None,
        tags: Sequence[str] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Edit labels, tags or metadata (one transaction). Vectors: use :meth:`update_vectors`."""
        wanted = np.unique(as_ids(ids))
        values: dict[str, Any] = {}
        if label is not None:
            values["label"] = label or None
        if tags is not None:
            values["tags"] = encode_tags(list(tags))
        if meta is not None:
            values["meta"] = encode_meta(meta)
        async with self._transaction(write=True) as conn:
            table, version = await self._bump(conn, name)
            await self._check_ids(conn, table, wanted)
            await conn.execute(
                update(ENTRY)
                .where((ENTRY.c.table_id == table["id"]) & ENTRY.c.id.in_(wanted.tolist()))
                .values(version=version, **values)
            )

    async def delete(self, name: str, ids: object) -> None:
        wanted = np.unique(as_ids(ids))
        async with self._transaction(write=True) as conn:
            table, version = await self._bump(conn, name)
            await self._check_ids(conn, table, wanted)
            await conn.execute(
                ENTRY.delete().where(
                    (ENTRY.c.table_id == table["id"]) & ENTRY.c.id.in_(wanted.tolist())
                )
            )
            if len(wanted):
                await conn.execute(
                    TOMBSTONES.insert(),
                    [
                        {"id": i, "table_id": t, "version": v}
                        for i, t, v in zip(wanted.tolist(), repeat(table["id"]), repeat(version))
                    ],
                )

    async def _bump(self, conn: AsyncConnection, name: str) -> tuple[dict[str, Any], int]:
        table = await self._table(conn, name)
        version = (
            await conn.execute(
                update(TABLES)
                .where(TABLES.c.id == table["id"])
                .values(version=TABLES.c.version + 1)
                .returning(TABLES.c.version)
            )
        ).scalar_one()
        return table, int(version)

    async def _check_ids(
        self, conn: AsyncConnection, table: dict[str, Any], ids: Int64Array
    ) -> None:
        found: set[int] = set()
        for start in range(0, len(ids), 10_000):
            chunk = ids[start : start + 10_000].tolist()
            found.update(
                (
                    await conn.execute(
                        select(ENTRY.c.id).where(
                            (ENTRY.c.table_id == table["id"]) & ENTRY.c.id.in_(chunk)
                        )
                    )
                ).scalars()
            )
        missing = [i for i in ids.tolist() if i not in found]
        if missing:
            raise InputError(f"unknown ids in memory table {table['name']!r}: {missing[:5]}")

    # ------------------------------------------------------------------------ vectors
    async def query(self, name: str, keys: object, k: int) -> QueryResult:
        return await asyncio.to_thread(lambda: self.store.table(name).query(keys, k))

    async def insert(self, name: str, keys: object, values: object, **options: Any) -> Int64Array:
        return await asyncio.to_thread(
            lambda: self.store.table(name).insert(keys, values, **options)
        )

    async def update_vectors(
        self, name: str, ids: object, *, keys: object = None, values: object = None
    ) -> None:
        await asyncio.to_thread(
            lambda: self.store.table(name).update(ids, keys=keys, values=values)
        )

    def _flush_local(self, name: str) -> None:
        table = self.store._tables.get(name)
        if table is not None:
            table.flush()
