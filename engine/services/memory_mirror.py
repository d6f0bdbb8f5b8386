"""A loaded student's memory layers mirrored into tables of the engine's memory store.

The workbench pages, searches and edits memory through the store. A student's memory lives
in its modules, so each memory layer gets a mirror table:

* featural layers (``layer{N}_featural``): one row per slot, the slot index in its meta; an
  edited value is copied into the live slot.
* associative layers (``layer{N}_associative``): one row per cache entry, in cache order.
  After any change to the table the layer's cache is reloaded from it, in id order, so cache
  position ``i`` is always the entry with id ``ids[i]``.

:class:`MemoryTracker` sums, over one reply, the weight each mirrored entry got, for the
chat's memory-use panel.

Importing this module is cheap: numpy, torch and the memory layers load on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from engine.views import MemoryUse

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
# Mirror rows carry "<student spec>#layer<N>" as provenance, which tells a mirror of this
# student (kept) from one of another student (rebuilt) and from a user's own table (left).
MIRROR_MARK = "#layer"


def featural_table_name(layer: int) -> str:
    return f"layer{layer}{FEATURAL_SUFFIX}"


def associative_table_name(layer: int) -> str:
    return f"layer{layer}{ASSOCIATIVE_SUFFIX}"


@dataclass
class FeaturalTable:
    """A featural layer mirrored into a table: which layer, its module, ids in slot order."""

    layer: int
    module: FeaturalMemory
    ids: np.ndarray


@dataclass
class AssociativeTable:
    """An associative layer mirrored into a table: ``ids[i]`` is the entry at cache
    position ``i`` of ``module.cache``."""

    layer: int
    module: AssociativeMemory
    ids: np.ndarray


def _provenance(student_spec: str | None, layer: int) -> str:
    return f"{student_spec}{MIRROR_MARK}{layer}"


def _existing_mirror(store: MemoryStore, name: str) -> tuple[MemoryTable | None, str | None]:
    """The table called ``name`` and its first row's provenance (None: no table)."""
    if name not in store.table_names():
        return None, None
    table = store.table(name)
    first = table.page(0, 1)
    return table, (first[0].provenance or "") if first else ""


def mirror_featural(store: MemoryStore, modules: dict[int, nn.Module],
                    student_spec: str | None) -> dict[str, FeaturalTable]:
    """Mirror each featural layer's slots into a table (re-used while it still has the
    slot count and provenance of this student)."""
    import numpy as np

    from engine.model.memory_layers.featural import FeaturalMemory

    mirrors: dict[str, FeaturalTable] = {}
    for layer, module in modules.items():
        if not isinstance(module, FeaturalMemory):
            continue
        name = featural_table_name(layer)
        values = module.values.detach().float().numpy()
        if module.product is not None:
            keys = module.product.slot_keys(0).detach().float().numpy()
        else:
            assert module.flat is not None  # a featural layer has product or flat keys
            keys = module.flat.keys.detach().float().numpy()
        source = _provenance(student_spec, layer)
        table, provenance = _existing_mirror(store, name)
        if table is not None and (len(table) != len(values) or provenance != source):
            store.drop_table(name)
            table = None
        if table is None:
            table = store.create_table(name, keys.shape[1], values.shape[1])
            slots = np.arange(len(values))
            table.insert(keys, values, meta=[{"slot": int(i)} for i in slots],
                         provenance=source)
        ids, _, _ = table.export_arrays()
        mirrors[name] = FeaturalTable(layer, module, ids)
    return mirrors


def mirror_associative(store: MemoryStore, modules: dict[int, nn.Module],
                       student_spec: str | None) -> dict[str, AssociativeTable]:
    """Mirror each associative layer's cache into a table, entry i as the i-th row.

    A mirror is re-used (keeping its labels and tags) while it holds exactly the live
    entries, in cache order; otherwise it is rebuilt. A table of that name that is no mirror
    (a user's own) is left alone and the layer is not mirrored."""
    from engine.model.memory_layers.associative import AssociativeMemory

    mirrors: dict[str, AssociativeTable] = {}
    for layer, module in modules.items():
        if not isinstance(module, AssociativeMemory):
            continue
        name = associative_table_name(layer)
        keys = module.cache.keys.detach().float().cpu().numpy()
        values = module.cache.values.detach().float().cpu().numpy()
        source = _provenance(student_spec, layer)
        table, provenance = _existing_mirror(store, name)
        if table is not None and provenance and MIRROR_MARK not in provenance:
            continue
        if table is not None and not _holds(table, provenance, source, keys, values):
            store.drop_table(name)
            table = None
        if table is None:
            table = store.create_table(name, keys.shape[1], values.shape[1])
            chunk = 8192
            for start in range(0, len(keys), chunk):
                table.insert(keys[start:start + chunk], values[start:start + chunk],
                             meta=[{"position": i}
                                   for i in range(start, min(start + chunk, len(keys)))],
                             provenance=source)
        ids, _, _ = table.export_arrays()
        mirrors[name] = AssociativeTable(layer, module, ids)
    return mirrors


def _holds(table: MemoryTable, provenance: str | None, source: str, keys: np.ndarray,
           values: np.ndarray) -> bool:
    """Whether ``table`` is this student's mirror and holds exactly ``keys``/``values``."""
    import numpy as np

    if len(keys) == 0:
        return len(table) == 0
    if provenance != source or len(table) != len(keys):
        return False
    _, stored_keys, stored_values = table.export_arrays()
    return bool(np.array_equal(stored_keys, keys) and np.array_equal(stored_values, values))


def reload_associative(table: MemoryTable, mirror: AssociativeTable) -> None:
    """Make the live cache hold the table's entries, in id order (cache position i <->
    ``mirror.ids[i]``). Access statistics of the cache start afresh."""
    import torch

    ids, keys, values = table.export_arrays()
    cache = mirror.module.cache
    device = cache.keys.device
    with torch.no_grad():
        mirror.module.fill(torch.from_numpy(keys.copy()).to(device),
                           torch.from_numpy(values.copy()).to(device))
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
                uses.append(MemoryUse(name, entry, value / total, f"{what} {position}"))
        uses.sort(key=lambda use: use.weight, reverse=True)
        return uses[:count]
