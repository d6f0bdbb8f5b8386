"""What the agent keeps beside its dialog tree, in the same SQLite file: a task priority
queue, each conversation's rolling summary, reflection bookkeeping and its settings (the
system prompt, a pinned feeling).

The file is the agent's own database, the one its read-only ``sql`` tool and ``/sql`` query.
Every write is one transaction; WAL lets the terminal chat and the workbench share it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import InputError

TASK_STATES = ("open", "done", "dropped")
# Settings keys.
SYSTEM_SETTING = "system_prompt"
PIN_SETTING = "pinned_feeling"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    description TEXT NOT NULL,
    priority INTEGER NOT NULL CHECK (priority BETWEEN 1 AND 10),
    status TEXT NOT NULL DEFAULT 'open',
    source TEXT NOT NULL DEFAULT 'user',
    conversation_id TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_summaries (
    conversation_id TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    upto_node_id TEXT NOT NULL,
    turns INTEGER NOT NULL,
    memory_id INTEGER,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS agent_settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Task:
    id: int
    description: str
    priority: int  # 1 (whenever) .. 10 (now)
    status: str
    source: str  # who added it: "user" or "agent"
    conversation_id: str | None
    created: float
    updated: float


@dataclass(frozen=True)
class Summary:
    conversation_id: str
    text: str
    upto_node_id: str  # the last turn the summary covers
    turns: int  # how many turns it covers
    memory_id: int | None  # its long-term memory row
    updated: float


class AgentState:
    """Tasks, summaries and settings in the agent's database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=10, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        with self._lock:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> AgentState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return cursor

    def _rows(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # Tasks ----------------------------------------------------------------------------------

    def add_task(self, description: str, priority: int, *, source: str = "user",
                 conversation_id: str | None = None) -> Task:
        text = " ".join(str(description).split())
        if not text:
            raise InputError("a task needs a description; say what should be done")
        check_priority(priority)
        if source not in ("user", "agent"):
            raise InputError(f"a task's source is 'user' or 'agent', not {source!r}")
        now = time.time()
        cursor = self._write(
            "INSERT INTO agent_tasks (description, priority, source, conversation_id, "
            "created, updated) VALUES (?, ?, ?, ?, ?, ?)",
            (text, priority, source, conversation_id, now, now))
        return self.task(int(cursor.lastrowid or 0))

    def task(self, task_id: int) -> Task:
        rows = self._rows("SELECT * FROM agent_tasks WHERE id = ?", (task_id,))
        if not rows:
            raise InputError(f"no task #{task_id}; /tasks lists them")
        return Task(*rows[0])

    def tasks(self, status: str | None = "open") -> list[Task]:
        """Highest priority first, then oldest first: the order the agent works in."""
        if status is not None and status not in TASK_STATES:
            raise InputError(f"task status is one of {', '.join(TASK_STATES)}, not {status!r}")
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        return [Task(*row) for row in self._rows(
            f"SELECT * FROM agent_tasks {where} ORDER BY priority DESC, id ASC", args)]

    def set_priority(self, task_id: int, priority: int) -> Task:
        check_priority(priority)
        self.task(task_id)
        self._write("UPDATE agent_tasks SET priority = ?, updated = ? WHERE id = ?",
                    (priority, time.time(), task_id))
        return self.task(task_id)

    def set_status(self, task_id: int, status: str) -> Task:
        if status not in TASK_STATES:
            raise InputError(f"task status is one of {', '.join(TASK_STATES)}, not {status!r}")
        self.task(task_id)
        self._write("UPDATE agent_tasks SET status = ?, updated = ? WHERE id = ?",
                    (status, time.time(), task_id))
        return self.task(task_id)

    # Summaries ------------------------------------------------------------------------------

    def summary(self, conversation_id: str) -> Summary | None:
        rows = self._rows("SELECT * FROM agent_summaries WHERE conversation_id = ?",
                          (conversation_id,))
        return Summary(*rows[0]) if rows else None

    def set_summary(self, conversation_id: str, text: str, upto_node_id: str, turns: int,
                    memory_id: int | None) -> Summary:
        self._write(
            "INSERT INTO agent_summaries VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(conversation_id) "
            "DO UPDATE SET text = excluded.text, upto_node_id = excluded.upto_node_id, "
            "turns = excluded.turns, memory_id = excluded.memory_id, updated = excluded.updated",
            (conversation_id, text, upto_node_id, turns, memory_id, time.time()))
        summary = self.summary(conversation_id)
        assert summary is not None
        return summary

    # Settings -------------------------------------------------------------------------------

    def setting(self, key: str, default: Any = None) -> Any:
        rows = self._rows("SELECT value FROM agent_settings WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def set_setting(self, key: str, value: Any) -> None:
        if value is None:
            self._write("DELETE FROM agent_settings WHERE key = ?", (key,))
            return
        self._write("INSERT INTO agent_settings VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                    "value = excluded.value", (key, json.dumps(value)))


def check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not 1 <= priority <= 10:
        raise InputError(f"a task's priority is a whole number from 1 to 10, not {priority!r}")
    return priority
