"""The journal of a student's knowledge edits: every edit and undo, with its before and after
state, time and note, in ``memory/edits.sqlite`` of the student directory.

An edit is committed to the journal before the student is saved. The saved student records
in its spec (``notes["edits_applied"]``, written in the same atomic directory swap as the
weights) the last journal entry its weights contain; loading replays any later entry. So an
edit survives a crash between the journal and the save, and every edit can be undone, even
across restarts. Tensors are stored as safetensors bytes, never pickles.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.knowledge_edit import Edit, apply_edit, undo_edit

JOURNAL_FILE = "edits.sqlite"
APPLIED_NOTE = "edits_applied"

SCHEMA = """
CREATE TABLE IF NOT EXISTS edits (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    op TEXT NOT NULL,
    layer INTEGER NOT NULL,
    slots TEXT NOT NULL,
    info TEXT NOT NULL,
    note TEXT NOT NULL,
    tensors BLOB NOT NULL,
    undoes INTEGER REFERENCES edits(id),
    undone_by INTEGER REFERENCES edits(id)
);
"""


@dataclass(frozen=True)
class JournalEntry:
    id: int
    created: float
    op: str  # "value", "insert" or "undo"
    layer: int
    slots: list[int]
    info: dict[str, Any]
    note: str
    undoes: int | None
    undone_by: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "time": time.strftime("%Y-%m-%d %H:%M:%S",
                                                     time.localtime(self.created)),
                "op": self.op, "layer": self.layer, "slots": self.slots, "info": self.info,
                "note": self.note, "undoes": self.undoes, "undone_by": self.undone_by}


def _pack(edit: Edit) -> bytes:
    from safetensors.torch import save

    tensors = {f"before.{k}": v.detach().cpu().contiguous() for k, v in edit.before.items()}
    tensors.update({f"after.{k}": v.detach().cpu().contiguous() for k, v in edit.after.items()})
    return save(tensors) if tensors else b""


def _unpack(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load

    tensors = load(blob) if blob else {}
    before = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("before.")}
    after = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("after.")}
    return before, after


class EditJournal:
    """One student's journal (opened per use; every write is its own committed transaction)."""

    def __init__(self, directory: Path | str) -> None:
        self.path = Path(directory) / "memory" / JOURNAL_FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path)
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(SCHEMA)
        return connection

    def record(self, edit: Edit, note: str = "") -> int:
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO edits (created, op, layer, slots, info, note, tensors) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), edit.op, edit.layer, json.dumps(edit.slots),
                 json.dumps(edit.info), note, _pack(edit)))
            return int(cursor.lastrowid or 0)

    def undoable(self, target: int) -> JournalEntry:
        """The entry ``target``, or an error saying why it cannot be undone."""
        entry = self.entry(target)
        if entry.op == "undo":
            raise InputError(f"edit {target} is itself an undo; undo the edit it undid "
                             "again by editing, or pick an edit id from `history`")
        if entry.undone_by is not None:
            raise InputError(f"edit {target} was already undone by edit {entry.undone_by}")
        return entry

    def record_undo(self, target: int, note: str = "") -> int:
        entry = self.undoable(target)
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO edits (created, op, layer, slots, info, note, tensors, undoes) "
                "VALUES (?, 'undo', ?, ?, '{}', ?, ?, ?)",
                (time.time(), entry.layer, json.dumps(entry.slots), note, b"", target))
            undo_id = int(cursor.lastrowid or 0)
            db.execute("UPDATE edits SET undone_by = ? WHERE id = ?", (undo_id, target))
            return undo_id

    def entries(self, after: int = 0) -> list[JournalEntry]:
        return self._rows("id > ?", after) if self.exists() else []

    def _rows(self, where: str, value: int) -> list[JournalEntry]:
        with self._connect() as db:
            rows = db.execute("SELECT id, created, op, layer, slots, info, note, undoes, "
                              f"undone_by FROM edits WHERE {where} ORDER BY id", (value,))
            return [JournalEntry(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]),
                                 r[6], r[7], r[8]) for r in rows.fetchall()]

    def entry(self, edit_id: int) -> JournalEntry:
        found = [e for e in self._rows("id = ?", edit_id)] if self.exists() else []
        if not found:
            raise InputError(f"there is no edit {edit_id} in this student's history; see "
                             "`mindset memory history`")
        return found[0]

    def edit(self, edit_id: int) -> Edit:
        entry = self.entry(edit_id)
        with self._connect() as db:
            (blob,) = db.execute("SELECT tensors FROM edits WHERE id = ?",
                                 (edit_id,)).fetchone()
        before, after = _unpack(blob)
        return Edit(entry.op, entry.layer, entry.slots, before, after, entry.info)

    def last_id(self) -> int:
        entries = self.entries()
        return entries[-1].id if entries else 0

    def copy_to(self, directory: Path) -> None:
        """Copy the journal into another student directory (a consistent snapshot)."""
        if not self.exists():
            return
        target = EditJournal(directory).path
        target.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(self.path) as source, sqlite3.connect(target) as copy:
            source.backup(copy)


def replay(model: nn.Module, journal: EditJournal, applied: int) -> int:
    """Apply every journal entry after ``applied`` to ``model``; the last id applied."""
    last = applied
    for entry in journal.entries(applied):
        if entry.op == "undo":
            assert entry.undoes is not None
            undo_edit(model, journal.edit(entry.undoes))
        else:
            apply_edit(model, journal.edit(entry.id))
        last = entry.id
    return last

