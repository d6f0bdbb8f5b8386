"""The Memory pane against a real student and a real SQLite store: browse, edit, delete, undo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from textual.widgets import DataTable, Input

from engine.facade import STUDENT, Engine
from engine.memory import MemoryStore
from engine.views import Availability, DeletedEntries, EntryView
from mindset.screens.entry_edit import EntryEditScreen
from mindset.widgets.memory_pane import MemoryPane
from tests.test_tui_support import (
    APP_SIZE,
    PaneHost,
    make_app,
    make_student,
    student_engine,
    wait_for,
)

TABLE = "layer1_featural"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_student(tmp_path_factory.mktemp("student") / "student")


def read_row(database: Path, entry_id: int) -> object:
    store = MemoryStore.open(database)
    try:
        return store.table(TABLE).get([entry_id])[0]
    finally:
        store.close()


def table_size(database: Path) -> int:
    store = MemoryStore.open(database)
    try:
        return len(store.table(TABLE))
    finally:
        store.close()


async def test_edit_delete_undo_reach_the_database(student_dir: Path, tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = student_engine(student_dir, database, tmp_path)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = app.query_one(MemoryPane)
        await wait_for(pilot, lambda: len(pane.rows) == 32 and pane.rows[0].top_tokens != [])
        assert pane.table_name == TABLE
        rows_table = app.query_one("#memory-rows", DataTable)
        assert rows_table.row_count == 32
        rows_table.focus()
        await pilot.pause()
        offered = {binding.action for _, binding, enabled, _ in
                   app.screen.active_bindings.values() if enabled}
        assert "edit" in offered  # a featural table's keys, without those it refuses
        assert not {"evict", "recombine", "insert"} & offered
        await pilot.press("down", "down")
        entry = pane.rows[2]
        before = read_row(database, entry.id)

        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, EntryEditScreen))
        app.screen.query_one("#edit-label", Input).value = "capital cities"
        app.screen.query_one("#edit-tags", Input).value = "geo, edited"
        app.screen.query_one("#edit-scale", Input).value = "2"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: read_row(database, entry.id).label == "capital cities")

        after = read_row(database, entry.id)
        assert sorted(after.tags) == ["edited", "geo"]
        np.testing.assert_allclose(after.value, 2 * before.value, rtol=1e-6)
        # The live student reads the edited slot too.
        mirror = engine.memory.mirror(TABLE)
        assert mirror is not None
        module = mirror.module
        np.testing.assert_allclose(module.values[after.meta["slot"]].detach().numpy(),
                                   after.value, rtol=1e-6)
        await wait_for(pilot, lambda: any(r.label == "capital cities" for r in pane.rows))

        await pilot.press("x")
        await wait_for(pilot, lambda: table_size(database) == 31)
        assert not module.values[after.meta["slot"]].detach().any()
        await pilot.press("u")
        await wait_for(pilot, lambda: table_size(database) == 32)
        np.testing.assert_allclose(module.values[after.meta["slot"]].detach().numpy(),
                                   after.value, rtol=1e-6)
        await wait_for(pilot, lambda: len(pane.rows) == 32)


async def test_a_delete_and_a_label_survive_quitting_and_relaunching(student_dir: Path,
                                                                      tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = student_engine(student_dir, database, tmp_path)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = app.query_one(MemoryPane)
        await wait_for(pilot, lambda: len(pane.rows) == 32 and engine.model(STUDENT) is not None)
        app.query_one("#memory-rows", DataTable).focus()
        await pilot.press("down")
        labelled = pane.rows[1].id
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, EntryEditScreen))
        app.screen.query_one("#edit-label", Input).value = "keep me"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: read_row(database, labelled).label == "keep me")
        await wait_for(pilot, lambda: any(r.label == "keep me" for r in pane.rows))
        await pilot.press("down")
        deleted = pane.rows[2].id
        await pilot.press("x")  # and no undo: the student is not saved either
        await wait_for(pilot, lambda: table_size(database) == 31 and len(pane.rows) == 31)
        ids = [row.id for row in pane.rows]
    # Quit (the app closes its engine), then launch the workbench again on the same files.
    engine = student_engine(student_dir, database, tmp_path)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = app.query_one(MemoryPane)
        await wait_for(pilot, lambda: len(pane.rows) == 31 and engine.model(STUDENT) is not None)
        assert [row.id for row in pane.rows] == ids  # still gone, no id reassigned
        assert deleted not in ids
        assert next(r for r in pane.rows if r.id == labelled).label == "keep me"
        await wait_for(pilot, lambda: any("stay deleted" in n.message and n.severity == "warning"
                                          for n in app._notifications))


async def test_search_by_id_and_by_text(student_dir: Path, tmp_path: Path) -> None:
    engine = Engine("tiny-llama", student_spec=str(student_dir), database=tmp_path / "m.db",
                    runs_root=tmp_path / "runs")
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = app.query_one(MemoryPane)
        await wait_for(pilot, lambda: len(pane.rows) == 32 and engine.model(STUDENT) is not None)
        wanted = pane.rows[5].id
        await pilot.press("slash")
        search = app.query_one("#memory-search", Input)
        assert search.has_focus
        search.value = f"#{wanted}"
        await pilot.press("enter")
        await wait_for(pilot, lambda: [r.id for r in pane.rows] == [wanted])

        search.value = "hello"
        search.focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(pane.rows) == 20 and pane.search_results is not None)
        # The nearest keys come back in order of distance, from the real index.
        assert len({r.id for r in pane.rows}) == 20


async def test_corrupt_database_is_reported_not_raised(tmp_path: Path) -> None:
    database = tmp_path / "broken.db"
    database.write_bytes(b"this is not a database" * 100)
    engine = Engine("tiny-llama", database=database, runs_root=tmp_path / "runs")
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = app.query_one(MemoryPane)
        stats = app.query_one("#memory-stats")
        await wait_for(pilot, lambda: "unavailable" in str(stats.render()).lower())
        # The notification reaches the app a moment after the pane shows the reason.
        await wait_for(pilot, lambda: any("database" in n.message.lower()
                                          or "broken.db" in n.message
                                          for n in app._notifications), timeout=10)
        assert pane.rows == []


async def test_save_student_keeps_featural_edits(tmp_path: Path) -> None:
    from engine.model.loading import load_student
    from engine.model.student import WEIGHTS_FILE
    from engine.model.surgery import memory_layers

    student_dir = make_student(tmp_path / "student")

    def slots_on_disk() -> np.ndarray:
        return memory_layers(load_student(student_dir))[1].values.detach().numpy().copy()

    def slots_in_weights() -> np.ndarray:
        from safetensors.numpy import load_file

        weights = load_file(str(student_dir / WEIGHTS_FILE))
        return next(v for k, v in weights.items() if k.endswith("layers.1.mlp.values"))

    original = slots_on_disk()
    np.testing.assert_array_equal(slots_in_weights(), original)
    database = tmp_path / "memory.db"
    engine = student_engine(student_dir, database, tmp_path)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = app.query_one(MemoryPane)
        await wait_for(pilot, lambda: len(pane.rows) == 32 and engine.model(STUDENT) is not None)
        app.query_one("#memory-rows", DataTable).focus()
        await pilot.press("down")
        entry = pane.rows[1]
        before = read_row(database, entry.id)
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, EntryEditScreen))
        app.screen.query_one("#edit-scale", Input).value = "3"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not np.allclose(read_row(database, entry.id).value,
                                                      before.value))
        slot = before.meta["slot"]
        np.testing.assert_allclose(original[slot], before.value, rtol=1e-6)
        # Not saved yet: the weights file still holds the old slots, and the edit is in the
        # journal, which loading replays (a crash now would lose nothing).
        np.testing.assert_array_equal(slots_in_weights(), original)
        replayed = original.copy()
        replayed[slot] *= 3
        np.testing.assert_allclose(slots_on_disk(), replayed, rtol=1e-6)

        await pilot.press("w")
        await wait_for(pilot, lambda: any("student saved" in n.message
                                          for n in app._notifications))
    expected = original.copy()
    expected[slot] *= 3  # the edited slot, and only it, changed on disk
    np.testing.assert_allclose(slots_on_disk(), expected, rtol=1e-6)


async def test_save_student_without_a_student_says_so(tmp_path: Path) -> None:
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "runs")
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        await app.query_one(MemoryPane).run_action("save_student")
        await wait_for(pilot, lambda: any("no student" in n.message
                                          for n in app._notifications))


class FakeMemory:
    """The Memory pane's protocol over a list of rows: what the pane shows is the point."""

    def __init__(self, size: int) -> None:
        self.rows = [EntryView(i, f"entry {i}", [], i % 3, "never", 1.0, ["tok"])
                     for i in range(1, size + 1)]
        self.deleted: list[int] = []

    def availability(self) -> Availability:
        return Availability(True)

    async def table_names(self) -> list[str]:
        return ["facts"]

    async def table_stats(self, table: str) -> dict[str, Any]:
        return {"rows": len(self.rows), "never_accessed": 0, "key_dim": 4, "value_dim": 8}

    async def table_page(self, table: str, offset: int, limit: int, *,
                         order: str = "id") -> list[EntryView]:
        return self.rows[offset:offset + limit]

    async def find_entry(self, table: str, entry_id: int) -> list[EntryView]:
        return [row for row in self.rows if row.id == entry_id]

    async def search_text(self, table: str, text: str) -> list[EntryView]:
        return [row for row in self.rows if text in row.label]

    async def update_entry(self, table: str, entry_id: int, **changes: Any) -> None:
        raise AssertionError("not edited in this test")

    async def delete_entries(self, table: str, ids: list[int]) -> DeletedEntries:
        gone = [row for row in self.rows if row.id in ids]
        self.rows = [row for row in self.rows if row.id not in ids]
        self.deleted.extend(ids)
        return DeletedEntries(table, ids, np.zeros((len(ids), 4)), np.zeros((len(ids), 8)),
                              [row.label for row in gone], [[] for _ in gone])

    async def restore_entries(self, deleted: DeletedEntries) -> list[int]:
        new_ids = [max(row.id for row in self.rows) + 1]
        self.rows.append(EntryView(new_ids[0], str(deleted.labels[0]), [], 0, "never", 1.0))
        return new_ids

    async def insert_entry(self, table: str, *, label: str | None = None,
                           text: str | None = None) -> int:
        raise AssertionError("not inserted in this test")

    async def evict(self, table: str) -> str:
        return "evicted 0 entries"

    async def recombine(self, table: str) -> str:
        return "nothing to merge"

    async def save_student(self) -> str:
        return "/nowhere"

    def take_warnings(self) -> list[str]:
        return []

    def fixed_slots(self, table: str) -> bool:
        return False

    async def annotate(self, table: str, path: str) -> int:
        return 0


async def test_pane_pages_and_undoes_against_its_protocol() -> None:
    """The Memory pane needs only the MemoryAPI: pages, the page line, delete and undo."""
    memory = FakeMemory(60)
    app = PaneHost(MemoryPane(memory, id="memory-pane"))
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = app.query_one(MemoryPane)
        page = app.query_one("#memory-page")
        await wait_for(pilot, lambda: len(pane.rows) == 50)
        assert pane.table_name == "facts"
        assert "rows 1-50 of 60" in str(page.render())
        app.query_one("#memory-rows", DataTable).focus()
        await pilot.press("n")
        await wait_for(pilot, lambda: pane.rows and pane.rows[0].id == 51)
        assert "rows 51-60 of 60" in str(page.render())
        assert app.query_one("#memory-rows", DataTable).get_row("55")[1] == "entry 55"
        await pilot.press("p")
        await wait_for(pilot, lambda: pane.rows[0].id == 1)
        await pilot.press("down", "x")
        await wait_for(pilot, lambda: memory.deleted == [2])
        await wait_for(pilot, lambda: [r.id for r in pane.rows[:2]] == [1, 3])
        await pilot.press("u")
        await wait_for(pilot, lambda: len(memory.rows) == 60 and not pane.undo_stack)


async def test_first_view_sorts_by_norm_marks_dead_slots_and_explains_columns(
        tmp_path: Path) -> None:
    import torch

    from engine.model.loading import load_model
    from engine.model.student import save_student
    from engine.model.surgery import convert, memory_layers

    teacher = load_model("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = convert(teacher, [1], "featural", init="random", keys="flat", slots=32,
                          topk=8)
    with torch.no_grad():
        memory_layers(student)[1].values[:5] = 0  # five dead slots
    directory = save_student(student, tmp_path / "student", teacher.tokenizer)
    app = make_app(student_engine(directory, tmp_path / "memory.db", tmp_path))
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = app.query_one(MemoryPane)
        await wait_for(pilot, lambda: pane.table_name == TABLE and len(pane.rows) == 32)
        stats = str(app.query_one("#memory-stats").render())
        assert "dead 5" in stats and "sorted largest value first" in stats
        assert "norm: size of the value, 0 = dead" in str(
            app.query_one("#memory-columns").render())
        norms = [row.norm for row in pane.rows]
        assert norms == sorted(norms, reverse=True) and norms[-5:] == [0.0] * 5
        cells = app.query_one("#memory-rows", DataTable)
        labels = [str(cells.get_row_at(i)[1]) for i in range(32)]
        assert all(label.startswith("dead · ") for label in labels[-5:])
        assert not any(label.startswith("dead") for label in labels[:-5])
        cells.focus()
        await pilot.press("s")  # most read first: nothing was read, so by id within
        await wait_for(pilot, lambda: "most read first" in str(
            app.query_one("#memory-stats").render()))
        await pilot.press("s")
        await wait_for(pilot, lambda: "sorted by id" in str(app.query_one("#memory-stats")
                                                             .render()))
        await wait_for(pilot, lambda: [row.id for row in pane.rows]
                       == sorted(row.id for row in pane.rows))
