"""The async API the workbench uses, on SQLite (aiosqlite) and PostgreSQL (psycopg async)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engine.errors import InputError
from engine.memory import AsyncMemoryStore, MemoryStore
from tests import memory_fixtures
from tests.memory_fixtures import random_rows

# Shared fixtures: the same test on SQLite and PostgreSQL.
store_url = memory_fixtures.store_url
postgres_url = memory_fixtures.postgres_url


async def test_browse_edit_and_query_without_blocking(store_url: str) -> None:
    keys, values = random_rows(40, 8, 4, seed=1)
    with MemoryStore.open(store_url) as store:  # a training job's store, elsewhere
        job_table = store.create_table("layer", 8, 4)
        ids = job_table.insert(keys, values, labels=[f"fact {i}" for i in range(40)])
        async with await AsyncMemoryStore.open(store_url) as ui:
            assert await ui.table_names() == ["layer"]
            assert await ui.count("layer") == 40
            first, ticks = await asyncio.gather(ui.page("layer", 0, 10), _ticker())
            assert [r.id for r in first] == ids[:10].tolist() and ticks > 0
            assert [r.label for r in await ui.page("layer", 0, 5, label_contains="fact 3")] == [
                "fact 3",
                *[f"fact {i}" for i in range(30, 34)],
            ]
            await ui.update("layer", ids[:2], label="edited", tags=["checked"], meta={"by": "ui"})
            await ui.delete("layer", ids[2:4])
            rows = await ui.get("layer", ids[:2])
            assert [r.label for r in rows] == ["edited", "edited"] and rows[0].meta == {"by": "ui"}
            assert await ui.count("layer", tag="checked") == 2
            hits = await ui.query("layer", keys[:5], 1)
            assert hits.ids[[0, 1, 4], 0].tolist() == [ids[0], ids[1], ids[4]]
            assert not np.isin(hits.ids, ids[2:4]).any()
            stats = await ui.stats("layer")
            assert stats["rows"] == 38 and stats["total_accesses"] >= 3
            with pytest.raises(InputError, match="unknown ids"):
                await ui.delete("layer", [10**9])
            with pytest.raises(InputError, match="no memory table"):
                await ui.page("nope")
        # The job's table sees the UI's edits: deleted rows leave its index too.
        result = job_table.query(keys[2:4], 3)
        assert not np.isin(result.ids, ids[2:4]).any()
        assert len(job_table) == 38


async def _ticker() -> int:
    ticks = 0
    for _ in range(3):
        await asyncio.sleep(0)
        ticks += 1
    return ticks
