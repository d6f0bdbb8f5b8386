"""Memory edits survive a restart: two engines on the same database and student directory,
one after the other, are a quit and a relaunch of the workbench.

A real tiny-llama student with a featural layer 1 (32 slots), a real SQLite store, no mocks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.facade import STUDENT, Engine
from engine.memory import MemoryRow, MemoryStore
from engine.model.edit_journal import EditJournal
from engine.model.memory_layers.featural import FeaturalMemory
from engine.services.chat import ChatMessage
from engine.services.memory_mirror import FeaturalTable
from tests.test_tui_support import make_student, student_engine

TABLE = "layer1_featural"
SLOTS = 32


def rows_of(database: Path) -> dict[int, MemoryRow]:
    with MemoryStore.open(database) as store:
        table = store.table(TABLE)
        return {row.id: row for row in table.page(0, 1000)}


def by_slot(rows: dict[int, MemoryRow]) -> dict[int, MemoryRow]:
    return {row.meta["slot"]: row for row in rows.values()}


def mirror(engine: Engine) -> FeaturalTable:
    found = engine.memory.mirror(TABLE)
    assert isinstance(found, FeaturalTable)
    return found


def live_values(engine: Engine) -> np.ndarray:
    return mirror(engine).module.values.detach().numpy().copy()


async def launch(student_dir: Path, database: Path, tmp_path: Path) -> Engine:
    engine = student_engine(student_dir, database, tmp_path)
    await engine.load_model(STUDENT)
    return engine


def resave_student(student_dir: Path, slots: int, seed: int) -> None:
    """The student directory rewritten with another featural layer (a retrained student)."""
    from engine.model.loading import load_model
    from engine.model.student import save_student
    from engine.model.surgery import convert

    teacher = load_model("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = convert(teacher, [1], "featural", init="random", keys="flat", slots=slots,
                          topk=8)
    save_student(student, student_dir, teacher.tokenizer)


@pytest.fixture
def student_dir(tmp_path: Path) -> Path:
    return make_student(tmp_path / "student")


async def test_a_delete_survives_a_relaunch_with_every_other_edit(student_dir: Path,
                                                                  tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = await launch(student_dir, database, tmp_path)
    try:
        slots = by_slot(rows_of(database))
        labelled, edited, gone = slots[3].id, slots[4].id, slots[5].id
        await engine.memory.update_entry(TABLE, labelled, label="capitals", tags=["geo"])
        await engine.memory.update_entry(TABLE, edited, scale=2.0)
        found = await engine.memory.search_text(TABLE, "hello there", k=10)
        assert found and not any(row.access_count for row in found)  # looking is no read
        await engine.memory.delete_entries(TABLE, [gone])  # no undo, student not saved
        assert not live_values(engine)[5].any()
    finally:
        await engine.close()
    with MemoryStore.open(database) as store:  # reads that count: access statistics
        table = store.table(TABLE)
        table.query(np.stack([row.key for row in table.page(0, 4)]), 4)
    before = rows_of(database)
    assert gone not in before and len(before) == SLOTS - 1
    assert sum(row.access_count for row in before.values()) > 0

    engine = await launch(student_dir, database, tmp_path)
    try:
        after = rows_of(database)
        # The same rows, ids, labels, tags, access counts and values: nothing rebuilt.
        assert sorted(after) == sorted(before)
        for entry_id, row in before.items():
            again = after[entry_id]
            assert (again.label, again.tags, again.access_count, again.meta["slot"]) == \
                (row.label, row.tags, row.access_count, row.meta["slot"])
            np.testing.assert_array_equal(again.value, row.value)
        assert after[labelled].label == "capitals" and after[labelled].tags == ["geo"]
        live = live_values(engine)
        assert not live[5].any()  # the deleted slot stays deleted in the live student
        np.testing.assert_array_equal(live[4], after[edited].value)  # the edit re-applied
        assert mirror(engine).ids[5] == -1
        assert [int(i) for i in mirror(engine).ids[[3, 4]]] == [labelled, edited]
        warnings = engine.memory.reconcile_warnings(TABLE)
        # The value edit was journaled: loading replayed it, so nothing needed re-applying.
        assert [(e.op, e.slots) for e in EditJournal(student_dir).entries()] == [("value", [4])]
        assert not any("re-applied" in w for w in warnings)
        assert any("stay deleted" in w for w in warnings)
        assert not any("rebuilt" in w for w in warnings)
    finally:
        await engine.close()


async def test_saved_edits_relaunch_without_warnings(student_dir: Path, tmp_path: Path) -> None:
    from engine.model.loading import load_student
    from engine.model.surgery import memory_layers

    database = tmp_path / "memory.db"
    engine = await launch(student_dir, database, tmp_path)
    try:
        slots = by_slot(rows_of(database))
        edited = slots[6].id
        await engine.memory.update_entry(TABLE, edited, label="kept", scale=3.0)
        await engine.memory.delete_entries(TABLE, [slots[7].id])
        await engine.memory.save_student()
        assert not rows_of(database)[edited].meta.get("pending")
    finally:
        await engine.close()
    layer = memory_layers(load_student(student_dir))[1]
    assert isinstance(layer, FeaturalMemory)
    on_disk = layer.values.detach().numpy()
    np.testing.assert_allclose(on_disk[6], slots[6].value * 3, rtol=1e-6)
    assert not on_disk[7].any()

    engine = await launch(student_dir, database, tmp_path)
    try:
        assert engine.memory.reconcile_warnings() == []
        row = rows_of(database)[edited]
        assert row.label == "kept"
        np.testing.assert_array_equal(live_values(engine)[6], row.value)
        assert slots[7].id not in rows_of(database)
    finally:
        await engine.close()


async def test_undo_keeps_the_id_and_memory_use_names_the_slots_read(student_dir: Path,
                                                                     tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = await launch(student_dir, database, tmp_path)
    try:
        target = by_slot(rows_of(database))[2]
        deleted = await engine.memory.delete_entries(TABLE, [target.id])
        assert await engine.memory.restore_entries(deleted) == [target.id]
        back = rows_of(database)[target.id]
        assert back.meta["slot"] == 2 and back.access_count == target.access_count
        np.testing.assert_array_equal(live_values(engine)[2], target.value)
    finally:
        await engine.close()

    engine = await launch(student_dir, database, tmp_path)
    try:
        module = mirror(engine).module
        read = torch.zeros(SLOTS)

        def hook(layer: Any, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            with torch.no_grad():
                slots, weights = layer.lookup(inputs[0].reshape(-1, inputs[0].shape[-1]))
                read.index_add_(0, slots.reshape(-1), weights.abs().reshape(-1).float())

        handle = module.register_forward_hook(hook)
        try:
            pieces = [piece async for piece in engine.chat.stream_chat(
                STUDENT, [ChatMessage("user", "hi")], max_tokens=4)]
        finally:
            handle.remove()
        assert pieces
        usage = engine.chat.last_memory_usage(STUDENT)
        assert usage
        rows = rows_of(database)
        for use in usage:
            slot = rows[use.id].meta["slot"]  # the entry named is the slot's own row
            assert use.label == f"slot {slot}"
            assert use.weight == pytest.approx(float(read[slot] / read.sum()), rel=1e-5)
        top_slots = {int(s) for s in read.topk(3).indices}
        assert top_slots <= {rows[use.id].meta["slot"] for use in usage}
    finally:
        await engine.close()


async def test_a_changed_student_is_reconciled_row_by_row(student_dir: Path,
                                                          tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = await launch(student_dir, database, tmp_path)
    try:
        slots = by_slot(rows_of(database))
        await engine.memory.update_entry(TABLE, slots[1].id, label="a label")
        await engine.memory.update_entry(TABLE, slots[2].id, scale=5.0)  # not saved
        await engine.memory.delete_entries(TABLE, [slots[3].id])
    finally:
        await engine.close()
    edited_value = rows_of(database)[slots[2].id].value

    resave_student(student_dir, 40, seed=1)  # retrained in place, with 8 more slots
    engine = await launch(student_dir, database, tmp_path)
    try:
        rows = rows_of(database)
        live = live_values(engine)
        assert len(rows) == 40 - 1
        assert rows[slots[1].id].label == "a label"  # same id, label kept
        assert rows[slots[1].id].meta["slot"] == 1
        np.testing.assert_array_equal(rows[slots[1].id].value, live[1])  # the student's
        np.testing.assert_array_equal(live[2], edited_value)  # the unsaved edit wins
        assert not live[3].any() and slots[3].id not in rows  # still deleted
        new = [row for row in rows.values() if row.meta["slot"] >= SLOTS]
        assert sorted(row.meta["slot"] for row in new) == list(range(SLOTS, 40))
        assert min(row.id for row in new) > max(row.id for row in slots.values())
        warnings = " ".join(engine.memory.reconcile_warnings(TABLE))
        assert "slots changed in the student" in warnings
        assert "8 slots are new" in warnings
        assert "re-applied" in warnings
    finally:
        await engine.close()

    resave_student(student_dir, 24, seed=2)  # and then with fewer slots than rows
    engine = await launch(student_dir, database, tmp_path)
    try:
        rows = rows_of(database)
        assert len(rows) == 40 - 1  # nothing discarded
        orphans = [row for row in rows.values() if "orphan" in row.tags]
        assert sorted(row.meta["slot"] for row in orphans) == list(range(24, 40))
        assert set(mirror(engine).ids.tolist()) & {row.id for row in orphans} == set()
        assert rows[slots[1].id].label == "a label"
        assert any("orphan" in w for w in engine.memory.reconcile_warnings(TABLE))
        assert engine.memory.take_warnings() and engine.memory.take_warnings() == []
    finally:
        await engine.close()


async def test_a_mirror_of_other_sizes_is_rebuilt(student_dir: Path, tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = await launch(student_dir, database, tmp_path)
    try:
        with MemoryStore.open(database) as store:
            key_dim, value_dim = store.table(TABLE).key_dim, store.table(TABLE).value_dim
    finally:
        await engine.close()
    with MemoryStore.open(database) as store:  # the same name, other sizes (an old layout)
        store.drop_table(TABLE)
        store.create_table(TABLE, key_dim + 1, value_dim + 2).insert(
            np.ones((1, key_dim + 1), np.float32), np.ones((1, value_dim + 2), np.float32),
            labels=["old"], provenance=f"{student_dir}#layer1")
    engine = await launch(student_dir, database, tmp_path)
    try:
        with MemoryStore.open(database) as store:
            table = store.table(TABLE)
            assert (table.key_dim, table.value_dim, len(table)) == (key_dim, value_dim, SLOTS)
        assert any("rebuilt" in w for w in engine.memory.reconcile_warnings(TABLE))
    finally:
        await engine.close()


async def test_a_failing_memory_hook_is_one_line_in_the_store_error(
        student_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.services.memory_live import LiveMirrors

    def broken(*_args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(LiveMirrors, "load", broken)
    engine = await launch(student_dir, tmp_path / "memory.db", tmp_path)
    try:
        available = engine.memory.availability()
        assert not available.ok and "RuntimeError: boom" in available.reason
        assert "\n" not in available.reason
    finally:
        await engine.close()
