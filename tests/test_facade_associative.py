"""Associative students in the engine facade: mirrored tables, edits that reach the live
cache and the student directory, and the memory-use record of a chat reply.

A real tiny-llama student with an associative layer 1, a real SQLite store, no mocks."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engine.facade import STUDENT, Engine
from engine.memory import MemoryStore
from engine.model.memory_layers import AssociativeConfig
from engine.model.memory_layers.associative import AssociativeMemory
from engine.services.chat import ChatMessage
from engine.services.memory_mirror import associative_table_name
from tests.test_tui_support import student_engine

TABLE = associative_table_name(1)
ENTRIES = 128 * 2  # one per neuron of tiny-llama's MLP and head


def make_associative_student(directory: Path) -> Path:
    """A tiny-llama student with an associative memory in layer 1, filled from its MLP."""
    from engine.model.loading import load_model
    from engine.model.student import save_student
    from engine.model.surgery import convert

    teacher = load_model("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = convert(teacher, [1], "associative", init="mlp", base="none", heads=2, key_dim=16,
                          value_dim=32, topk=4)
    return save_student(student, directory, teacher.tokenizer)


@pytest.fixture(scope="module")
def built_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_associative_student(tmp_path_factory.mktemp("associative") / "student")


@pytest.fixture
def student_dir(built_student: Path, tmp_path: Path) -> Path:
    """A copy per test: tests save edits into it."""
    return Path(shutil.copytree(built_student, tmp_path / "student"))


def student(engine: Engine) -> Any:
    loaded = engine.model(STUDENT)
    assert loaded is not None
    return loaded


def live_layer(engine: Engine) -> AssociativeMemory:
    from engine.model.surgery import memory_layers

    layer = memory_layers(student(engine).model)[1]
    assert isinstance(layer, AssociativeMemory)
    return layer


def mirror_arrays(database: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with MemoryStore.open(database) as store:
        return store.table(TABLE).export_arrays()


def logits(engine: Engine, text: str = "hello there") -> torch.Tensor:
    loaded = student(engine)
    encoded = loaded.tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        return loaded.model(**encoded).logits[0].clone()


def most_read_entry(layer: AssociativeMemory, engine: Engine) -> int:
    """The cache position the layer reads most for a sample text."""
    layer.start_recording()
    logits(engine)
    totals = layer.stop_recording()
    return int(totals.argmax())


async def loaded_engine(student_dir: Path, database: Path, tmp_path: Path) -> Engine:
    engine = student_engine(student_dir, database, tmp_path)
    await engine.load_model(STUDENT)
    return engine


async def test_the_cache_is_mirrored_in_order(student_dir: Path, tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        assert TABLE in await engine.memory.table_names()
        assert (await engine.memory.table_stats(TABLE))["rows"] == ENTRIES
        layer = live_layer(engine)
        ids, keys, values = mirror_arrays(database)
        np.testing.assert_array_equal(keys, layer.cache.keys.numpy())
        np.testing.assert_array_equal(values, layer.cache.values.numpy())
        page = await engine.memory.table_page(TABLE, 0, 3)
        assert [row.id for row in page] == ids[:3].tolist()
        # What a value promotes is read through the layer's own output projection.
        assert all(len(row.top_tokens) == 5 for row in page)
    finally:
        await engine.close()


async def test_delete_edit_and_undo_reach_the_live_cache(student_dir: Path,
                                                         tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        layer = live_layer(engine)
        ids, keys, _ = mirror_arrays(database)
        position = most_read_entry(layer, engine)
        target = int(ids[position])
        before = logits(engine)

        deleted = await engine.memory.delete_entries(TABLE, [target])
        assert len(layer) == ENTRIES - 1
        # The deleted key is gone from the cache, and the reply to the same text changes.
        assert not (layer.cache.keys == torch.from_numpy(keys[position])).all(dim=1).any()
        assert not torch.allclose(logits(engine), before)
        remaining, remaining_keys, _ = mirror_arrays(database)
        assert target not in remaining.tolist()
        np.testing.assert_array_equal(remaining_keys, layer.cache.keys.numpy())

        restored = await engine.memory.restore_entries(deleted)
        assert len(layer) == ENTRIES
        torch.testing.assert_close(logits(engine), before)  # the same entries, read again

        edited = restored[0]
        await engine.memory.update_entry(TABLE, edited, label="edited", scale=3.0)
        ids, _, values = mirror_arrays(database)
        at = int(np.flatnonzero(ids == edited)[0])
        np.testing.assert_allclose(layer.cache.values[at].numpy(), values[at])
        np.testing.assert_allclose(values[at], deleted.values[0] * 3, rtol=1e-6)
    finally:
        await engine.close()


async def test_insert_evict_and_recombine_reach_the_live_cache(student_dir: Path,
                                                               tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        layer = live_layer(engine)
        new_id = await engine.memory.insert_entry(TABLE, text="the sky is blue")
        assert len(layer) == ENTRIES + 1
        ids, keys, _ = mirror_arrays(database)
        assert ids[-1] == new_id
        np.testing.assert_array_equal(layer.cache.keys[-1].numpy(), keys[-1])
        # The new key is the layer's query for that text: searching it finds the entry.
        found = await engine.memory.search_text(TABLE, "the sky is blue", k=1)
        assert [row.id for row in found] == [new_id]

        assert "evicted 25" in await engine.memory.evict(TABLE)
        assert len(layer) == ENTRIES + 1 - 25
        message = await engine.memory.recombine(TABLE)
        assert message.startswith(("merged", "nothing"))
        ids, keys, values = mirror_arrays(database)
        assert len(layer) == len(ids)
        np.testing.assert_array_equal(layer.cache.keys.numpy(), keys)
        np.testing.assert_array_equal(layer.cache.values.numpy(), values)
    finally:
        await engine.close()


async def test_saved_edits_persist_in_the_student(student_dir: Path, tmp_path: Path) -> None:
    from engine.model.loading import load_student
    from engine.model.surgery import memory_layers

    database = tmp_path / "memory.db"
    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        ids, _, values = mirror_arrays(database)
        await engine.memory.delete_entries(TABLE, [int(ids[0])])
        await engine.memory.update_entry(TABLE, int(ids[1]), label="kept", scale=2.0)
        await engine.memory.save_student()
    finally:
        await engine.close()

    on_disk = memory_layers(load_student(student_dir))[1]
    assert isinstance(on_disk, AssociativeMemory)
    assert len(on_disk) == ENTRIES - 1
    np.testing.assert_allclose(on_disk.cache.values[0].numpy(), values[1] * 2, rtol=1e-6)
    np.testing.assert_array_equal(on_disk.cache.values[1:].numpy(), values[2:])

    # Loading the saved student again re-uses the mirror, which still matches it: the
    # label given in the workbench survives.
    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        assert len(live_layer(engine)) == ENTRIES - 1
        rows = await engine.memory.find_entry(TABLE, int(ids[1]))
        assert rows[0].label == "kept"
    finally:
        await engine.close()


async def test_an_unsaved_delete_stays_deleted_after_a_relaunch(student_dir: Path,
                                                                 tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        await engine.memory.evict(TABLE, 3)  # none of it saved to the student
        ids, keys, _ = mirror_arrays(database)
        await engine.memory.delete_entries(TABLE, [int(ids[0])])
        await engine.memory.update_entry(TABLE, int(ids[1]), label="kept", scale=2.0)
    finally:
        await engine.close()
    before, _, before_values = mirror_arrays(database)
    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        layer = live_layer(engine)
        assert len(layer) == ENTRIES - 4  # the delete and the eviction hold
        after, after_keys, after_values = mirror_arrays(database)
        np.testing.assert_array_equal(after, before)  # no row rebuilt, no id reassigned
        np.testing.assert_array_equal(after_values, before_values)
        np.testing.assert_array_equal(after_keys, layer.cache.keys.numpy())
        np.testing.assert_array_equal(after_values, layer.cache.values.numpy())
        assert not (layer.cache.keys == torch.from_numpy(keys[0])).all(dim=1).any()
        assert (await engine.memory.find_entry(TABLE, int(ids[1])))[0].label == "kept"
        warnings = " ".join(engine.memory.reconcile_warnings(TABLE))
        assert "4 entries deleted here are still in the student" in warnings
        assert "1 edited values not yet saved" in warnings
        assert TABLE + ".deleted" not in await engine.memory.table_names()

        await engine.memory.save_student()
    finally:
        await engine.close()
    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        assert engine.memory.reconcile_warnings() == []
        assert len(live_layer(engine)) == ENTRIES - 4
        np.testing.assert_array_equal(mirror_arrays(database)[0], before)
    finally:
        await engine.close()


class Crash(BaseException):
    """The process dying mid-way (no ``except Exception`` runs)."""


@pytest.mark.parametrize("deleted", [False, True], ids=["before-delete", "after-delete"])
async def test_a_crash_around_a_delete_loses_and_resurrects_nothing(
        student_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        deleted: bool) -> None:
    from engine.memory import MemoryTable

    database = tmp_path / "memory.db"
    real_delete = MemoryTable.delete

    def crashing_delete(self: MemoryTable, ids: object) -> None:
        if self.name != TABLE:
            real_delete(self, ids)
            return
        if deleted:
            real_delete(self, ids)
        raise Crash

    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        ids, keys, values = mirror_arrays(database)
        target = int(ids[7])
        monkeypatch.setattr(MemoryTable, "delete", crashing_delete)
        with pytest.raises(Crash):
            await engine.memory.delete_entries(TABLE, [target])
        monkeypatch.setattr(MemoryTable, "delete", real_delete)
    finally:
        await engine.close()

    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        layer = live_layer(engine)
        after, after_keys, after_values = mirror_arrays(database)
        warnings = " ".join(engine.memory.reconcile_warnings(TABLE))
        assert "new in the student" not in warnings
        if deleted:  # the delete holds: the ledger written first keeps it deleted
            assert target not in after.tolist() and len(layer) == ENTRIES - 1
            assert not (layer.cache.keys == torch.from_numpy(keys[7])).all(dim=1).any()
            assert "1 entries deleted here are still in the student" in warnings
        else:  # the row is intact, and its stale ledger entry is gone
            np.testing.assert_array_equal(after, ids)
            np.testing.assert_array_equal(after_values, values)
            assert len(layer) == ENTRIES and warnings == ""
            with MemoryStore.open(database) as store:
                ledger = TABLE + ".deleted"
                assert ledger not in store.table_names() or len(store.table(ledger)) == 0
        np.testing.assert_array_equal(after_keys, layer.cache.keys.numpy())
    finally:
        await engine.close()

    # The next launch agrees with this one.
    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        assert len(live_layer(engine)) == ENTRIES - (1 if deleted else 0)
    finally:
        await engine.close()


async def test_entries_new_in_the_student_get_rows(student_dir: Path, tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        ids, keys, values = mirror_arrays(database)
        await engine.memory.update_entry(TABLE, int(ids[5]), label="mine")
        layer = live_layer(engine)
        # The layer inserts an entry at run time (not through the table) and is saved.
        extra_key, extra_value = torch.randn(1, keys.shape[1]), torch.randn(1, values.shape[1])
        layer.fill(torch.cat([layer.cache.keys, extra_key]),
                   torch.cat([layer.cache.values, extra_value]))
        await engine.memory.save_student()
    finally:
        await engine.close()
    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        after, after_keys, _ = mirror_arrays(database)
        assert len(after) == ENTRIES + 1 and after[:ENTRIES].tolist() == ids.tolist()
        np.testing.assert_array_equal(after_keys[-1], extra_key[0].numpy())
        np.testing.assert_array_equal(after_keys, live_layer(engine).cache.keys.numpy())
        assert (await engine.memory.find_entry(TABLE, int(ids[5])))[0].label == "mine"
        assert any("1 entries are new" in w for w in engine.memory.reconcile_warnings(TABLE))
    finally:
        await engine.close()


async def test_a_reply_records_the_entries_it_read(student_dir: Path, tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = await loaded_engine(student_dir, database, tmp_path)
    try:
        assert engine.chat.last_memory_usage(STUDENT) is None
        pieces = [piece async for piece in engine.chat.stream_chat(
            STUDENT, [ChatMessage("user", "hi")], max_tokens=4)]
        assert pieces
        usage = engine.chat.last_memory_usage(STUDENT)
        assert usage
        ids, _, _ = mirror_arrays(database)
        assert {use.table for use in usage} == {TABLE}
        assert {use.id for use in usage} <= set(ids.tolist())
        assert all(use.weight > 0 for use in usage)
        assert sum(use.weight for use in usage) <= 1 + 1e-6
        assert live_layer(engine).read_totals is None  # recording stops with the reply
    finally:
        await engine.close()


def test_the_read_recorder_sums_weights_of_retrieved_entries() -> None:
    torch.manual_seed(0)
    module = AssociativeMemory(AssociativeConfig.from_hparams(
        8, dict(heads=2, key_dim=4, value_dim=3, topk=3, capacity=64, insert="never")))
    module.fill(torch.randn(20, 4), torch.randn(20, 3))
    module.eval()
    x = torch.randn(5, 8)
    with torch.no_grad():
        queries = module.query_proj(x).view(10, 4)
        _, positions = module.cache.search(queries, 3)
    before = module(x)

    module.start_recording()
    with torch.inference_mode():
        recorded = module(x)
    totals = module.stop_recording()
    torch.testing.assert_close(recorded, before)  # recording does not change the output
    assert set(torch.nonzero(totals).flatten().tolist()) == set(positions.flatten().tolist())
    # Each of the 10 rows (token x head) gives its retrieved entries less than its whole
    # attention: the token's own entry takes the rest.
    assert 0 < float(totals.sum()) < 10
    assert module.read_totals is None
    module(x)  # not recording: nothing is summed
    assert module.read_totals is None
