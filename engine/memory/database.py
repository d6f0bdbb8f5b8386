"""Opening the database behind a store: URLs, SQLite pragmas, write transactions, schema check."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, inspect, select
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlmodel import SQLModel, create_engine

from engine.errors import InputError, MindsetError
from engine.memory.schema import SCHEMA_VERSION, STORE_MAGIC, StoreInfo

# Long enough that a writer waits out another process's batch instead of failing.
BUSY_TIMEOUT_S = 60.0
SQLITE_MAGIC = b"SQLite format 3\x00"


def resolve_url(url_or_path: str | Path) -> str:
    """A SQLAlchemy URL with a sync driver for a path, ``sqlite:///...`` or ``postgresql://...``."""
    text = str(url_or_path)
    if "://" not in text:
        path = Path(text).expanduser()
        return f"sqlite:///{path}"
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + text.split("://", 1)[1]
    if text.startswith(("sqlite://", "sqlite+pysqlite://", "postgresql+psycopg://")):
        return text
    raise InputError(
        f"unsupported memory store URL {text!r}: use a file path, sqlite:///path or postgresql://..."
    )


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    if parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def check_sqlite_file(path: Path) -> None:
    """Refuse a file that is not an SQLite database before SQLite touches it."""
    if path.is_dir():
        raise InputError(f"memory store path {path} is a directory; give a .db file path")
    if not path.exists() or path.stat().st_size == 0:
        if not path.parent.exists():
            raise InputError(f"memory store directory {path.parent} does not exist")
        return
    with path.open("rb") as handle:
        header = handle.read(len(SQLITE_MAGIC))
    if header != SQLITE_MAGIC:
        raise InputError(f"{path} is not a memory store (not an SQLite database file)")


def _configure_sqlite(dbapi_connection: sqlite3.Connection, _record: Any) -> None:
    # Autocommit at the driver level: the store issues BEGIN itself so writers can take the
    # lock up front (BEGIN IMMEDIATE) and wait on busy_timeout instead of failing.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.execute("PRAGMA cache_size = -65536")  # 64 MiB: big batches stay in memory
    cursor.close()


def _begin_sqlite(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.get("write") else "BEGIN")


def make_engine(url: str) -> Engine:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_sqlite)
        return engine
    if backend == "postgresql":
        return create_engine(url, pool_pre_ping=True)
    raise InputError(f"unsupported database backend {backend!r} for a memory store")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction that holds the write lock from its first statement; all or nothing."""
    with engine.connect() as conn:
        conn.info["write"] = True
        try:
            with conn.begin():
                yield conn
        finally:
            conn.info.pop("write", None)


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn, conn.begin():
        yield conn


def ensure_schema(engine: Engine, url: str) -> None:
    """Create the store's tables in an empty database, or check an existing one is a store."""
    where = sqlite_path(url) or make_url(url).render_as_string(hide_password=True)
    try:
        names = set(inspect(engine).get_table_names())
    except DatabaseError as exc:
        raise InputError(
            f"{where} is not a readable memory store database ({_first_line(exc)})"
        ) from exc
    ours = {
        table.name for table in SQLModel.metadata.sorted_tables if table.name.startswith("mindset_")
    }
    if names and StoreInfo.__tablename__ not in names:
        foreign = ", ".join(sorted(names)[:5])
        raise InputError(f"{where} is not a memory store: it holds other tables ({foreign})")
    try:
        with write_transaction(engine) as conn:
            tables = [t for t in SQLModel.metadata.sorted_tables if t.name in ours]
            SQLModel.metadata.create_all(conn, tables=tables)
            info = conn.execute(select(StoreInfo.__table__)).mappings().first()  # type: ignore[attr-defined]
            if info is None:
                conn.execute(
                    StoreInfo.__table__.insert().values(  # type: ignore[attr-defined]
                        id=1, magic=STORE_MAGIC, schema_version=SCHEMA_VERSION, next_entry_id=1
                    )
                )
            elif info["magic"] != STORE_MAGIC:
                raise InputError(f"{where} is not a memory store (wrong marker {info['magic']!r})")
            elif info["schema_version"] > SCHEMA_VERSION:
                raise InputError(
                    f"{where} was written by a newer version (schema {info['schema_version']}); "
                    "upgrade mindset"
                )
    except OperationalError as exc:
        raise MindsetError(f"cannot open memory store {where}: {_first_line(exc)}") from exc
    except DatabaseError as exc:
        raise InputError(
            f"{where} is not a readable memory store database ({_first_line(exc)})"
        ) from exc


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
