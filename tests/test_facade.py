"""The engine facade over a real SQLite store and a tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.errors import MindsetError
from engine.facade import Engine
from engine.memory import MemoryStore
from engine.services.chat import ChatMessage


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """A database with one 64-dimensional table of 100 entries (tiny-llama's width)."""
    path = tmp_path / "memory.db"
    rng = np.random.default_rng(0)
    with MemoryStore.open(path) as store:
        table = store.create_table("layer2_associative", 64, 64)
        table.insert(rng.normal(size=(100, 64)).astype(np.float32),
                     rng.normal(size=(100, 64)).astype(np.float32),
                     labels=[f"entry {i}" for i in range(100)])
    return path


async def test_pages_edits_and_undo(store_path: Path, tmp_path: Path) -> None:
    engine = Engine("tiny-llama", database=store_path, runs_root=tmp_path / "runs")
    try:
        assert await engine.memory.table_names() == ["layer2_associative"]
        page = await engine.memory.table_page("layer2_associative", 10, 20, with_tokens=False)
        assert [row.label for row in page] == [f"entry {i}" for i in range(10, 30)]
        target = page[0].id
        await engine.memory.update_entry("layer2_associative", target, label="renamed",
                                  tags=["a", "b"], scale=0.5)
        deleted = await engine.memory.delete_entries("layer2_associative", [target])
        assert (await engine.memory.table_stats("layer2_associative"))["rows"] == 99
        restored = await engine.memory.restore_entries(deleted)
        assert (await engine.memory.table_stats("layer2_associative"))["rows"] == 100
        with MemoryStore.open(store_path) as store:
            row = store.table("layer2_associative").get(restored)[0]
            assert row.label == "renamed" and sorted(row.tags) == ["a", "b"]
            np.testing.assert_allclose(np.linalg.norm(row.value), page[0].norm * 0.5,
                                       rtol=1e-5)
    finally:
        await engine.close()


async def test_model_side_features(store_path: Path, tmp_path: Path) -> None:
    engine = Engine("tiny-llama", database=store_path, runs_root=tmp_path / "runs")
    try:
        await engine.load_model()
        page = await engine.memory.table_page("layer2_associative", 0, 3)
        assert all(len(row.top_tokens) == 5 for row in page)
        found = await engine.memory.search_text("layer2_associative", "hello", k=7)
        assert len(found) == 7
        new_id = await engine.memory.insert_entry("layer2_associative", text="the sky is blue")
        rows = await engine.memory.find_entry("layer2_associative", new_id)
        assert rows[0].label == "the sky is blue"
        assert "evicted 10" in await engine.memory.evict("layer2_associative")
        assert (await engine.memory.table_stats("layer2_associative"))["rows"] == 91
        pieces = [piece async for piece in engine.chat.stream_chat(
            "teacher", [ChatMessage("user", "hi")], max_tokens=6)]
        assert pieces and "".join(pieces)
        tree = engine.describe_model()
        assert tree is not None and len(tree.children) == 5
    finally:
        await engine.close()


async def test_errors_are_one_line_mindset_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.db"
    broken.write_bytes(b"garbage" * 200)
    engine = Engine(str(tmp_path / "missing-model"), database=broken,
                    runs_root=tmp_path / "runs")
    try:
        with pytest.raises(MindsetError, match="missing-model"):
            await engine.load_model()
        with pytest.raises(MindsetError):
            await engine.memory.table_names()
        assert not engine.availability()["memory"].ok
        with pytest.raises(MindsetError, match="student"):
            await engine.load_model("student")
    finally:
        await engine.close()
