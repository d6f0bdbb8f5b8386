"""The Chat pane streams the agent's replies from a real local model and keeps branches."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, Markdown, Select

from engine.facade import TEACHER, Engine
from mindset.widgets.chat_log import MessageBox
from mindset.widgets.chat_pane import ChatPane
from tests.test_tui_support import APP_SIZE, make_app, mounted, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data directory of the test's own: the agent's dialog tree lives there."""
    path = tmp_path / "home"
    monkeypatch.setenv("MINDSET_HOME", str(path))
    return path


async def count_pieces(engine: Engine) -> list[int]:
    """Make the teacher's real adapter count the pieces each reply streams in."""
    pieces: list[int] = []
    adapter = await engine.chat.adapter(TEACHER)
    stream = adapter.stream_chat

    async def counting(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        pieces.append(0)
        async for chunk in stream(*args, **kwargs):
            pieces[-1] += 1
            yield chunk

    adapter.stream_chat = counting  # type: ignore[assignment,method-assign]
    return pieces


def header(box: MessageBox) -> str:
    return str(box.query_one(".message-header").render())


async def test_streamed_reply_regenerate_and_branches(tmp_path: Path) -> None:
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "r")
    engine.agent.configure(tools=False, max_tokens=12, rate_importance=False)
    pieces = await count_pieces(engine)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        await pilot.press("f5")
        pane = await mounted(pilot, app, ChatPane)
        chat_input = app.query_one("#chat-input", Input)
        assert chat_input.has_focus
        await pilot.press(*"hello", "enter")
        await wait_for(pilot, lambda: not pane.workers and len(pieces) == 1)
        path = pane.turns
        assert [t.node.role for t in path] == ["user", "assistant"]
        assert path[0].node.content == "hello"
        reply = path[1].node.content
        assert reply and pieces[0] > 1  # the model streamed many pieces, not one block
        assert pane.report is not None and pane.report.tokens >= 1
        body = app.query(MessageBox).last().query_one(Markdown)
        assert body.source == reply  # the log shows the stored reply

        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: not pane.workers and len(pieces) == 2)
        assert (pane.turns[1].index, pane.turns[1].count) == (2, 2)
        await pilot.press("alt+left")
        await wait_for(pilot, lambda: not pane.workers and pane.turns[1].index == 1)
        assert pane.turns[1].node.content == reply
        assert "branch 1/2" in header(app.query(MessageBox).last())

        await pilot.press("ctrl+o")
        assert chat_input.value == "hello"
        chat_input.value = "goodbye"
        await pilot.press("enter")
        await wait_for(pilot, lambda: not pane.workers and len(pieces) == 3)
        path = pane.turns
        assert path[0].node.content == "goodbye" and (path[0].index, path[0].count) == (2, 2)
        assert path[1].node.content


async def test_failed_remote_request_is_a_notification(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "r")
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        await pilot.press("f5")
        pane = await mounted(pilot, app, ChatPane)
        app.query_one("#chat-model", Select).value = "remote"
        chat_input = app.query_one("#chat-input", Input)
        chat_input.focus()
        await pilot.press(*"hi", "enter")
        await wait_for(pilot, lambda: not pane.workers
                       and any(n.severity == "error" for n in app._notifications))
        assert app.is_running
        assert pane.turns == [] and pane.conversation_id is None  # nothing half-stored
        assert chat_input.value == "hi"  # the message is kept to send again
        assert await engine.agent.conversations() == []
