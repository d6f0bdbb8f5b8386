"""Keep a memory-store table holding exactly an associative layer's entries, batch by batch.

Reading writes entries into the layer's in-process cache and evicts others there (LRFU).
:class:`TableSync` follows the cache by each entry's stable id: one delete for the entries
the cache dropped and one insert for the new ones (labels and meta included), so every
batch is committed whole and a crash loses at most the batch being written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.errors import MindsetError
from engine.memory import MemoryStore, MemoryTable
from engine.model.memory_layers.associative import STORE_FILE, AssociativeMemory, note_label

CHUNK = 8192


class TableSync:
    """``table`` row ``ids[i]`` is the entry at cache position ``i`` of ``module`` (a mirror
    may hold more rows, such as orphans the cache left out: they are kept)."""

    def __init__(self, table: MemoryTable, module: AssociativeMemory, ids: np.ndarray,
                 provenance: str) -> None:
        self.table, self.module, self.provenance = table, module, provenance
        if len(ids) != len(module.cache):
            raise MindsetError(f"table {table.name!r} lists {len(ids)} entries for the "
                               f"{len(module.cache)} the layer holds: another process changed "
                               "it; load the student again and retry")
        self.rows: dict[int, int] = dict(zip(module.cache.uids.tolist(),
                                             np.asarray(ids).tolist(), strict=True))

    def sync(self) -> tuple[int, int]:
        """Write what changed in the cache since the last sync: (inserted, deleted)."""
        cache = self.module.cache
        live = cache.uids
        gone_uids = set(self.rows) - set(live.tolist())
        if gone_uids:
            self.table.delete(np.asarray([self.rows.pop(uid) for uid in gone_uids]))
        new = np.flatnonzero(~np.isin(live, np.fromiter(self.rows, dtype=np.int64)))
        if len(new):
            keys = cache.keys.detach().float().cpu().numpy()
            values = cache.values.detach().float().cpu().numpy()
            for start in range(0, len(new), CHUNK):
                part = new[start:start + CHUNK]
                notes = [cache.notes[i] for i in part]
                ids = self.table.insert(keys[part], values[part],
                                        labels=[note_label(note) for note in notes],
                                        meta=[note or {} for note in notes],
                                        provenance=self.provenance)
                self.rows.update(zip(live[part].tolist(), ids.tolist(), strict=True))
        return len(new), len(gone_uids)


def open_student_tables(directory: Path, layers: dict[int, AssociativeMemory]
                        ) -> tuple[MemoryStore, dict[int, TableSync]]:
    """The student's own store (``memory/memory.db``) and one sync per reading layer; a layer
    with no table yet gets an empty one (its cache is then empty too, as loading left it)."""
    from engine.model.student import MEMORY_DIR

    folder = directory / MEMORY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    store = MemoryStore.open(folder / STORE_FILE)
    syncs: dict[int, TableSync] = {}
    try:
        for layer, module in layers.items():
            name = f"layer{layer}"
            c = module.config
            if name not in store.table_names():
                store.create_table(name, c.key_dim, c.value_dim, index="flat-l2")
            table = store.table(name)  # as loading left it: row i is cache entry i
            syncs[layer] = TableSync(table, module, table.ids(), f"associative memory {name}")
    except BaseException:
        store.close()
        raise
    return store, syncs
