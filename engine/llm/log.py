"""The interaction log: every LLM call, stored in SQLite in the data directory.

One row per call: adapter, model, messages or prompt, parameters, response, token counts,
latency, error, and a conversation id plus a parent id so branches of a dialogue are kept.
Text search uses SQLite's FTS5 (LIKE where FTS5 is missing). Everything stored passes
through :func:`engine.llm.secrets.redact` first, so API keys never reach the file. The
file's layout is versioned and migrated at open (:mod:`engine.llm.log_schema`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine.errors import InputError, MindsetError
from engine.llm.log_schema import FTS_SCHEMA, migrate
from engine.llm.secrets import redact

LOG_FILE_NAME = "interactions.sqlite"


@dataclass
class Interaction:
    """One logged LLM call."""

    id: str
    conversation_id: str
    adapter: str
    model: str
    kind: str  # "chat" or "completion"
    params: dict[str, Any]
    response: str = ""
    parent_id: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float | None = None
    ttft_s: float | None = None
    error: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def searchable_text(self) -> str:
        parts = [m["content"] for m in self.messages or []]
        parts += [self.prompt or "", self.response, self.error or ""]
        return "\n".join(p for p in parts if p)


def default_log_path() -> Path:
    from engine.paths import data_dir

    return data_dir() / LOG_FILE_NAME


class InteractionLog:
    """A SQLite file of interactions. Safe to share between threads and processes."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_log_path()
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            migrate(db, self.path)
            try:
                db.execute(FTS_SCHEMA)
                self.has_fts = True
            except sqlite3.OperationalError:
                self.has_fts = False

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=10)
        except sqlite3.Error as exc:
            raise MindsetError(f"cannot open the interaction log {self.path}: {exc}") from exc
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL never corrupts the file; it skips an fsync per call.
            db.execute("PRAGMA synchronous=NORMAL")
            with db:
                yield db
        except sqlite3.DatabaseError as exc:
            raise MindsetError(
                f"the interaction log {self.path} is unreadable ({exc}); move it aside "
                "and a new one will be created"
            ) from exc
        finally:
            db.close()

    # Writing -------------------------------------------------------------------------------

    def record(self, interaction: Interaction) -> None:
        row = _to_row(interaction)
        body = redact(interaction.searchable_text())
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._lock, self._connect() as db:
            db.execute(
                f"INSERT OR REPLACE INTO interactions ({columns}) VALUES ({marks})",
                list(row.values()),
            )
            if self.has_fts:
                db.execute("DELETE FROM interactions_fts WHERE id = ?", (interaction.id,))
                db.execute("INSERT INTO interactions_fts (id, body) VALUES (?, ?)",
                           (interaction.id, body))

    def conversation_of(self, interaction_id: str) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT conversation_id FROM interactions WHERE id = ?",
                             (interaction_id,)).fetchone()
        return None if row is None else str(row["conversation_id"])

    # Reading -------------------------------------------------------------------------------

    def recent(self, limit: int = 20) -> list[Interaction]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM interactions ORDER BY created_at DESC LIMIT ?",
                              (limit,)).fetchall()
        return [_from_row(row) for row in rows]

    def search(self, text: str, limit: int = 20) -> list[Interaction]:
        """Interactions whose messages, prompt, response or error contain every word of text."""
        words = text.split()
        if not words:
            return self.recent(limit)
        with self._connect() as db:
            if self.has_fts:
                # Each word as a quoted phrase, so FTS operators in user text stay literal.
                query = " ".join('"' + w.replace('"', '""') + '"' for w in words)
                rows = db.execute(
                    "SELECT i.* FROM interactions_fts f JOIN interactions i ON i.id = f.id "
                    "WHERE interactions_fts MATCH ? ORDER BY i.created_at DESC LIMIT ?",
                    (query, limit),
                ).fetchall()
            else:
                clauses = " AND ".join(
                    "(coalesce(messages,'') || coalesce(prompt,'') || response) LIKE ?"
                    for _ in words
                )
                rows = db.execute(
                    f"SELECT * FROM interactions WHERE {clauses} "
                    "ORDER BY created_at DESC LIMIT ?",
                    [f"%{w}%" for w in words] + [limit],
                ).fetchall()
        return [_from_row(row) for row in rows]

    def get(self, id_or_prefix: str) -> Interaction:
        return self._by_prefix("id", id_or_prefix)[0]

    def conversation(self, conversation_id_or_prefix: str) -> list[Interaction]:
        """A conversation's interactions (by id or unique prefix), oldest first."""
        return self._by_prefix("conversation_id", conversation_id_or_prefix)

    def _by_prefix(self, column: str, prefix: str) -> list[Interaction]:
        if not prefix.strip():
            raise InputError(f"give a {column.replace('_', ' ')}")
        with self._connect() as db:
            rows = db.execute(
                f"SELECT * FROM interactions WHERE {column} = ? ORDER BY created_at",
                (prefix,),
            ).fetchall()
            if not rows:
                escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                rows = db.execute(
                    f"SELECT * FROM interactions WHERE {column} LIKE ? ESCAPE '\\' "
                    "ORDER BY created_at",
                    (escaped + "%",),
                ).fetchall()
        matches = {row[column] for row in rows}
        what = "conversation" if column == "conversation_id" else "interaction"
        if not matches:
            raise InputError(f"no {what} {prefix!r} in {self.path}; see `mindset logs`")
        if len(matches) > 1:
            raise InputError(f"{prefix!r} matches {len(matches)} {what}s; give more characters")
        return [_from_row(row) for row in rows]

    def count(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT count(*) FROM interactions").fetchone()[0])


def _to_row(interaction: Interaction) -> dict[str, Any]:
    data = interaction.as_dict()
    for key in ("messages", "params"):
        data[key] = None if data[key] is None else json.dumps(data[key], ensure_ascii=False)
    for key, value in data.items():
        if isinstance(value, str):
            data[key] = redact(value)
    return data


def _from_row(row: sqlite3.Row) -> Interaction:
    data = dict(row)
    data["messages"] = None if data["messages"] is None else json.loads(data["messages"])
    data["params"] = json.loads(data["params"])
    return Interaction(**data)


# Export ------------------------------------------------------------------------------------


def conversation_as_json(interactions: list[Interaction]) -> str:
    return json.dumps([i.as_dict() for i in interactions], indent=2, ensure_ascii=False)


def conversation_as_markdown(interactions: list[Interaction]) -> str:
    """The conversation as Markdown: each call's new input and its reply, branches marked."""
    if not interactions:
        return ""
    lines = [f"# Conversation {interactions[0].conversation_id}", ""]
    for item in interactions:
        parent = f", reply to `{item.parent_id[:8]}`" if item.parent_id else ""
        lines.append(f"## `{item.id[:8]}` · {item.model} ({item.adapter}) · "
                     f"{item.created_at[:19].replace('T', ' ')}{parent}")
        lines.append("")
        for message in _new_input(item):
            lines += [f"**{message['role']}**:", "", message["content"], ""]
        if item.error:
            lines += [f"> error: {item.error}", ""]
        else:
            lines += ["**assistant**:", "", item.response, ""]
        lines.append(f"_{item.prompt_tokens} prompt + {item.completion_tokens} completion "
                     f"tokens, {item.finish_reason or 'unfinished'}_")
        lines.append("")
    return "\n".join(lines)


def _new_input(item: Interaction) -> list[dict[str, str]]:
    """The messages after the last assistant turn: what this call added to the dialogue."""
    if item.messages is None:
        return [{"role": "prompt", "content": item.prompt or ""}]
    tail: list[dict[str, str]] = []
    for message in reversed(item.messages):
        if message["role"] == "assistant":
            break
        tail.append(message)
    return list(reversed(tail))
