"""Reconciling a mirror table with the student it mirrors, when the student loads.

The table holds the user's work (labels, tags, access counts, edited values, deletions); the
student directory holds what was last saved. When they disagree nothing is discarded:

* featural rows map to slots through ``meta["slot"]`` (never row order). A row whose value
  differs from its slot is the user's edit when it is marked pending (not yet saved): it is
  re-applied to the live slot; otherwise the student changed and the row takes its value
  (label, tags, access counts kept). A slot below the table's recorded slot count
  (``meta["slots"]``) with no row was deleted and stays deleted (zeroed in the live layer);
  slots beyond it are new and get rows; rows pointing at slots the student lacks are kept,
  tagged ``orphan``.
* associative rows match cache entries by key. Edited values marked pending win, as above;
  rows the student lacks are kept in the live layer when pending (inserted or merged here),
  else tagged ``orphan`` and left out of it; cache entries with no row stay deleted when a
  ledger table (``<table>.deleted``) says the workbench removed them, else they get rows.

Each step that changes something leaves a one-line message for the user.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from engine.memory import MemoryRow, MemoryStore, MemoryTable

MIRROR_MARK = "#layer"
PENDING = "pending"  # meta flag: a change to the live student not yet saved to its directory
ORPHAN = "orphan"  # tag: the row's slot or entry is no longer in the student
LEDGER_SUFFIX = ".deleted"  # the entries removed from an associative mirror since the last save
PAGE = 10_000


@dataclass
class Reconciled:
    """What a reconciliation found: the messages to show and the rows it left pending."""

    messages: list[str] = field(default_factory=list)
    pending: set[int] = field(default_factory=set)
    orphans: set[int] = field(default_factory=set)

    def say(self, count: int, table: str, text: str) -> None:
        if count:
            self.messages.append(f"{table}: {count} {text}")


@dataclass
class Stored:
    """A table's rows as the reconciliation reads them: ids, keys and values (in id order,
    from the table's memory) and each row's meta (one light SQL read)."""

    ids: np.ndarray
    keys: np.ndarray
    values: np.ndarray
    metas: list[dict[str, object]]

    @classmethod
    def of(cls, table: MemoryTable) -> Stored:
        ids, keys, values = table.export_arrays()
        meta_ids, metas = table.metas()
        by_id = dict(zip(meta_ids.tolist(), metas, strict=True))
        return cls(ids, keys, values, [by_id.get(i, {}) for i in ids.tolist()])


def all_rows(table: MemoryTable) -> list[MemoryRow]:
    """Every row of ``table`` in id order, read page by page."""
    rows: list[MemoryRow] = []
    while True:
        page = table.page(len(rows), PAGE)
        rows.extend(page)
        if len(page) < PAGE:
            return rows


def same_student(provenance: str | None, source: str) -> bool:
    """Whether a row's provenance names the same student and layer as ``source`` (paths
    compared resolved, so ``./student`` and its absolute path agree)."""
    if not provenance or MIRROR_MARK not in provenance:
        return False
    spec, _, layer = provenance.rpartition(MIRROR_MARK)
    want_spec, _, want_layer = source.rpartition(MIRROR_MARK)
    if layer != want_layer:
        return False
    if spec == want_spec:
        return True
    try:
        return Path(spec).expanduser().resolve() == Path(want_spec).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False


def user_work(rows: Iterable[MemoryRow]) -> int:
    """How many rows carry something of the user's: a label, tags or an unsaved change."""
    return sum(1 for row in rows if row.label or row.tags or row.meta.get(PENDING))


def tag_orphans(table: MemoryTable, ids: list[int]) -> None:
    import numpy as np

    for row in table.get(ids) if ids else []:
        if ORPHAN not in row.tags:
            table.update(np.asarray([row.id], dtype=np.int64), tags=[*row.tags, ORPHAN])


def with_pending(meta: dict[str, object], pending: bool) -> dict[str, object]:
    """``meta`` with the pending flag set or cleared."""
    result = {key: value for key, value in meta.items() if key != PENDING}
    if pending:
        result[PENDING] = True
    return result


def mark_pending(table: MemoryTable, ids: Iterable[int], pending: bool = True) -> None:
    """Set (or clear) the pending flag of existing rows, keeping the rest of their meta."""
    import numpy as np

    present = set(table.ids().tolist())
    wanted = [int(i) for i in ids if int(i) in present]
    for row in table.get(wanted) if wanted else []:
        if bool(row.meta.get(PENDING)) != pending:
            table.update(np.asarray([row.id], dtype=np.int64),
                         meta=with_pending(row.meta, pending))


# ------------------------------------------------------------------------------ featural


def reconcile_featural(
    table: MemoryTable, stored: Stored, keys: np.ndarray, live: np.ndarray, source: str,
) -> tuple[np.ndarray, Reconciled]:
    """Map the ``stored`` rows onto the student's slots (``keys``, ``live`` values, changed
    in place where the table wins) and fix up the table; returns the row id of each slot
    (-1: deleted) and what was done."""
    import numpy as np

    name = table.name
    slots = len(live)
    done = Reconciled()
    recorded = max((_count(meta.get("slots"), slots) for meta in stored.metas), default=slots)
    ids = np.full(slots, -1, dtype=np.int64)
    orphans: list[int] = []
    rows: list[int] = []  # positions in ``stored`` of the rows that own a slot
    taken: list[int] = []
    free = [True] * slots
    for row, (entry_id, meta) in enumerate(zip(stored.ids.tolist(), stored.metas, strict=True)):
        slot = meta.get("slot")
        if not isinstance(slot, int) or not 0 <= slot < slots or not free[slot]:
            orphans.append(entry_id)
            continue
        free[slot] = False
        rows.append(row)
        taken.append(slot)
    at = np.asarray(rows, dtype=np.int64)
    owned = np.asarray(taken, dtype=np.int64)
    ids[owned] = stored.ids[at]
    pending = np.asarray([bool(stored.metas[i].get(PENDING)) for i in rows], dtype=bool)
    done.pending.update(stored.ids[at[pending]].tolist())
    differs = (stored.values[at] != live[owned]).any(axis=1) if len(at) else pending
    wins = differs & pending  # the user's unsaved edits: back into the live slots
    live[owned[wins]] = stored.values[at[wins]]
    reapplied = int(wins.sum())
    changed = list(zip(stored.ids[at[differs & ~pending]].tolist(),
                       owned[differs & ~pending].tolist(), strict=True))
    rekey = (stored.keys[at] != keys[owned]).any(axis=1) if len(at) else pending
    rekeyed = list(zip(stored.ids[at[rekey]].tolist(), owned[rekey].tolist(), strict=True))
    if changed:
        table.update(np.asarray([i for i, _ in changed], dtype=np.int64),
                     values=live[[s for _, s in changed]])
    if rekeyed:
        table.update(np.asarray([i for i, _ in rekeyed], dtype=np.int64),
                     keys=keys[[s for _, s in rekeyed]])
    missing = np.flatnonzero(ids < 0)
    deleted = missing[missing < recorded]
    unsaved = [int(s) for s in deleted if live[s].any()]
    live[deleted] = 0.0
    new = missing[missing >= recorded]
    if len(new):
        ids[new] = table.insert(keys[new], live[new],
                                meta=[{"slot": int(s), "slots": slots} for s in new],
                                provenance=source)
    tag_orphans(table, orphans)
    done.orphans = set(orphans)
    done.say(reapplied, name, "edited values not yet saved to the student were re-applied to "
             "the live layer (the student on disk is older); save the student (w) to keep them")
    done.say(len(unsaved), name, "deleted entries are still in the student on disk: they stay "
             "deleted (zeroed) here; save the student (w) to delete them there too")
    done.say(len(changed), name, "slots changed in the student since the table was written: "
             "their rows now hold the student's values (labels, tags, access counts kept)")
    done.say(len(new), name, "slots are new in the student and got rows")
    done.say(len(orphans), name, f"rows point at slots the student does not have: kept, "
             f"tagged '{ORPHAN}'")
    return ids, done


def _count(value: object, default: int) -> int:
    return value if isinstance(value, int) and value > 0 else default


# --------------------------------------------------------------------------- associative


def reconcile_associative(
    store: MemoryStore, table: MemoryTable, stored: Stored, keys: np.ndarray,
    values: np.ndarray, source: str,
) -> Reconciled:
    """Match the ``stored`` rows to the cache entries (``keys``, ``values``) by key and fix
    up the table; the caller then reloads the live cache from it (orphans left out)."""
    import numpy as np

    name = table.name
    done = Reconciled()
    positions: dict[bytes, list[int]] = {}
    for position, key in enumerate(keys):
        positions.setdefault(key.tobytes(), []).append(position)
    matched = np.zeros(len(keys), dtype=bool)
    reapplied = kept = 0
    changed: list[tuple[int, int]] = []
    orphans: list[int] = []
    for at, (entry_id, meta) in enumerate(zip(stored.ids.tolist(), stored.metas, strict=True)):
        pending = bool(meta.get(PENDING))
        if pending:
            done.pending.add(entry_id)
        bucket = positions.get(stored.keys[at].tobytes())
        if not bucket:
            if pending:
                kept += 1
            else:
                orphans.append(entry_id)
            continue
        position = bucket.pop(0)
        matched[position] = True
        if np.array_equal(stored.values[at], values[position]):
            continue
        if pending:
            reapplied += 1
        else:
            changed.append((entry_id, position))
    if changed:
        table.update(np.asarray([i for i, _ in changed], dtype=np.int64),
                     values=values[[p for _, p in changed]])
    # Each ledger entry keeps one unmatched cache entry deleted. The ledger is written before
    # the rows leave the table, so an entry whose key still has a row (a crash between the
    # two writes) is stale: the row wins and the entry is dropped.
    removed: dict[bytes, list[int]] = {}
    for ledger_id, key in zip(*ledger_entries(store, name), strict=True):
        removed.setdefault(key.tobytes(), []).append(int(ledger_id))
    deleted: list[int] = []
    new: list[int] = []
    for p in np.flatnonzero(~matched).tolist():
        bucket = removed.get(keys[p].tobytes())
        if bucket:
            bucket.pop(0)
            deleted.append(int(p))
        else:
            new.append(int(p))
    rows_keys = {key.tobytes() for key in stored.keys}
    stale = [i for key, bucket in removed.items() if key in rows_keys for i in bucket]
    if stale:
        store.table(ledger_name(name)).delete(np.asarray(stale, dtype=np.int64))
    if new:
        table.insert(keys[new], values[new], meta=[{"position": p} for p in new],
                     provenance=source)
    tag_orphans(table, orphans)
    done.orphans = set(orphans)
    done.say(reapplied, name, "edited values not yet saved to the student were re-applied to "
             "the live layer (the student on disk is older); save the student (w) to keep them")
    done.say(kept, name, "entries added here are not yet in the student on disk: they stay "
             "in the live layer; save the student (w) to keep them")
    done.say(len(deleted), name, "entries deleted here are still in the student on disk: they "
             "stay deleted; save the student (w) to delete them there too")
    done.say(len(changed), name, "entries changed in the student since the table was written: "
             "their rows now hold the student's values (labels, tags, access counts kept)")
    done.say(len(new), name, "entries are new in the student and got rows")
    done.say(len(orphans), name, f"rows hold entries the student does not have: kept, tagged "
             f"'{ORPHAN}', left out of the live layer")
    return done


# --------------------------------------------------------------------------------- ledger


def ledger_name(table: str) -> str:
    return table + LEDGER_SUFFIX


def is_ledger(table: str) -> bool:
    return table.endswith(LEDGER_SUFFIX)


def ledger_entries(store: MemoryStore, table: str) -> tuple[np.ndarray, np.ndarray]:
    """The ledger ids and keys of entries removed from ``table`` since the student was last
    saved."""
    import numpy as np

    name = ledger_name(table)
    if name not in store.table_names():
        return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
    ids, keys, _ = store.table(name).export_arrays()
    return ids, keys


def record_removed(store: MemoryStore, table: MemoryTable, keys: np.ndarray,
                   values: np.ndarray) -> np.ndarray:
    """Remember entries (about to be) removed from an associative mirror, until the student
    is saved; returns their ledger ids (see :func:`unrecord`)."""
    import numpy as np

    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    ledger = store.create_table(ledger_name(table.name), table.key_dim, table.value_dim,
                                exist_ok=True)
    return np.asarray(ledger.insert(keys, values), dtype=np.int64)


def unrecord(store: MemoryStore, table: str, ledger_ids: np.ndarray) -> None:
    """Drop ledger entries written by :func:`record_removed` for entries that stayed."""
    import numpy as np

    name = ledger_name(table)
    if len(ledger_ids) and name in store.table_names():
        store.table(name).delete(np.asarray(ledger_ids, dtype=np.int64))


def forget_removed(store: MemoryStore, table: str, keys: np.ndarray) -> None:
    """Entries back in the table (an undo) are no longer removed ones."""
    import numpy as np

    name = ledger_name(table)
    if not len(keys) or name not in store.table_names():
        return
    ledger = store.table(name)
    ids, stored, _ = ledger.export_arrays()
    wanted = {key.tobytes() for key in np.asarray(keys, dtype=np.float32)}
    gone = [int(i) for i, key in zip(ids, stored, strict=True) if key.tobytes() in wanted]
    if gone:
        ledger.delete(np.asarray(gone, dtype=np.int64))


def drop_ledger(store: MemoryStore, table: str) -> None:
    if ledger_name(table) in store.table_names():
        store.drop_table(ledger_name(table))
