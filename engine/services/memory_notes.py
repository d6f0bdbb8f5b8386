"""What the student directory adds to its memory rows in the workbench: annotations
(triggers, measured promotes, auto-labels; see :mod:`engine.model.annotate`), the names of the
rows a trace ranks, and the edit journal that a featural row's value edit is written to.

Annotations live in the student directory (``memory/annotations.sqlite``) and are keyed by
layer and slot; a featural mirror row names its slot in ``meta["slot"]``. Every function here
runs on the store's thread.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from engine.runtime import STUDENT, Runtime
from engine.services.memory_mirror import associative_table_name, featural_table_name
from engine.views import EntryView, TracedRow

if TYPE_CHECKING:
    import numpy as np

    from engine.memory import MemoryRow, MemoryStore
    from engine.model.annotate import Annotations
    from engine.model.memory_trace import TracedEntry
    from engine.services.memory_live import LiveMirrors
    from engine.services.memory_mirror import FeaturalTable


def student_directory(runtime: Runtime) -> Path | None:
    """The loaded student's directory (None: no student, or not loaded from one)."""
    loaded = runtime.model(STUDENT)
    if loaded is None:
        return None
    from engine.model.student import is_student_dir

    directory = Path(str(loaded.source or loaded.spec))
    return directory if is_student_dir(directory) else None


def student_annotations(runtime: Runtime) -> Annotations | None:
    """The loaded student's annotations, when it was loaded from a student directory."""
    from engine.model.annotate import Annotations

    directory = student_directory(runtime)
    return Annotations(directory) if directory is not None else None


def journal_value_edit(runtime: Runtime, mirror: FeaturalTable, slot: int,
                       value: np.ndarray, note: str) -> None:
    """Journal a featural slot's new ``value`` (before it is written into the live slot),
    so a Memory pane edit is in the history and can be undone like any knowledge edit."""
    import torch

    from engine.model.edit_journal import APPLIED_NOTE, EditJournal
    from engine.model.knowledge_edit import Edit
    from engine.model.surgery import student_spec

    directory = student_directory(runtime)
    loaded = runtime.model(STUDENT)
    if directory is None or loaded is None or not 0 <= slot < mirror.module.num_slots:
        return
    before = mirror.module.values.detach()[slot:slot + 1].clone()
    after = torch.as_tensor(value, dtype=before.dtype).reshape(1, -1)
    edit = Edit("value", mirror.layer, [slot], {"values": before}, {"values": after},
                {"what": note})
    edit_id = EditJournal(directory).record(edit, note)
    spec = student_spec(loaded.model)
    if spec is not None:
        spec.notes[APPLIED_NOTE] = edit_id


def annotate_views(annotations: Annotations | None, mirror: FeaturalTable,
                   rows: list[MemoryRow], views: list[EntryView]) -> None:
    """Give each view of a featural mirror row its slot and, where the slot is annotated,
    its triggers, measured promotes and auto-label."""
    slots = [row.meta.get("slot") for row in rows]
    for view, slot in zip(views, slots, strict=True):
        view.slot = slot if isinstance(slot, int) else None
    if annotations is None:
        return
    found = annotations.get_many(mirror.layer, [s for s in slots if isinstance(s, int)])
    for view in views:
        note = found.get(view.slot) if view.slot is not None else None
        if note is None:
            continue
        view.triggers = list(note["triggers"])
        view.auto_label = str(note["label"])
        if note["promotes"]:
            view.top_tokens = list(note["promotes"])
            view.promotes_measured = True


def label_annotation(runtime: Runtime, mirror: FeaturalTable | None, row: MemoryRow,
                     label: str) -> None:
    """Keep a featural row's user label in the student's annotations too (``memory trace``
    in the CLI shows it)."""
    annotations = student_annotations(runtime)
    slot = row.meta.get("slot")
    if mirror is not None and annotations is not None and isinstance(slot, int):
        annotations.set_label(mirror.layer, slot, label)


def annotated_ids(annotations: Annotations | None, mirror: FeaturalTable, text: str,
                  limit: int) -> list[int]:
    """Row ids of the mirror's slots whose annotations mention ``text``, strongest first."""
    if annotations is None:
        return []
    found = annotations.search(text, limit, layer=mirror.layer)
    slots = [int(note["slot"]) for note in found]
    return [int(mirror.ids[s]) for s in slots if 0 <= s < len(mirror.ids) and mirror.ids[s] >= 0]


def traced_rows(live: LiveMirrors, store: MemoryStore | None,
                annotations: Annotations | None, entries: list[TracedEntry]) -> list[TracedRow]:
    """Each traced read named by its mirror table and row, with the row's label (the user's,
    else the annotation's)."""
    out: list[TracedRow] = []
    for entry in entries:
        table = (featural_table_name(entry.layer) if entry.kind == "featural"
                 else associative_table_name(entry.layer))
        mirror = live.get(table)
        entry_id = None
        if mirror is not None and 0 <= entry.entry < len(mirror.ids) \
                and mirror.ids[entry.entry] >= 0:
            entry_id = int(mirror.ids[entry.entry])
        out.append(TracedRow(entry.layer, entry.kind, table, entry_id, entry.entry, entry.head,
                             entry.weight, entry.influence))
    if store is None:
        return out
    for table in {row.table for row in out if row.entry_id is not None}:
        mine = [row for row in out if row.table == table and row.entry_id is not None]
        labels = {r.id: r.label or "" for r in
                  store.table(table).get(sorted({row.entry_id for row in mine
                                                 if row.entry_id is not None}))}
        notes = {}
        if annotations is not None and table.endswith("_featural"):
            notes = annotations.get_many(mine[0].layer, [row.slot for row in mine])
        for row in mine:
            assert row.entry_id is not None
            note = notes.get(row.slot)
            row.label = labels.get(row.entry_id) or (str(note["label"]) if note else "")
    return out
