"""The Chat pane streams replies from a real local model and keeps branches."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from textual.widgets import Input, Markdown

from engine.facade import Engine
from mindset.widgets.chat_pane import ChatPane, MessageBox
from tests.test_tui_support import APP_SIZE, make_app, mounted, wait_for


def count_pieces(engine: Engine) -> list[int]:
    """Make the real chat service count the pieces each reply streams in."""
    pieces: list[int] = []
    stream = engine.chat.stream_chat

    async def counting(*args: Any, **kwargs: Any) -> AsyncIterator[str]:
        pieces.append(0)
        async for piece in stream(*args, **kwargs):
            pieces[-1] += 1
            yield piece

    engine.chat.stream_chat = counting  # type: ignore[method-assign]
    return pieces


async def test_streamed_reply_regenerate_and_branches(tmp_path: Path) -> None:
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "r")
    pieces = count_pieces(engine)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        await pilot.press("f5")
        pane = await mounted(pilot, app, ChatPane)
        pane.max_tokens = 12
        chat_input = app.query_one("#chat-input", Input)
        assert chat_input.has_focus
        await pilot.press(*"hello", "enter")
        await wait_for(pilot, lambda: not pane.workers and len(pieces) == 1)
        path = pane.conversation.path()
        assert [t.role for t in path] == ["user", "assistant"]
        assert path[0].content == "hello"
        reply = path[1].content
        assert reply and pieces[0] > 1  # many pieces, not one block
        body = app.query(MessageBox).last().query_one(Markdown)
        assert body.source == reply  # the stream wrote the whole reply into the widget

        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: not pane.workers and len(pieces) == 2)
        assistant = pane.conversation.path()[1]
        assert assistant.position() == (2, 2)
        await pilot.press("alt+left")
        await wait_for(pilot, lambda: pane.conversation.path()[1].position() == (1, 2))
        assert "branch 1/2" in str(app.query(MessageBox).last().query_one(".message-header")
                                   .render())

        await pilot.press("ctrl+o")
        assert chat_input.value == "hello"
        chat_input.value = "goodbye"
        await pilot.press("enter")
        await wait_for(pilot, lambda: not pane.workers and len(pieces) == 3)
        path = pane.conversation.path()
        assert path[0].content == "goodbye" and path[0].position() == (2, 2)
        assert path[1].content


async def test_failed_remote_request_is_a_notification(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "r")
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        await pilot.press("f5")
        pane = await mounted(pilot, app, ChatPane)
        from textual.widgets import Select

        app.query_one("#chat-model", Select).value = "remote"
        app.query_one("#chat-input", Input).focus()
        await pilot.press(*"hi", "enter")
        await wait_for(pilot, lambda: not pane.workers and len(pane.conversation.path()) == 2)
        assert any(n.severity == "error" for n in app._notifications)
        assert app.is_running
