"""The dialog tree's SQLite layout (versioned migrations and the path queries) and the
checks on what a message may hold; :mod:`engine.agent.dialog` is the store itself."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any

from engine.errors import InputError, MindsetError

ROLES = ("system", "user", "assistant", "tool", "inner")

# MIGRATIONS[n] takes a file from schema version n to n + 1 (PRAGMA user_version). To change
# the layout append a step; never edit a released one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY, title TEXT NOT NULL,
            created REAL NOT NULL, updated REAL NOT NULL)""",
        "CREATE INDEX conversations_updated ON conversations (updated)",
        f"""CREATE TABLE nodes (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            parent_id TEXT REFERENCES nodes (id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ({", ".join(repr(r) for r in ROLES)})),
            content TEXT NOT NULL,
            created REAL NOT NULL,
            model TEXT, interaction_id TEXT,
            arousal REAL CHECK (arousal BETWEEN -1 AND 1),
            valence REAL CHECK (valence BETWEEN -1 AND 1),
            emotion TEXT,
            importance INTEGER CHECK (importance BETWEEN 1 AND 10),
            meta TEXT NOT NULL DEFAULT '{{}}')""",
        "CREATE INDEX nodes_parent ON nodes (parent_id, seq)",
        "CREATE INDEX nodes_conversation ON nodes (conversation_id, seq)",
        "CREATE INDEX nodes_interaction ON nodes (interaction_id)",
        """CREATE TABLE selection (
            conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
            parent_key TEXT NOT NULL,
            child_id TEXT NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
            PRIMARY KEY (conversation_id, parent_key))""",
        "CREATE INDEX selection_child ON selection (child_id)",
        # Meta is checked in Python: its keys are added, never changed.
        """CREATE TRIGGER nodes_write_once BEFORE UPDATE ON nodes
        WHEN NEW.seq IS NOT OLD.seq OR NEW.id IS NOT OLD.id
            OR NEW.conversation_id IS NOT OLD.conversation_id
            OR NEW.parent_id IS NOT OLD.parent_id OR NEW.role IS NOT OLD.role
            OR NEW.content IS NOT OLD.content OR NEW.created IS NOT OLD.created
            OR NEW.model IS NOT OLD.model OR NEW.interaction_id IS NOT OLD.interaction_id
            OR (OLD.arousal IS NOT NULL AND NEW.arousal IS NOT OLD.arousal)
            OR (OLD.valence IS NOT NULL AND NEW.valence IS NOT OLD.valence)
            OR (OLD.emotion IS NOT NULL AND NEW.emotion IS NOT OLD.emotion)
            OR (OLD.importance IS NOT NULL AND NEW.importance IS NOT OLD.importance)
        BEGIN SELECT RAISE(ABORT, 'dialog messages are immutable; add a branch instead'); END""",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# Follows the selected child from the roots; a parent without a selection row (which the
# store never leaves) falls back to its newest child.
PATH_SQL = """
WITH RECURSIVE p(id, depth) AS (
    SELECT coalesce(
        (SELECT child_id FROM selection WHERE conversation_id = :c AND parent_key = ''),
        (SELECT id FROM nodes WHERE conversation_id = :c AND parent_id IS NULL
         ORDER BY seq DESC LIMIT 1)), 0
    UNION ALL
    SELECT coalesce(
        (SELECT child_id FROM selection WHERE conversation_id = :c AND parent_key = p.id),
        (SELECT id FROM nodes WHERE parent_id = p.id ORDER BY seq DESC LIMIT 1)), p.depth + 1
    FROM p WHERE p.id IS NOT NULL)
SELECT n.* FROM p JOIN nodes n ON n.id = p.id ORDER BY p.depth"""

PATH_TO_SQL = """
WITH RECURSIVE up(id, parent_id, depth) AS (
    SELECT id, parent_id, 0 FROM nodes WHERE id = :n
    UNION ALL
    SELECT n.id, n.parent_id, up.depth + 1 FROM nodes n JOIN up ON n.id = up.parent_id)
SELECT n.* FROM up JOIN nodes n ON n.id = up.id ORDER BY up.depth DESC"""


def migrate(db: sqlite3.Connection, path: Path) -> None:
    if checked_version(db, path) == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")  # re-read under the lock: two processes migrate once
    try:
        for step in MIGRATIONS[checked_version(db, path):]:
            for statement in step:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def checked_version(db: sqlite3.Connection, path: Path) -> int:
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise MindsetError(f"the dialog file {path} was written by a newer Mindset (schema "
                           f"{version}, this one reads up to {SCHEMA_VERSION}); upgrade Mindset")
    return version


def check_text(name: str, value: object, *, optional: bool = True) -> Any:
    if not isinstance(value, str) and not (optional and value is None):
        raise InputError(f"{name} must be text (str){' or None' if optional else ''}, "
                         f"not {type(value).__name__}")
    return value


def check_labels(*, importance: object = None, arousal: object = None,
                  valence: object = None, emotion: object = None) -> dict[str, Any]:
    if importance is not None and (isinstance(importance, bool)
                                   or not isinstance(importance, int)
                                   or not 1 <= importance <= 10):
        raise InputError(f"importance must be a whole number from 1 to 10, not {importance!r}")
    labels: dict[str, Any] = {"importance": importance}
    for name, value in (("arousal", arousal), ("valence", valence)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or not -1 <= value <= 1):
            raise InputError(f"{name} must be a number from -1 to 1, not {value!r}")
        labels[name] = None if value is None else float(value)
    labels["emotion"] = check_text("emotion", emotion)
    return labels


def normalised_meta(meta: object) -> dict[str, Any]:
    """``meta`` as it reads back from JSON (tuples become lists), or InputError."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise InputError(f"meta must be a dict, not {type(meta).__name__}")
    check_json(meta, "meta")
    return dict(json.loads(json.dumps(meta)))


def check_json(value: object, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{where} is {value}, which JSON cannot hold; use a finite number")
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_json(item, f"{where}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InputError(f"{where} has the key {key!r}; JSON keys must be text")
            check_json(item, f"{where}[{key!r}]")
    elif value is not None and not isinstance(value, str | int | float):
        raise InputError(f"{where} is a {type(value).__name__}, which is not JSON-serialisable;"
                         " use text, numbers, booleans, None, lists and dicts")


# Export --------------------------------------------------------------------------------------
