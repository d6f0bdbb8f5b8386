"""The Chat pane on the chat agent: a real tiny model, the agent's real SQLite dialog tree
and long-term memory (MiniLM embeddings) in a data directory of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, Static

from engine.agent.dialog import DialogStore
from engine.facade import TEACHER, Engine
from mindset.app import MindsetApp
from mindset.widgets.chat_log import MessageBox, NoteBox
from mindset.widgets.chat_pane import ChatPane
from tests.test_tui_support import APP_SIZE, make_app, mounted, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The data directory the agent keeps its dialog tree and memories in."""
    path = tmp_path / "home"
    monkeypatch.setenv("MINDSET_HOME", str(path))
    return path


def chat_app(tmp_path: Path) -> MindsetApp:
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "r")
    # tiny-llama reads characters and holds 1024 of them: no tool list, short replies.
    engine.agent.configure(tools=False, max_tokens=8, rate_importance=False, seed=0)
    return make_app(engine)


def idle(pane: ChatPane) -> bool:
    return not any(worker.node is pane and not worker.is_finished for worker in pane.workers)


async def open_chat(pilot: Any, app: MindsetApp) -> ChatPane:
    await pilot.press("f5")
    pane = await mounted(pilot, app, ChatPane)
    await wait_for(pilot, lambda: idle(pane))
    app.query_one("#chat-input", Input).focus()
    return pane


async def send(pilot: Any, pane: ChatPane, text: str) -> None:
    """Type ``text`` into the chat and wait until the pane has shown what it led to."""
    chat_input = pane.query_one("#chat-input", Input)
    chat_input.focus()
    chat_input.value = text
    await pilot.press("enter")
    await pilot.pause()
    await wait_for(pilot, lambda: idle(pane))


def text_of(pane: ChatPane, selector: str) -> str:
    return str(pane.query_one(selector, Static).render())


def headers(pane: ChatPane) -> list[str]:
    return [str(box.query_one(".message-header", Static).render())
            for box in pane.query(MessageBox)]


def stored_path(home: Path, conversation_id: str) -> list[Any]:
    with DialogStore(home / "agent" / "agent.db") as store:  # a second, separate reader
        return store.path(conversation_id)


async def test_a_message_gets_a_reply_and_both_are_stored(tmp_path: Path, home: Path) -> None:
    app = chat_app(tmp_path)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = await open_chat(pilot, app)
        await send(pilot, pane, "hello there")
        assert [t.node.role for t in pane.turns] == ["user", "assistant"]
        assert pane.report is not None and pane.report.tokens >= 1  # the reply streamed
        conversation = pane.conversation_id
        assert conversation is not None
        nodes = stored_path(home, conversation)
        assert (nodes[0].role, nodes[0].content) == ("user", "hello there")
        assert nodes[1].role == "assistant" and nodes[1].model == "tiny-llama"
        assert nodes[1].content == pane.turns[1].node.content
        shown = [box.content for box in pane.query(MessageBox)]
        assert shown == ["hello there", nodes[1].content]  # the log is the stored path


async def test_the_side_panel_lists_recalled_memories_with_their_scores(tmp_path: Path) -> None:
    app = chat_app(tmp_path)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = await open_chat(pilot, app)
        await send(pilot, pane, "My sister is called Alice")
        assert "No memory was recalled" in text_of(pane, "#chat-recalled")
        await pilot.press("ctrl+n")  # the first chat's turns are no longer in the prompt
        await wait_for(pilot, lambda: idle(pane) and not pane.turns)
        await send(pilot, pane, "What is my sister called?")
        assert pane.report is not None and pane.report.recalled
        panel = text_of(pane, "#chat-recalled")
        first = pane.report.recalled[0]
        assert "My sister is called Alice" in panel
        assert "total (recency, importance, relevance)" in panel
        assert (f"#{first.memory.id} turn  {first.score:.2f} ({first.recency:.2f}, "
                f"{first.importance:.2f}, {first.relevance:.2f})") in panel
        assert all(0 <= part <= 1 for s in pane.report.recalled
                   for part in (s.recency, s.importance, s.relevance))
        # The related turn ranks above the unrelated reply the tiny model gave.
        assert "My sister is called Alice" in first.memory.text


async def test_edit_makes_a_branch_and_the_branches_outlive_a_restart(tmp_path: Path,
                                                                      home: Path) -> None:
    app = chat_app(tmp_path)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = await open_chat(pilot, app)
        await send(pilot, pane, "first question")
        await pilot.press("ctrl+o")
        assert app.query_one("#chat-input", Input).value == "first question"
        await send(pilot, pane, "second question")
        assert (pane.turns[0].node.content, pane.turns[0].index, pane.turns[0].count) == \
            ("second question", 2, 2)
        assert "branch 2/2" in headers(pane)[0]
        await pilot.press("alt+left")
        await wait_for(pilot, lambda: idle(pane) and pane.turns[0].index == 1)
        assert pane.turns[0].node.content == "first question"
        assert "branch 1/2" in headers(pane)[0]
        assert len(pane.turns) == 2  # the first branch kept its own reply
        stored = stored_path(home, str(pane.conversation_id))
        assert [n.id for n in stored] == [t.node.id for t in pane.turns]
        before = pane.conversation_id, [(t.node.id, t.index, t.count) for t in pane.turns]
    again = chat_app(tmp_path)  # a new workbench on the same data directory
    async with again.run_test(size=APP_SIZE) as pilot:
        pane = await open_chat(pilot, again)
        assert (pane.conversation_id, [(t.node.id, t.index, t.count) for t in pane.turns]) \
            == before
        assert "branch 1/2" in headers(pane)[0]
        await pilot.press("alt+right")  # and the other branch is still there
        await wait_for(pilot, lambda: idle(pane) and pane.turns[0].index == 2)
        assert pane.turns[0].node.content == "second question"


async def test_slash_commands_answer_in_the_log_and_pin_a_feeling(tmp_path: Path) -> None:
    app = chat_app(tmp_path)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = await open_chat(pilot, app)
        await send(pilot, pane, "/tasks add write the report")
        await send(pilot, pane, "/tasks")
        notes = [str(note.render()) for note in pane.query(NoteBox)]
        assert len(notes) == 2 and "queued at priority" in notes[0]
        assert notes[1].startswith("/tasks\n#1 [") and "write the report (user)" in notes[1]

        app.clear_notifications()
        await send(pilot, pane, "/frobnicate now")
        assert any("unknown command /frobnicate" in n.message and n.severity == "error"
                   for n in app._notifications)
        assert len(pane.query(NoteBox)) == 2 and app.is_running

        await send(pilot, pane, "hi")  # the chat goes on; the notes stay where they were
        assert [t.node.role for t in pane.turns] == ["user", "assistant"]
        assert len(pane.query(NoteBox)) == 2
        assert "pinned" not in text_of(pane, "#chat-feeling")
        await send(pilot, pane, "/emotion calm")
        feeling = text_of(pane, "#chat-feeling")
        assert "pinned: calm, positive  arousal -0.50  valence +0.50" in feeling
        await send(pilot, pane, "how are you?")  # the pin holds for the next reply
        assert "pinned: calm" in text_of(pane, "#chat-feeling")
        await send(pilot, pane, "/emotion off")
        assert "pinned" not in text_of(pane, "#chat-feeling")


def hold_replies(adapter: Any) -> asyncio.Event:
    """Make the real adapter's replies stop after their first piece and wait there (until
    the turn is cancelled), so a test can stop a reply halfway whatever the CPU's speed."""
    stream = adapter.stream_chat
    started = asyncio.Event()

    def held(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async def pieces() -> AsyncIterator[Any]:
            async with contextlib.aclosing(stream(*args, **kwargs)) as chunks:
                async for chunk in chunks:
                    yield chunk
                    started.set()
                    await asyncio.Event().wait()  # mid-reply, until cancelled

        return pieces()

    adapter.stream_chat = held
    return started


async def test_escape_stops_a_reply_and_the_tree_stays_whole(tmp_path: Path,
                                                            home: Path) -> None:
    app = chat_app(tmp_path)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = await open_chat(pilot, app)
        started = hold_replies(await app.engine.chat.adapter(TEACHER))
        chat_input = app.query_one("#chat-input", Input)
        chat_input.value = "tell me a story"
        await pilot.press("enter")
        await wait_for(pilot, started.is_set)
        assert pane.busy
        chat_input.value = "and another"
        await pilot.press("enter")  # a second message while one is on its way: refused
        assert chat_input.value == "and another"
        assert any("on its way" in n.message for n in app._notifications)
        await pilot.press("escape")
        await wait_for(pilot, lambda: idle(pane))
        nodes = stored_path(home, str(pane.conversation_id))
        assert [n.role for n in nodes] == ["user"]  # no half-written reply was stored
        assert [t.node.id for t in pane.turns] == [n.id for n in nodes]
        assert [box.content for box in pane.query(MessageBox)] == ["tell me a story"]
        chat_input.value = ""
        await send(pilot, pane, "/branch list")  # and the chat goes on from there
        assert "tell me a story" in str(pane.query(NoteBox).last().render())


async def test_the_agents_memories_are_a_table_in_the_memory_pane(tmp_path: Path) -> None:
    from engine.agent.embedding import default_embedder
    from engine.agent.long_term import LongTermMemory
    from engine.memory.store import MemoryStore
    from mindset.widgets.memory_pane import MemoryPane

    database = tmp_path / "memory.db"
    with MemoryStore.open(database) as store:
        memory = LongTermMemory(store, default_embedder())
        memory.add("The user said: my sister's name is Oriane.", importance=8)
        memory.add("I replied: noted.", importance=2)
    engine = Engine("tiny-llama", database=database, runs_root=tmp_path / "runs")
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = app.query_one(MemoryPane)
        await wait_for(pilot, lambda: pane.table_name == "agent.memories" and len(pane.rows) == 2)
        assert sorted(str(row.label) for row in pane.rows) == [
            "I replied: noted.", "The user said: my sister's name is Oriane."]
