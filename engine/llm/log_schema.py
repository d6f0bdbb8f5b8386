"""The interaction log's schema: its version, kept in the file, and the steps to reach it.

The version lives in SQLite's ``user_version`` header field, so it changes atomically with
the tables it describes. ``MIGRATIONS[n]`` takes a file from version ``n`` to ``n + 1``; a
file written before the log was versioned reads as version 0 and already holds step 1's
tables, which is why every step's statements must be safe to rerun (``IF NOT EXISTS``).
To change the layout, append a step: never edit a released one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from engine.errors import MindsetError

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the first layout, the one unversioned logs were created with.
    (
        """CREATE TABLE IF NOT EXISTS interactions (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL,
            parent_id TEXT,
            created_at TEXT NOT NULL,
            adapter TEXT NOT NULL,
            model TEXT NOT NULL,
            kind TEXT NOT NULL,
            messages TEXT,
            prompt TEXT,
            params TEXT NOT NULL,
            response TEXT NOT NULL,
            finish_reason TEXT,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            latency_s REAL,
            ttft_s REAL,
            error TEXT
        )""",
        """CREATE INDEX IF NOT EXISTS interactions_conversation
            ON interactions (conversation_id, created_at)""",
        "CREATE INDEX IF NOT EXISTS interactions_created ON interactions (created_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# Not a migration step: whether FTS5 exists depends on the SQLite build, not on the file, so
# the search index is created at every open where it can be (LIKE search where it cannot).
FTS_SCHEMA = "CREATE VIRTUAL TABLE IF NOT EXISTS interactions_fts USING fts5(id UNINDEXED, body)"


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the log at ``path`` to :data:`SCHEMA_VERSION`, all steps in one transaction.

    Refuses a file from a newer Mindset rather than writing rows it may not understand.
    """
    if _checked_version(db, path) == SCHEMA_VERSION:
        return  # the usual case: no write lock taken
    # IMMEDIATE takes the write lock before reading the version, so two processes opening
    # an old log at once migrate it once.
    db.execute("BEGIN IMMEDIATE")
    try:
        for step in MIGRATIONS[_checked_version(db, path):]:
            for statement in step:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.commit()
    except BaseException:
        db.rollback()
        raise


def _checked_version(db: sqlite3.Connection, path: Path) -> int:
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise MindsetError(
            f"the interaction log {path} was written by a newer version of Mindset (log "
            f"schema {version}, this one reads up to {SCHEMA_VERSION}); upgrade Mindset, or "
            "move the file aside and a new one will be created"
        )
    return version
