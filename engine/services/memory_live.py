"""The live student's memory layers kept in step with edits to their mirror tables.

:class:`LiveMirrors` holds the mirrors of the loaded student (see
:mod:`engine.services.memory_mirror`), the messages their reconciliation left, and the
bookkeeping that lets a later session tell the user's unsaved work from the student's own
state: rows whose change has not reached the student directory yet carry a pending flag
(cleared when the student is saved) and entries removed from an associative mirror are kept
in a ledger table until then. Every method that touches the store runs on its thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from engine.services.memory_mirror import (
    AssociativeTable,
    FeaturalTable,
    Messages,
    mirror_associative,
    mirror_featural,
    reload_associative,
)
from engine.services.memory_reconcile import (
    PENDING,
    drop_ledger,
    forget_removed,
    mark_pending,
    record_removed,
    unrecord,
    with_pending,
)

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from engine.memory import MemoryRow, MemoryStore, MemoryTable

T = TypeVar("T")


class LiveMirrors:
    """The mirror tables of the live student and what keeps them and it in step."""

    def __init__(self) -> None:
        self.featural: dict[str, FeaturalTable] = {}
        self.associative: dict[str, AssociativeTable] = {}
        self.reports: Messages = {}
        self._shown: set[str] = set()

    def load(self, store: MemoryStore, modules: dict[int, nn.Module],
             student_spec: str | None) -> None:
        """Mirror (or reconcile) each memory layer of a student that just loaded."""
        self.featural.clear()
        self.associative.clear()
        self.reports = {}
        self._shown.clear()
        self.featural.update(mirror_featural(store, modules, student_spec, self.reports))
        self.associative.update(mirror_associative(store, modules, student_spec, self.reports))

    def get(self, table: str) -> FeaturalTable | AssociativeTable | None:
        return self.featural.get(table) or self.associative.get(table)

    def messages(self, table: str | None = None) -> list[str]:
        """What reconciling the mirrors with the student found (one table, or all)."""
        reports = [self.reports[table]] if table in self.reports else \
            [] if table is not None else list(self.reports.values())
        return [message for report in reports for message in report.messages]

    def take_messages(self) -> list[str]:
        """The messages not handed out yet (a front end shows each once)."""
        fresh = [m for m in self.messages() if m not in self._shown]
        self._shown.update(fresh)
        return fresh

    def _pending(self, table: str) -> set[int]:
        from engine.services.memory_reconcile import Reconciled

        return self.reports.setdefault(table, Reconciled()).pending

    # ------------------------------------------------------------------ edits of a mirror

    def edited_meta(self, table: str, row: MemoryRow) -> dict[str, object] | None:
        """The meta a row gets when its value changes: pending, for a mirror table."""
        if self.get(table) is None:
            return None
        self._pending(table).add(row.id)
        return with_pending(row.meta, True)

    def new_meta(self, table: str) -> dict[str, object] | None:
        """The meta of an entry inserted into a mirror (pending until saved)."""
        return {PENDING: True} if self.get(table) is not None else None

    def values_changed(self, table: str, handle: MemoryTable, rows: list[MemoryRow],
                       values: np.ndarray) -> None:
        """Copy changed values into the live layer (a featural slot from ``meta["slot"]``;
        an associative layer reads its table again)."""
        import torch

        featural = self.featural.get(table)
        if featural is not None:
            with torch.no_grad():
                for row, value in zip(rows, values, strict=True):
                    slot = row.meta.get("slot")
                    if isinstance(slot, int) and 0 <= slot < len(featural.ids):
                        featural.module.values[slot] = torch.as_tensor(
                            value, dtype=torch.float32)
                        featural.ids[slot] = row.id
        self.reload(table, handle)

    def reload(self, table: str, handle: MemoryTable) -> None:
        associative = self.associative.get(table)
        if associative is not None:
            reload_associative(handle, associative)

    def deleted(self, table: str, handle: MemoryTable, rows: list[MemoryRow]) -> None:
        """After rows left the table (run through :meth:`removing`): zero their slots, or
        drop the entries from the live cache."""
        import torch

        gone = {row.id for row in rows}
        self._pending(table).difference_update(gone)
        featural = self.featural.get(table)
        if featural is not None:
            with torch.no_grad():
                for row in rows:
                    slot = row.meta.get("slot")
                    if isinstance(slot, int) and 0 <= slot < len(featural.ids) \
                            and featural.ids[slot] == row.id:
                        featural.module.values[slot] = 0.0
                        featural.ids[slot] = -1
        associative = self.associative.get(table)
        if associative is not None and rows:
            associative.orphans -= gone
            self.reload(table, handle)

    def removing(self, store: MemoryStore, table: str, handle: MemoryTable,
                 before: tuple[np.ndarray, np.ndarray, np.ndarray], run: Callable[[], T],
                 changed: Callable[[T], list[int]] = lambda _: []) -> T:
        """Run ``run``, a delete, eviction or recombination that may remove or change (the
        ``changed`` ids of its result) any of the rows ``before`` (ids, keys, values) of an
        associative mirror, with those rows written to the removed-entries ledger first: a
        crash between the two writes can then never bring a removed entry back (a ledger
        entry whose row is still there is dropped on reconcile). Rows that stayed as they
        were leave the ledger again afterwards. Not a mirror: ``run`` alone."""
        import numpy as np

        associative = self.associative.get(table)
        if associative is None:
            return run()
        ids, keys, values = before
        keep = ~np.isin(ids, np.fromiter(associative.orphans, dtype=np.int64))
        ids = ids[keep]
        ledgered = record_removed(store, handle, keys[keep], values[keep])
        try:
            result = run()
        except Exception:
            unrecord(store, table, ledgered)
            raise
        stayed = np.isin(ids, handle.ids()) & ~np.isin(ids, np.asarray(changed(result),
                                                                         dtype=np.int64))
        unrecord(store, table, ledgered[stayed])
        return result

    def removed(self, table: str, handle: MemoryTable, changed: list[int]) -> None:
        """After eviction or recombination of an associative mirror (run through
        :meth:`removing`): merged entries (``changed``) become pending, and the live cache
        reloads."""
        if table not in self.associative:
            return
        now = handle.ids()
        self.associative[table].orphans &= set(now.tolist())
        if changed:
            mark_pending(handle, changed)
            self._pending(table).update(changed)
        self.reload(table, handle)

    def restored(self, store: MemoryStore, table: str, handle: MemoryTable,
                 rows: list[MemoryRow]) -> None:
        """After an undo put rows back: they reach the live layer again."""
        import numpy as np

        if self.get(table) is None:
            return
        self._pending(table).update(row.id for row in rows)
        if table in self.associative and rows:
            forget_removed(store, table,
                           np.stack([np.asarray(r.key, dtype=np.float32) for r in rows]))
        values = np.stack([np.asarray(r.value, dtype=np.float32) for r in rows]) \
            if rows else np.zeros((0, handle.value_dim), dtype=np.float32)
        self.values_changed(table, handle, rows, values)

    def slots_changed(self, store: MemoryStore, table: str, slots: list[int],
                      label: str | None = None) -> None:
        """After a knowledge edit of a featural layer (it changed the values of ``slots``,
        or added or removed a group of slots): its mirror rows hold the live state again.
        Rows of slots that are gone are deleted; new slots get rows (``label`` on the first
        of ``slots``)."""
        import numpy as np

        mirror = self.featural.get(table)
        if mirror is None:
            return
        handle = store.table(table)
        module = mirror.module
        count = module.num_slots
        ids = mirror.ids
        if len(ids) > count:  # an insert was undone: its slots are gone
            gone = ids[count:][ids[count:] >= 0]
            if len(gone):
                handle.delete(gone)
            self._pending(table).difference_update(gone.tolist())
            ids = ids[:count]
        values = module.values.detach().float().cpu().numpy()
        new = np.arange(len(ids), count)
        if len(new):  # an insert: its group's slots get rows
            keys = module.slot_keys.detach().float().cpu().numpy()[new]
            labels = [label if label and int(s) == slots[0] else None for s in new]
            added = handle.insert(keys, values[new], labels=labels,
                                  meta=[{"slot": int(s), "slots": count} for s in new],
                                  provenance=mirror.source)
            ids = np.concatenate([ids, np.asarray(added, dtype=np.int64)])
        touched = np.asarray([s for s in slots if s < len(ids) - len(new) and ids[s] >= 0],
                             dtype=np.int64)
        if len(touched):
            handle.update(ids[touched], values=values[touched])
        mirror.ids = ids

    def saved(self, store: MemoryStore) -> None:
        """The student directory now holds every mirror's state: nothing is pending, no
        removal needs remembering."""
        for table in [*self.featural, *self.associative]:
            pending = self._pending(table)
            if pending and table in store.table_names():
                mark_pending(store.table(table), sorted(pending), pending=False)
            pending.clear()
            drop_ledger(store, table)
