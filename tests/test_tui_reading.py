"""The workbench reads notes into an associative student: the Memory pane's table grows, each
new row shows the context that wrote it and where it was read, and `w` keeps them."""

from __future__ import annotations

from pathlib import Path

from textual.widgets import DataTable, Input, Static

from engine.memory import MemoryStore
from engine.model.loading import load_student
from engine.model.reading import reading_layers
from mindset.screens.ask import AskScreen
from mindset.widgets.memory_pane import MemoryPane
from tests.test_reading_cli_server import NOTES, make_student
from tests.test_tui_support import APP_SIZE, make_app, student_engine, wait_for

TABLE = "layer1_associative"


async def test_reading_notes_grows_the_table_with_sources(tmp_path: Path) -> None:
    student = make_student(tmp_path / "student")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "paris.md").write_text(NOTES["paris.md"], encoding="utf-8")
    database = tmp_path / "memory.db"
    app = make_app(student_engine(student, database, tmp_path))
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = app.query_one(MemoryPane)
        await wait_for(pilot, lambda: pane.table_name == TABLE)
        assert pane.table_size == 0
        app.query_one("#memory-rows", DataTable).focus()
        await pilot.press("l")
        await wait_for(pilot, lambda: isinstance(app.screen, AskScreen))
        await pilot.press("enter")  # no path: nothing happens
        await wait_for(pilot, lambda: not isinstance(app.screen, AskScreen))
        assert pane.table_size == 0
        await pilot.press("l")
        await wait_for(pilot, lambda: isinstance(app.screen, AskScreen))
        app.screen.query_one("#ask-answer", Input).value = str(tmp_path / "missing")
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("no such file or folder" in str(n.message)
                                          for n in app._notifications))
        await pilot.press("l")
        await wait_for(pilot, lambda: isinstance(app.screen, AskScreen))
        app.screen.query_one("#ask-answer", Input).value = str(notes)
        await pilot.press("enter")
        await wait_for(pilot, lambda: pane.table_size > 50 and len(pane.rows) == 50)
        added = pane.table_size
        first = pane.rows[0]
        assert first.source.startswith("paris.md, token ") and " → " in first.label
        detail = str(app.query_one("#memory-detail", Static).render())
        assert "read from paris.md, token" in detail
        assert any("entries added" in str(n.message) for n in app._notifications)
        with MemoryStore.open(database) as store:
            assert len(store.table(TABLE)) == added
        await pilot.press("w")
        await wait_for(pilot, lambda: any("student saved" in str(n.title or "")
                                          for n in app._notifications))
    again = reading_layers(load_student(student).model)[1]
    assert len(again.cache) == added
    assert {note["document"] for note in again.cache.notes if note} == {"paris.md"}
