"""The dialog tree of a chat: every message kept, with its branches, in a SQLite file.

A conversation is a tree of immutable messages (:class:`DialogNode`). Editing an earlier
turn or regenerating a reply adds a sibling with the same parent and role, so no text is
lost; the visible conversation is the path from the root that follows each parent's
*selected* child. Selection has its own table and is, with titles, the only state that
changes: a message's row is written once, except that an empty label (importance, arousal,
valence, emotion) may be filled in once and meta keys added (:meth:`DialogStore.annotate`),
which an SQL trigger enforces too.

The terminal chat and the workbench may open one file at once: it uses WAL with a busy
timeout, each write is one ``BEGIN IMMEDIATE`` transaction (a crash loses at most the
write in flight) and nothing another writer can change is cached. A node's
``interaction_id`` names the LLM call in :mod:`engine.llm.log` that produced it; the
conversation id is passed to those calls as their ``conversation_id``.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from engine.agent.dialog_schema import (
    PATH_SQL,
    PATH_TO_SQL,
    ROLES,
    SCHEMA_VERSION,
    check_labels,
    check_text,
    migrate,
    normalised_meta,
)
from engine.errors import InputError, MindsetError, flat_text

__all__ = ["ROLES", "SCHEMA_VERSION", "ConversationInfo", "DialogNode", "DialogStore"]
EXPORT_FORMATS = ("markdown", "json")
_ROOT = ""  # the selection key of a conversation's first messages: node ids are never empty
@dataclass(frozen=True)
class DialogNode:
    """One message of a conversation tree."""

    id: str  # uuid4 hex
    conversation_id: str
    parent_id: str | None  # None for the first message of a conversation
    role: str  # one of ROLES; "inner" is inner dialogue, hidden by default
    content: str
    created: float  # unix time
    model: str | None  # which model answered (None for user turns)
    interaction_id: str | None  # the interaction log id of the call that produced it
    arousal: float | None  # emotion label, each in [-1, 1]
    valence: float | None
    emotion: str | None  # a short word or two, e.g. "calm, positive"
    importance: int | None  # 1..10
    meta: dict[str, Any] = field(hash=False)  # JSON extras: retrieved memory ids, tool calls


@dataclass(frozen=True)
class ConversationInfo:
    id: str
    title: str
    created: float
    updated: float
    messages: int  # messages stored, on every branch


class DialogStore:
    """Conversation trees in one SQLite file; safe to share between threads and processes."""

    def __init__(self, path: str | Path) -> None:
        self.file = Path(path)  # not `path`: that is the visible-path method
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.file, timeout=10, isolation_level=None,
                                 check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise MindsetError(f"cannot open the dialog file {self.file}: {flat_text(exc)}"
                               ) from exc
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a turn shown as saved survives a power cut too; dialog writes are rare.
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            migrate(db, self.file)
        except sqlite3.DatabaseError as exc:
            db.close()
            raise MindsetError(f"the dialog file {self.file} is unreadable ({flat_text(exc)}); "
                               "move it aside and a new one will be created") from exc
        except BaseException:
            db.close()
            raise
        self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> DialogStore:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @contextmanager
    def _transaction(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction. A write takes the lock first (IMMEDIATE), so its reads (the end
        of the path, the labels already set) cannot go stale under another process."""
        with self._lock:
            db = self._db
            if db is None:
                raise MindsetError(f"the dialog file {self.file} is closed; open it again")
            try:
                db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise MindsetError(f"cannot use the dialog file {self.file}: "
                                   f"{flat_text(exc)}") from exc

    # Conversations -------------------------------------------------------------------------

    def new_conversation(self, title: str = "") -> str:
        check_text("a conversation title", title, optional=False)
        conversation_id = uuid.uuid4().hex
        with self._transaction(write=True) as db:
            now = _next_time(db)
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?)",
                       (conversation_id, title, now, now))
        return conversation_id

    def conversations(self) -> list[ConversationInfo]:
        """Every conversation, the most recently changed first."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT c.*, (SELECT count(*) FROM nodes n WHERE n.conversation_id = c.id) "
                "FROM conversations c ORDER BY c.updated DESC, c.rowid DESC").fetchall()
        return [ConversationInfo(*row) for row in rows]

    def rename(self, conversation_id: str, title: str) -> None:
        check_text("a conversation title", title, optional=False)
        with self._transaction(write=True) as db:
            _conversation(db, conversation_id)
            db.execute("UPDATE conversations SET title = ? WHERE id = ?",
                       (title, conversation_id))
            _touch(db, conversation_id)

    def delete_conversation(self, conversation_id: str) -> None:
        """Delete a conversation with all its messages and branches."""
        with self._transaction(write=True) as db:
            _conversation(db, conversation_id)
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # Writing messages ----------------------------------------------------------------------

    def add(self, conversation_id: str, parent_id: str | None, role: str, content: str, *,
            model: str | None = None, interaction_id: str | None = None,
            arousal: float | None = None, valence: float | None = None,
            emotion: str | None = None, importance: int | None = None,
            meta: dict[str, Any] | None = None, created: float | None = None) -> DialogNode:
        """Add a message under ``parent_id`` (None: a first message) and select it and its
        ancestors, so it is on the visible path."""
        row = _new_row(role, content, model=model, interaction_id=interaction_id,
                       arousal=arousal, valence=valence, emotion=emotion,
                       importance=importance, meta=meta, created=created)
        with self._transaction(write=True) as db:
            return _insert(db, conversation_id, parent_id, row)

    def append(self, conversation_id: str, role: str, content: str,
               **fields: Any) -> DialogNode:
        """Add a message at the end of the visible path (``fields`` as for :meth:`add`)."""
        row = _new_row(role, content, **fields)
        with self._transaction(write=True) as db:
            _conversation(db, conversation_id)
            path = _nodes(db, PATH_SQL, c=conversation_id)
            return _insert(db, conversation_id, path[-1].id if path else None, row)

    def edit(self, node_id: str, content: str, **fields: Any) -> DialogNode:
        """A new branch beside ``node_id``: same parent and role, new content; selected.
        Its meta records ``edited_from``."""
        return self._branch(node_id, content, "edited_from", fields)

    def regenerate(self, node_id: str, content: str, **fields: Any) -> DialogNode:
        """Another reply beside the assistant message ``node_id``; selected. Its meta
        records ``regenerated_from``."""
        return self._branch(node_id, content, "regenerated_from", fields)

    def _branch(self, node_id: str, content: str, origin: str,
                fields: dict[str, Any]) -> DialogNode:
        check_text("a message's content", content, optional=False)
        meta = normalised_meta(fields.pop("meta", None))
        with self._transaction(write=True) as db:
            original = _node(db, node_id)
            if origin == "regenerated_from" and original.role != "assistant":
                raise InputError(f"message {node_id} is a {original.role} turn; only an "
                                 "assistant reply can be regenerated (edit it instead)")
            row = _new_row(original.role, content, meta={**meta, origin: original.id},
                           **fields)
            return _insert(db, original.conversation_id, original.parent_id, row)

    def annotate(self, node_id: str, *, importance: int | None = None,
                 arousal: float | None = None, valence: float | None = None,
                 emotion: str | None = None, meta: dict[str, Any] | None = None
                 ) -> DialogNode:
        """Fill in labels that are still empty and add meta keys, once: a rating that
        arrives after the message was shown is recorded, and the message stays immutable.
        Giving a label or key the value it already has is no change; another is refused."""
        labels = check_labels(importance=importance, arousal=arousal, valence=valence,
                               emotion=emotion)
        extra = normalised_meta(meta)
        with self._transaction(write=True) as db:
            current = _node(db, node_id)
            updates: dict[str, Any] = {}
            for name, value in labels.items():
                old = getattr(current, name)
                if value is not None and old is None:
                    updates[name] = value
                elif value is not None and old != value:
                    raise InputError(f"message {node_id} already has {name} {old!r}; labels "
                                     "are written once (add a branch to change them)")
            for key, value in extra.items():
                if key in current.meta and current.meta[key] != value:
                    raise InputError(f"message {node_id} already has meta {key!r}; meta keys "
                                     "are added, never overwritten")
            if not extra.keys() <= current.meta.keys():
                updates["meta"] = json.dumps({**current.meta, **extra}, ensure_ascii=False)
            if not updates:
                return current
            assignments = ", ".join(f"{name} = ?" for name in updates)
            db.execute(f"UPDATE nodes SET {assignments} WHERE id = ?",
                       [*updates.values(), node_id])
            _touch(db, current.conversation_id)
            return _node(db, node_id)

    def select(self, node_id: str) -> None:
        """Make ``node_id`` the selected child of its parent, and each ancestor the selected
        child of its own, so the visible path runs through it."""
        with self._transaction(write=True) as db:
            _show(db, _node(db, node_id))

    def switch(self, node_id: str, step: int) -> DialogNode:
        """Select the sibling ``step`` places from ``node_id`` (wrapping) and return it."""
        with self._transaction(write=True) as db:
            siblings = _siblings(db, _node(db, node_id))
            index = next(i for i, s in enumerate(siblings) if s.id == node_id)
            chosen = siblings[(index + step) % len(siblings)]
            _show(db, chosen)
        return chosen

    # Reading -------------------------------------------------------------------------------

    def node(self, node_id: str) -> DialogNode:
        with self._transaction() as db:
            return _node(db, node_id)

    def children(self, node_id: str | None, conversation_id: str) -> list[DialogNode]:
        """The replies to ``node_id`` (None: the first messages), oldest first."""
        with self._transaction() as db:
            _conversation(db, conversation_id)
            if node_id is not None:
                _member(db, node_id, conversation_id)
            return _nodes(db, "SELECT * FROM nodes WHERE conversation_id = :c AND parent_id "
                              "IS :p ORDER BY seq", c=conversation_id, p=node_id)

    def siblings(self, node_id: str) -> list[DialogNode]:
        """``node_id`` and the other branches beside it, oldest first."""
        with self._transaction() as db:
            return _siblings(db, _node(db, node_id))

    def position(self, node_id: str) -> tuple[int, int]:
        """(1-based index among its siblings, number of siblings)."""
        siblings = self.siblings(node_id)
        return next(i for i, s in enumerate(siblings, 1) if s.id == node_id), len(siblings)

    def path(self, conversation_id: str) -> list[DialogNode]:
        """The visible conversation, oldest first."""
        with self._transaction() as db:
            _conversation(db, conversation_id)
            return _nodes(db, PATH_SQL, c=conversation_id)

    def path_to(self, node_id: str) -> list[DialogNode]:
        """The messages from the root down to ``node_id``, inclusive."""
        with self._transaction() as db:
            return _nodes(db, PATH_TO_SQL, n=_node(db, node_id).id)

    def leaves(self, conversation_id: str) -> list[DialogNode]:
        """The last message of every branch, oldest first."""
        with self._transaction() as db:
            _conversation(db, conversation_id)
            return _nodes(db, "SELECT * FROM nodes n WHERE conversation_id = :c AND NOT "
                              "EXISTS (SELECT 1 FROM nodes k WHERE k.parent_id = n.id) "
                              "ORDER BY seq", c=conversation_id)

    def search(self, text: str, limit: int = 20, *, conversation_id: str | None = None,
               include_inner: bool = False) -> list[DialogNode]:
        """Messages containing every word of ``text`` (case-insensitive), newest first."""
        words = text.split() if isinstance(text, str) else []
        if not words:
            raise InputError("give some text to search the conversations for")
        # Each word a LIKE pattern with its wildcards escaped, so "100%" means "100%".
        params: dict[str, Any] = {f"w{i}": "%" + w.replace("\\", "\\\\").replace(
            "%", "\\%").replace("_", "\\_") + "%" for i, w in enumerate(words)}
        clauses = [f"content LIKE :{name} ESCAPE '\\'" for name in params]
        if conversation_id is not None:
            clauses.append("conversation_id = :c")
        if not include_inner:
            clauses.append("role != 'inner'")
        with self._transaction() as db:
            if conversation_id is not None:
                _conversation(db, conversation_id)
            return _nodes(db, f"SELECT * FROM nodes WHERE {' AND '.join(clauses)} "
                              "ORDER BY seq DESC LIMIT :limit", **params, c=conversation_id,
                          limit=int(limit))

    def export(self, conversation_id: str, fmt: str = "markdown", *,
               leaf_id: str | None = None, include_inner: bool = False) -> str:
        """One branch as Markdown or JSON: the visible one, or the path to ``leaf_id`` (any
        message of the conversation). Inner dialogue only with ``include_inner``."""
        if fmt not in EXPORT_FORMATS:
            raise InputError(f"unknown export format {fmt!r}; choose one of "
                             f"{', '.join(EXPORT_FORMATS)}")
        with self._transaction() as db:
            info = _conversation(db, conversation_id)
            nodes = (_nodes(db, PATH_SQL, c=conversation_id) if leaf_id is None else
                     _nodes(db, PATH_TO_SQL, n=_member(db, leaf_id, conversation_id).id))
        nodes = [n for n in nodes if include_inner or n.role != "inner"]
        if fmt == "json":
            return json.dumps({**dict(info), "nodes": [asdict(n) for n in nodes]},
                              indent=2, ensure_ascii=False)
        return _markdown(info["id"], info["title"], nodes)


# Queries, inside a transaction ---------------------------------------------------------------


def _conversation(db: sqlite3.Connection, conversation_id: str) -> sqlite3.Row:
    row = db.execute("SELECT * FROM conversations WHERE id = ?",
                     (str(conversation_id),)).fetchone()
    if row is None:
        raise InputError(f"no conversation with id {conversation_id!r}; "
                         "list them with conversations()")
    return row


def _nodes(db: sqlite3.Connection, sql: str, **params: Any) -> list[DialogNode]:
    return [_from_row(row) for row in db.execute(sql, params)]


def _node(db: sqlite3.Connection, node_id: str) -> DialogNode:
    found = _nodes(db, "SELECT * FROM nodes WHERE id = :n", n=str(node_id))
    if not found:
        raise InputError(f"no message with id {node_id!r}")
    return found[0]


def _member(db: sqlite3.Connection, node_id: str, conversation_id: str) -> DialogNode:
    node = _node(db, node_id)
    if node.conversation_id != conversation_id:
        raise InputError(f"message {node_id} is in conversation {node.conversation_id}, "
                         f"not in conversation {conversation_id}")
    return node


def _siblings(db: sqlite3.Connection, node: DialogNode) -> list[DialogNode]:
    return _nodes(db, "SELECT * FROM nodes WHERE conversation_id = :c AND parent_id IS :p "
                      "ORDER BY seq", c=node.conversation_id, p=node.parent_id)


def _show(db: sqlite3.Connection, node: DialogNode) -> None:
    """Select ``node`` and every ancestor, so the visible path runs through it."""
    for step in _nodes(db, PATH_TO_SQL, n=node.id):
        db.execute("INSERT INTO selection VALUES (?, ?, ?) ON CONFLICT "
                   "(conversation_id, parent_key) DO UPDATE SET child_id = excluded.child_id",
                   (step.conversation_id, step.parent_id or _ROOT, step.id))
    _touch(db, node.conversation_id)


def _next_time(db: sqlite3.Connection) -> float:
    """Now, but later than every stored ``updated``, so newest-first holds even when the
    clock steps back or two writes share a tick."""
    latest = db.execute("SELECT max(updated) FROM conversations").fetchone()[0]
    now = time.time()
    return now if latest is None or now > latest else math.nextafter(latest, math.inf)


def _touch(db: sqlite3.Connection, conversation_id: str) -> None:
    db.execute("UPDATE conversations SET updated = ? WHERE id = ?",
               (_next_time(db), conversation_id))


def _insert(db: sqlite3.Connection, conversation_id: str, parent_id: str | None,
            row: dict[str, Any]) -> DialogNode:
    _conversation(db, conversation_id)
    if parent_id is not None:
        _member(db, parent_id, conversation_id)
    row = {"id": uuid.uuid4().hex, "conversation_id": conversation_id,
           "parent_id": parent_id, **row}
    db.execute(f"INSERT INTO nodes ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
               list(row.values()))
    node = _node(db, row["id"])
    _show(db, node)
    return node


def _from_row(row: sqlite3.Row) -> DialogNode:
    data = dict(row)
    del data["seq"]
    return DialogNode(**{**data, "meta": json.loads(data["meta"])})


# Validation: every check runs before anything is written ------------------------------------


def _new_row(role: str, content: str, *, model: str | None = None,
             interaction_id: str | None = None, meta: dict[str, Any] | None = None,
             created: float | None = None, **labels: Any) -> dict[str, Any]:
    """The columns of a new message, checked (``labels``: as for :func:`check_labels`)."""
    if not isinstance(role, str) or role not in ROLES:
        raise InputError(f"role {role!r} is not one of {', '.join(ROLES)}")
    check_text("a message's content", content, optional=False)
    if created is None:
        created = time.time()
    elif isinstance(created, bool) or not isinstance(created, int | float) \
            or not math.isfinite(created):
        raise InputError(f"created must be a unix time in seconds, not {created!r}")
    return {"role": role, "content": content, "created": float(created),
            "model": check_text("model", model),
            "interaction_id": check_text("interaction_id", interaction_id),
            **check_labels(**labels),
            "meta": json.dumps(normalised_meta(meta), ensure_ascii=False)}


def _markdown(conversation_id: str, title: str, nodes: list[DialogNode]) -> str:
    lines = [f"# {title or f'Conversation {conversation_id[:8]}'}", ""]
    for node in nodes:
        when = datetime.fromtimestamp(node.created, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        heading = [node.role, *([node.model] if node.model else []), when]
        feeling = ", ".join(f"{name} {value:+.2f}" for name in ("arousal", "valence")
                            if (value := getattr(node, name)) is not None)
        emotion = " ".join(p for p in (node.emotion, f"({feeling})" if feeling else "") if p)
        if emotion:
            heading.append(emotion)
        if node.importance is not None:
            heading.append(f"importance {node.importance}")
        lines += [f"## {' · '.join(heading)}", "", node.content, ""]
    return "\n".join(lines)
