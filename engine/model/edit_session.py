"""Edits that are journaled and saved in one step: what the CLI and the benchmark call.

An edit is first applied to the loaded student, then committed to the journal, then the
student is saved with the journal's last id in its spec (see :mod:`engine.model.edit_journal`
for why that order loses nothing in a crash).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from engine.model.edit_journal import APPLIED_NOTE, EditJournal
from engine.model.knowledge_edit import Edit, undo_edit
from engine.model.student import save_student
from engine.model.surgery import student_spec


def commit(model: nn.Module, directory: Path | str, edit: Edit, note: str = "",
           tokenizer: Any = None) -> int:
    """Journal an edit already applied to ``model``, then save the student; its journal id."""
    edit_id = EditJournal(directory).record(edit, note)
    spec = student_spec(model)
    assert spec is not None
    spec.notes[APPLIED_NOTE] = edit_id
    save_student(model, directory, tokenizer)
    return edit_id


def undo(model: nn.Module, directory: Path | str, edit_id: int, note: str = "",
         tokenizer: Any = None) -> int:
    """Undo journal entry ``edit_id`` on ``model``, journal the undo and save; its id."""
    journal = EditJournal(directory)
    journal.undoable(edit_id)  # before the model changes
    undo_edit(model, journal.edit(edit_id))
    undo_id = journal.record_undo(edit_id, note)
    spec = student_spec(model)
    assert spec is not None
    spec.notes[APPLIED_NOTE] = undo_id
    save_student(model, directory, tokenizer)
    return undo_id
