"""The workbench's knowledge-editing flow on a real tiny student: trace the last reply from
the Chat pane, open a ranked entry in the Memory pane, edit it, re-run, insert a fact, undo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from textual.widgets import DataTable, Input, Select

from engine.facade import STUDENT
from engine.model.edit_journal import EditJournal
from engine.model.surgery import memory_layers
from engine.services.memory_mirror import featural_table_name
from mindset.screens.trace import FactScreen, HistoryScreen, TraceScreen
from mindset.widgets.chat_pane import ChatPane
from mindset.widgets.memory_pane import MemoryPane
from tests.test_tui_support import (
    APP_SIZE,
    make_app,
    make_routed_student,
    mounted,
    student_engine,
    wait_for,
)

LAYER = 1


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory of the test's own: the chat agent's dialog tree lives there."""
    path = tmp_path / "home"
    monkeypatch.setenv("MINDSET_HOME", str(path))
    return path


@pytest.fixture()
def routed_student(tmp_path: Path) -> Path:
    return make_routed_student(tmp_path / "student", (LAYER,))


async def _chat_with_student(pilot, app, question: str) -> ChatPane:  # type: ignore[no-untyped-def]
    await pilot.press("f5")
    pane = await mounted(pilot, app, ChatPane)
    await wait_for(pilot, lambda: app.engine.model(STUDENT) is not None)
    await wait_for(pilot, lambda: STUDENT in [o[1] for o in
                                              app.query_one("#chat-model", Select)._options])
    app.query_one("#chat-model", Select).value = STUDENT
    app.engine.agent.configure(tools=False, max_tokens=6, rate_importance=False)
    pane.temperature = 0.0
    app.query_one("#chat-input", Input).focus()
    await pilot.press(*question, "enter")
    await wait_for(pilot, lambda: not pane.workers and len(pane.turns) == 2
                   and bool(pane.turns[1].node.content))
    return pane


async def _trace_screen(pilot, app) -> TraceScreen:  # type: ignore[no-untyped-def]
    await pilot.press("ctrl+g")
    await wait_for(pilot, lambda: isinstance(app.screen, TraceScreen))
    screen = app.screen
    assert isinstance(screen, TraceScreen)
    await wait_for(pilot, lambda: screen.trace is not None and not screen.workers)
    return screen


async def test_trace_open_edit_rerun_undo_in_the_workbench(routed_student: Path,
                                                           tmp_path: Path) -> None:
    engine = student_engine(routed_student, tmp_path / "m.db", tmp_path)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = await _chat_with_student(pilot, app, "hi there")
        reply = pane.turns[1].node.content
        screen = await _trace_screen(pilot, app)
        trace = screen.trace
        assert trace is not None and trace.rows
        # Ranked by influence, each read named by its mirror row.
        influences = [row.influence for row in trace.rows]
        assert influences == sorted(influences, reverse=True)
        top = trace.rows[0]
        assert top.layer == LAYER and top.entry_id is not None
        module = memory_layers(engine.model(STUDENT).model)[LAYER]  # type: ignore[union-attr]
        before = module.values.detach().clone()

        await pilot.press("x")  # delete the most promoting entry
        await wait_for(pilot, lambda: len(screen.edits) == 1 and not screen.workers)
        assert torch.count_nonzero(module.values[top.slot]) == 0
        journal = EditJournal(routed_student)
        assert [e.op for e in journal.entries()] == ["value"]
        stored = await engine.memory.find_entry(top.table, top.entry_id)
        assert stored[0].norm == 0.0  # the Memory pane's row follows the edit

        await pilot.press("g")  # re-run the question: the answer is shown again
        await wait_for(pilot, lambda: len(screen.answers) == 1 and not screen.workers)
        assert "before:" in str(screen.query_one("#trace-status").render())

        await pilot.press("u")  # undo: the live student is back, bit for bit
        await wait_for(pilot, lambda: not screen.workers
                       and journal.entries()[-1].op == "undo")
        assert torch.equal(module.values.detach(), before)
        stored = await engine.memory.find_entry(top.table, top.entry_id)
        assert stored[0].norm == pytest.approx(float(before[top.slot].norm()), rel=1e-5)

        await pilot.press("h")  # the history lists the edit and its undo
        await wait_for(pilot, lambda: isinstance(app.screen, HistoryScreen))
        history = app.screen.query_one("#history-rows", DataTable)
        assert history.row_count == 2
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, TraceScreen))

        await pilot.press("o")  # jump to the entry in the Memory pane
        await wait_for(pilot, lambda: not isinstance(app.screen, TraceScreen))
        memory = app.query_one(MemoryPane)
        await wait_for(pilot, lambda: memory.search_results is not None
                       and [r.id for r in memory.search_results] == [top.entry_id])
        assert memory.table_name == featural_table_name(LAYER)
        assert app.query_one("#tabs").active == "memory"  # type: ignore[attr-defined]
        assert reply  # the reply that was traced


async def test_insert_a_fact_from_a_trace_and_undo_it(routed_student: Path,
                                                      tmp_path: Path) -> None:
    engine = student_engine(routed_student, tmp_path / "m.db", tmp_path)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = await _chat_with_student(pilot, app, "Tell me about Rovania")
        reply = pane.turns[1].node.content
        screen = await _trace_screen(pilot, app)
        module = memory_layers(engine.model(STUDENT).model)[LAYER]  # type: ignore[union-attr]
        slots = module.num_slots
        await pilot.press("i")
        await wait_for(pilot, lambda: isinstance(app.screen, FactScreen))
        app.screen.query_one("#fact-subject", Input).value = "Nowhere"  # not in the question
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, FactScreen)  # refused, the form stays
        # No subject: the key is the question's end. (A 4-layer random model has no later
        # layers that would carry a fact from the subject to the answer.)
        app.screen.query_one("#fact-subject", Input).value = ""
        app.screen.query_one("#fact-answer", Input).value = "zebra"
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: len(screen.edits) == 1 and not screen.workers)
        assert module.num_slots == slots + 8  # a new routed group holds the fact
        table = featural_table_name(LAYER)
        rows = await engine.memory.table_stats(table)
        assert rows["rows"] == slots + 8  # and the Memory pane has rows for it
        found = await engine.memory.find_entry(table, int(engine.memory.live.featural[table]
                                                          .ids[slots]))
        assert found[0].label.endswith("→ zebra")

        await pilot.press("g")
        await wait_for(pilot, lambda: len(screen.answers) == 1 and not screen.workers)
        assert not reply.startswith("z")
        assert screen.answers[0].startswith("z")  # the answer changed

        await pilot.press("u")
        await wait_for(pilot, lambda: not screen.workers and module.num_slots == slots)
        assert (await engine.memory.table_stats(table))["rows"] == slots
