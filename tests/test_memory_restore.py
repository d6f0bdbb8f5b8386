"""MemoryTable.restore: the undo of a delete puts rows back under their old ids (real SQLite)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.errors import InputError
from engine.memory import MemoryStore


def test_restore_keeps_ids_options_and_statistics(tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((6, 4)).astype(np.float32)
    values = rng.standard_normal((6, 3)).astype(np.float32)
    with MemoryStore.open(database) as store, MemoryStore.open(database) as other:
        table = store.create_table("facts", 4, 3)
        ids = table.insert(keys, values, labels=[f"f{i}" for i in range(6)],
                           meta=[{"slot": i} for i in range(6)], provenance="here")
        table.query(keys[:2], 1)
        table.flush()
        seen = other.table("facts")  # another process's view, kept in step by versions
        gone = table.get(ids[1:3])
        table.delete(ids[1:3])
        assert len(seen.export_arrays()[0]) == 4

        table.restore([r.id for r in gone], np.stack([r.key for r in gone]),
                      np.stack([r.value for r in gone]), labels=[r.label for r in gone],
                      tags=[["t"], []], meta=[r.meta for r in gone], provenance="here",
                      stats=[(r.created, r.last_access, r.access_count) for r in gone])
        back = table.get(ids[1:3])
        assert [r.id for r in back] == ids[1:3].tolist()
        assert [(r.label, r.meta["slot"], r.tags) for r in back] == \
            [("f1", 1, ["t"]), ("f2", 2, [])]
        assert [r.access_count for r in back] == [r.access_count for r in gone]
        assert back[0].access_count == 1
        np.testing.assert_array_equal(table.query(keys[2:3], 1).ids, [[ids[2]]])
        np.testing.assert_array_equal(seen.export_arrays()[0], ids)
        assert seen.query(keys[1:2], 1, record_access=False).ids[0, 0] == ids[1]

        table.delete(ids[1:2])  # a restored row can be deleted (and restored) again
        assert ids[1] not in seen.export_arrays()[0].tolist()
        with pytest.raises(InputError, match="in use"):
            table.restore(ids[2:3], keys[2:3], values[2:3])
        with pytest.raises(InputError, match="never handed out"):
            table.restore([ids.max() + 100], keys[:1], values[:1])
        assert len(table) == 5
