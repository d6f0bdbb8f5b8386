"""The workbench with an associative student: its table in the Memory pane, edits that reach
the live cache, and the chat's memory-use panel. Real engine, tiny-llama, real SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Select, Static

from engine.facade import STUDENT
from engine.memory import MemoryStore
from mindset.widgets.chat_pane import ChatPane
from mindset.widgets.memory_pane import MemoryPane
from tests.test_facade_associative import (
    ENTRIES,
    TABLE,
    live_layer,
    make_associative_student,
)
from tests.test_tui_support import APP_SIZE, make_app, mounted, student_engine, wait_for


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_associative_student(tmp_path_factory.mktemp("associative") / "student")


def table_ids(database: Path) -> list[int]:
    with MemoryStore.open(database) as store:
        return store.table(TABLE).ids().tolist()


async def test_memory_pane_shows_and_edits_the_associative_table(student_dir: Path,
                                                                 tmp_path: Path) -> None:
    database = tmp_path / "memory.db"
    engine = student_engine(student_dir, database, tmp_path)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = app.query_one(MemoryPane)
        await wait_for(pilot, lambda: pane.table_name == TABLE and len(pane.rows) == 50
                       and pane.rows[0].top_tokens != [])
        assert app.query_one("#memory-table", Select).value == TABLE
        assert f"size {ENTRIES}" in str(app.query_one("#memory-stats", Static).render())
        assert f"of {ENTRIES}" in str(app.query_one("#memory-page", Static).render())
        assert [r.id for r in pane.rows] == table_ids(database)[:50]

        layer = live_layer(engine)
        rows_table = app.query_one("#memory-rows", DataTable)
        rows_table.focus()
        await pilot.press("down")
        deleted = pane.rows[1].id
        await pilot.press("x")
        await wait_for(pilot, lambda: deleted not in table_ids(database))
        assert len(layer) == ENTRIES - 1  # the live student no longer holds the entry
        await pilot.press("u")
        await wait_for(pilot, lambda: len(table_ids(database)) == ENTRIES)
        assert len(layer) == ENTRIES


async def test_chat_panel_lists_the_associative_entries_a_reply_used(
        student_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINDSET_HOME", str(tmp_path / "home"))  # the chat agent's files
    database = tmp_path / "memory.db"
    engine = student_engine(student_dir, database, tmp_path)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        await pilot.press("f5")
        pane = await mounted(pilot, app, ChatPane)
        engine.agent.configure(tools=False, max_tokens=4, rate_importance=False)
        app.query_one("#chat-model", Select).value = STUDENT
        app.query_one("#chat-input", Input).focus()
        await pilot.press(*"hi", "enter")
        await wait_for(pilot, lambda: not pane.workers and len(pane.turns) == 2)
        panel = str(app.query_one("#chat-memory", Static).render())
        usage = engine.chat.last_memory_usage(STUDENT)
        assert usage
        ids = set(table_ids(database))
        assert all(use.id in ids for use in usage)
        assert f"{TABLE} #{usage[0].id}" in panel
