"""The memory store: named tables of key/value entries in one SQL database."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from engine.errors import InputError
from engine.memory.ann import check_kind
from engine.memory.database import (
    check_sqlite_file,
    ensure_schema,
    make_engine,
    read_transaction,
    resolve_url,
    sqlite_path,
    write_transaction,
)
from engine.memory.index_files import remove_saved
from engine.memory.lrfu import check_lambda
from engine.memory.policy import check_capacity, check_fraction
from engine.memory.statements import ENTRY, TABLES, TOMBSTONES
from engine.memory.table import MemoryTable

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_DIM = 65_536


class MemoryStore:
    """A set of named memory tables in SQLite (WAL, default) or PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        path = sqlite_path(url)
        if path is not None:
            check_sqlite_file(path)
        self.engine = make_engine(url)
        try:
            ensure_schema(self.engine, url)
        except BaseException:
            self.engine.dispose()
            raise
        # Slow-to-build indexes (HNSW, IVF-PQ) are saved beside a SQLite file.
        self.index_dir: Path | None = path.with_name(path.name + ".index") if path else None
        self._tables: dict[str, MemoryTable] = {}
        self._lock = threading.RLock()
        self.closed = False

    @classmethod
    def open(cls, url_or_path: str | Path) -> MemoryStore:
        """Open or create a store: a file path, ``sqlite:///path`` or ``postgresql://...``."""
        return cls(resolve_url(url_or_path))

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise InputError("the memory store is closed")

    def create_table(
        self,
        name: str,
        key_dim: int,
        value_dim: int,
        *,
        index: str = "flat-l2",
        capacity: int | None = None,
        lrfu_lambda: float = 0.1,
        evict_fraction: float = 0.05,
        exist_ok: bool = False,
    ) -> MemoryTable:
        """Create a table; with ``exist_ok`` return the existing one if its shape matches."""
        self._check_open()
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise InputError(
                f"invalid table name {name!r}: use letters, digits, _ . : - (at most 128)"
            )
        for what, dim in (("key_dim", key_dim), ("value_dim", value_dim)):
            if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
                raise InputError(f"{what} must be an integer between 1 and {MAX_DIM}, got {dim!r}")
        check_kind(index)
        capacity = check_capacity(capacity)
        lrfu_lambda = check_lambda(lrfu_lambda)
        evict_fraction = check_fraction(evict_fraction)
        with self._lock:
            existing = self._table_row(name)
            if existing is not None:
                if not exist_ok:
                    raise InputError(f"memory table {name!r} already exists")
                shape = (existing["key_dim"], existing["value_dim"], existing["index_kind"])
                if shape != (key_dim, value_dim, index):
                    raise InputError(
                        f"memory table {name!r} exists with key_dim={shape[0]}, "
                        f"value_dim={shape[1]}, index={shape[2]}"
                    )
                return self.table(name)
            try:
                with write_transaction(self.engine) as conn:
                    conn.execute(
                        TABLES.insert().values(
                            name=name,
                            key_dim=key_dim,
                            value_dim=value_dim,
                            index_kind=index,
                            capacity=capacity,
                            lrfu_lambda=lrfu_lambda,
                            evict_fraction=evict_fraction,
                            version=0,
                            created=time.time(),
                        )
                    )
            except IntegrityError as exc:  # created by another process meanwhile
                if not exist_ok:
                    raise InputError(f"memory table {name!r} already exists") from exc
            return self.table(name)

    def _table_row(self, name: str) -> dict[str, Any] | None:
        with read_transaction(self.engine) as conn:
            row = conn.execute(select(TABLES).where(TABLES.c.name == name)).mappings().first()
        return dict(row) if row is not None else None

    def table(self, name: str) -> MemoryTable:
        """An existing table, loaded into memory (rows and index) on first use."""
        self._check_open()
        with self._lock:
            cached = self._tables.get(name)
            if cached is not None and not cached._closed:
                return cached
            row = self._table_row(name)
            if row is None:
                known = ", ".join(self.table_names()) or "none"
                raise InputError(f"no memory table named {name!r} (tables: {known})")
            table = MemoryTable(self, row)
            self._tables[name] = table
            return table

    def table_names(self) -> list[str]:
        self._check_open()
        with read_transaction(self.engine) as conn:
            return list(conn.execute(select(TABLES.c.name).order_by(TABLES.c.name)).scalars())

    def drop_table(self, name: str) -> None:
        """Delete a table and all its entries (one transaction)."""
        self._check_open()
        with self._lock:
            row = self._table_row(name)
            if row is None:
                raise InputError(f"no memory table named {name!r}")
            with write_transaction(self.engine) as conn:
                conn.execute(delete(ENTRY).where(ENTRY.c.table_id == row["id"]))
                conn.execute(delete(TOMBSTONES).where(TOMBSTONES.c.table_id == row["id"]))
                conn.execute(delete(TABLES).where(TABLES.c.id == row["id"]))
            table = self._tables.pop(name, None)
            if table is not None:
                table._closed = True
            remove_saved(self.index_dir, row["id"])

    def flush(self) -> None:
        """Write every table's pending access statistics."""
        for table in list(self._tables.values()):
            table.flush()

    def close(self) -> None:
        """Flush statistics, save slow-to-build indexes, release the database."""
        if self.closed:
            return
        try:
            for table in list(self._tables.values()):
                table.close()
        finally:
            self.closed = True
            self.engine.dispose()
