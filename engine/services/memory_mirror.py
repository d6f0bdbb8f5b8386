"""A loaded student's memory layers mirrored into tables of the engine's memory store.

The workbench pages, searches and edits memory through the store. A student's memory lives
in its modules, so each memory layer gets a mirror table:

* featural layers (``layer{N}_featural``): one row per slot, the slot index in its meta
  (``meta["slot"]``, the only link between a row and its slot); an edited value is copied
  into the live slot, a deleted row's slot is zeroed.
* associative layers (``layer{N}_associative``): one row per cache entry. After any change to
  the table the layer's cache is reloaded from it, in id order, so cache position ``i`` is
  always the entry with id ``ids[i]``.

A mirror kept from an earlier session is reconciled with the student row by row
(:mod:`engine.services.memory_reconcile`): nothing the user did is dropped, and every
disagreement leaves a message. :class:`MemoryTracker` sums, over one reply, the weight each
mirrored entry got, for the chat's memory-use panel.

Importing this module is cheap: numpy, torch and the memory layers load on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from engine.services.memory_reconcile import (
    MIRROR_MARK,
    Reconciled,
    Stored,
    all_rows,
    drop_ledger,
    reconcile_associative,
    reconcile_featural,
    same_student,
    user_work,
)
from engine.views import MemoryUse


def note_label(note: dict[str, Any] | None) -> str | None:
    """A read entry's row label (the context that wrote it and what came next)."""
    from engine.model.memory_layers.associative import note_label as label

    return label(note)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle

    from engine.memory import MemoryStore, MemoryTable
    from engine.model.memory_layers.associative import AssociativeMemory
    from engine.model.memory_layers.featural import FeaturalMemory

FEATURAL_SUFFIX = "_featural"
ASSOCIATIVE_SUFFIX = "_associative"
CHUNK = 8192

def featural_table_name(layer: int) -> str:
    return f"layer{layer}{FEATURAL_SUFFIX}"


def associative_table_name(layer: int) -> str:
    return f"layer{layer}{ASSOCIATIVE_SUFFIX}"


@dataclass
class FeaturalTable:
    """A featural layer mirrored into a table: ``ids[slot]`` is the id of the row of that
    slot (-1: deleted), taken from each row's ``meta["slot"]``."""

    layer: int
    module: FeaturalMemory
    ids: np.ndarray
    source: str = ""


@dataclass
class AssociativeTable:
    """An associative layer mirrored into a table: ``ids[i]`` is the entry at cache
    position ``i`` of ``module.cache``; ``orphans`` are rows left out of the cache."""

    layer: int
    module: AssociativeMemory
    ids: np.ndarray
    source: str = ""
    orphans: set[int] = field(default_factory=set)


Messages = dict[str, Reconciled]


def _provenance(student_spec: str | None, layer: int) -> str:
    return f"{student_spec}{MIRROR_MARK}{layer}"


def _first_provenance(table: MemoryTable) -> str:
    first = table.page(0, 1)
    return (first[0].provenance or "") if first else ""


def _stale(table: MemoryTable, provenance: str, source: str, keys: np.ndarray,
           values: np.ndarray) -> str | None:
    """Why an existing mirror table cannot be reconciled with the layer (None: it can): it
    mirrors another student, or its key/value sizes are not the layer's."""
    if provenance and not same_student(provenance, source):
        return f"mirrored {provenance.rpartition(MIRROR_MARK)[0] or provenance}, not this student"
    shape = (keys.shape[1], values.shape[1])
    if (table.key_dim, table.value_dim) != shape:
        return (f"held keys/values of size {table.key_dim}/{table.value_dim}, not the layer's "
                f"{shape[0]}/{shape[1]}")
    return None


def _replace(store: MemoryStore, table: MemoryTable, report: Reconciled, why: str) -> None:
    """Drop a table that cannot mirror this student (``why``), saying so when it held the
    user's work."""
    name = table.name
    held = user_work(all_rows(table))
    if held:
        report.messages.append(
            f"{name}: the table {why}; rebuilt for this one ({held} labelled or edited rows "
            "of the old table were dropped)")
    store.drop_table(name)
    drop_ledger(store, name)


def mirror_featural(store: MemoryStore, modules: dict[int, nn.Module], student_spec: str | None,
                    messages: Messages) -> dict[str, FeaturalTable]:
    """Mirror each featural layer's slots into a table; an existing mirror of this student
    is reconciled with it (see :func:`reconcile_featural`)."""
    import numpy as np
    import torch

    from engine.model.memory_layers.featural import FeaturalMemory

    mirrors: dict[str, FeaturalTable] = {}
    for layer, module in modules.items():
        if not isinstance(module, FeaturalMemory):
            continue
        name = featural_table_name(layer)
        values = module.values.detach().float().cpu().numpy().copy()
        if module.product is not None:
            keys = module.product.slot_keys(0).detach().float().cpu().numpy()
        else:
            # flat or routed keys: one key per slot in the hidden space
            keys = module.slot_keys.detach().float().cpu().numpy()
        source = _provenance(student_spec, layer)
        report = messages.setdefault(name, Reconciled())
        table = store.table(name) if name in store.table_names() else None
        provenance = _first_provenance(table) if table is not None else ""
        why = _stale(table, provenance, source, keys, values) if table is not None else None
        if table is not None and why is not None:
            _replace(store, table, report, why)
            table = None
        if table is None:
            table = store.create_table(name, keys.shape[1], values.shape[1])
            slots = len(values)
            ids = np.asarray(table.insert(
                keys, values, meta=[{"slot": i, "slots": slots} for i in range(slots)],
                provenance=source), dtype=np.int64)
        else:
            live = values.copy()
            ids, found = reconcile_featural(table, Stored.of(table), keys, live, source)
            report.messages.extend(found.messages)
            report.pending |= found.pending
            if not np.array_equal(live, values):
                with torch.no_grad():
                    module.values.copy_(torch.from_numpy(live).to(module.values.device))
        mirrors[name] = FeaturalTable(layer, module, ids, source)
    return mirrors


def mirror_associative(store: MemoryStore, modules: dict[int, nn.Module],
                       student_spec: str | None, messages: Messages
                       ) -> dict[str, AssociativeTable]:
    """Mirror each associative layer's cache into a table, entry i as the i-th row.

    A mirror of this student that holds exactly the live entries is kept as it is; one that
    differs is reconciled with them and the live cache reloaded from it. A table of that
    name that is no mirror (a user's own) is left alone and the layer is not mirrored."""
    import numpy as np

    from engine.model.memory_layers.associative import AssociativeMemory

    mirrors: dict[str, AssociativeTable] = {}
    for layer, module in modules.items():
        if not isinstance(module, AssociativeMemory):
            continue
        name = associative_table_name(layer)
        keys = module.cache.keys.detach().float().cpu().numpy()
        values = module.cache.values.detach().float().cpu().numpy()
        source = _provenance(student_spec, layer)
        report = messages.setdefault(name, Reconciled())
        table = store.table(name) if name in store.table_names() else None
        mirror = AssociativeTable(layer, module, np.zeros(0, dtype=np.int64), source)
        provenance = _first_provenance(table) if table is not None else ""
        if provenance and MIRROR_MARK not in provenance:
            continue  # a user's own table of that name
        why = _stale(table, provenance, source, keys, values) if table is not None else None
        if table is not None and why is not None:
            _replace(store, table, report, why)
            table = None
        if table is not None and _holds(table, keys, values):
            # Nothing was removed since the student was saved: a ledger left is stale (a
            # crash between its write and the delete it was written for).
            drop_ledger(store, name)
            mirror.ids = table.export_arrays()[0]
            mirrors[name] = mirror
            continue
        if table is None:
            table = store.create_table(name, keys.shape[1], values.shape[1])
            notes = module.cache.notes
            for start in range(0, len(keys), CHUNK):
                stop = min(start + CHUNK, len(keys))
                table.insert(keys[start:stop], values[start:stop],
                             labels=[note_label(notes[i]) for i in range(start, stop)],
                             meta=[notes[i] or {"position": i} for i in range(start, stop)],
                             provenance=source)
            mirror.ids = table.export_arrays()[0]
        else:
            found = reconcile_associative(store, table, Stored.of(table), keys, values, source)
            report.messages.extend(found.messages)
            report.pending |= found.pending
            mirror.orphans = found.orphans
            reload_associative(table, mirror)
        mirrors[name] = mirror
    return mirrors


def _holds(table: MemoryTable, keys: np.ndarray, values: np.ndarray) -> bool:
    """Whether ``table`` holds exactly ``keys``/``values``, in order."""
    import numpy as np

    if len(table) != len(keys):
        return False
    if len(keys) == 0:
        return True
    _, stored_keys, stored_values = table.export_arrays()
    return bool(np.array_equal(stored_keys, keys) and np.array_equal(stored_values, values))


def reload_associative(table: MemoryTable, mirror: AssociativeTable) -> None:
    """Make the live cache hold the table's entries (orphans left out), in id order (cache
    position i <-> ``mirror.ids[i]``). Access statistics of the cache start afresh."""
    import numpy as np
    import torch

    ids, keys, values = table.export_arrays()
    _, metas = table.metas()
    keep = np.ones(len(ids), dtype=bool)
    if mirror.orphans:
        keep = ~np.isin(ids, np.fromiter(mirror.orphans, dtype=np.int64))
        ids, keys, values = ids[keep], keys[keep], values[keep]
    # What wrote a read entry (its meta says "source": "read") stays with it.
    notes = [meta if meta.get("source") == "read" else None
             for meta, kept in zip(metas, keep, strict=True) if kept]
    cache = mirror.module.cache
    device = cache.keys.device
    with torch.no_grad():
        mirror.module.fill(torch.from_numpy(keys.copy()).to(device),
                           torch.from_numpy(values.copy()).to(device), notes)
    mirror.ids = ids


def associative_projection(module: AssociativeMemory) -> SimpleNamespace:
    """What one entry's value adds to the residual stream, as an object with ``weight``
    [hidden, value_dim]: the output projection averaged over heads (any head may read any
    entry)."""
    config = module.config
    weight = module.out_proj.weight.detach().float()
    blocks = weight.view(weight.shape[0], config.heads, config.value_dim)
    return SimpleNamespace(weight=blocks.mean(dim=1))


class MemoryTracker:
    """Sums, over one reply, the weight each mirrored memory entry got: each featural slot
    in its layer's top-k, each associative entry in its layer's attention (the softmax
    weight of the retrieved entries, recorded by the layer itself)."""

    def __init__(self, tables: dict[str, FeaturalTable],
                 associative: dict[str, AssociativeTable] | None = None) -> None:
        self.tables = tables
        self.associative = associative or {}
        self.totals: dict[str, torch.Tensor] = {}
        self.handles: list[RemovableHandle] = []

    def attach(self) -> None:
        import torch

        for name, mirror in self.tables.items():
            self.totals[name] = torch.zeros(mirror.module.num_slots)

            def hook(module: Any, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor,
                     name: str = name) -> None:
                with torch.no_grad():
                    x = inputs[0].reshape(-1, inputs[0].shape[-1])
                    slots, weights = module.lookup(x)
                    self.totals[name].index_add_(
                        0, slots.reshape(-1), weights.abs().reshape(-1).float()
                    )

            self.handles.append(mirror.module.register_forward_hook(hook))
        for associative in self.associative.values():
            associative.module.start_recording()

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for name, associative in self.associative.items():
            self.totals[name] = associative.module.stop_recording()

    def _ids(self, name: str) -> np.ndarray | list[int]:
        mirror = self.tables.get(name) or self.associative.get(name)
        return mirror.ids if mirror is not None else []

    def top(self, count: int = 10) -> list[MemoryUse]:
        """The most used entries across layers, each weight as a share of its layer's total."""
        uses: list[MemoryUse] = []
        for name, totals in self.totals.items():
            total = float(totals.sum())
            if total <= 0:
                continue
            ids = self._ids(name)
            associative = name in self.associative
            what = "entry" if associative else "slot"
            values, positions = totals.topk(min(count, len(totals)))
            for value, position in zip(values.tolist(), positions.tolist(), strict=True):
                if associative and (value <= 0 or position >= len(ids)):
                    continue  # unread, or inserted during the reply: not in the mirror
                entry = int(ids[position]) if position < len(ids) else position
                if entry < 0:
                    continue  # a deleted slot (zeroed): no entry to name
                uses.append(MemoryUse(name, entry, value / total, f"{what} {position}"))
        uses.sort(key=lambda use: use.weight, reverse=True)
        return uses[:count]
