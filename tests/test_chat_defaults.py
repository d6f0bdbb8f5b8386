"""Sampling defaults: the model's generation config when its authors chose sampling, else
conservative small-model settings; used by the chat, `mindset complete` and the server."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input, Static

from engine.facade import TEACHER, Engine
from engine.llm.defaults import SMALL_MODEL_DEFAULTS, generation_defaults
from engine.model.loading import load_model
from mindset.screens.ask import AskScreen
from mindset.widgets.chat_pane import ChatPane
from tests.test_tui_support import APP_SIZE, make_app, mounted, wait_for


def _sampling_teacher(directory: Path) -> Path:
    """tiny-llama saved with a generation config that asks for sampling at 0.55 / 0.8."""
    loaded = load_model("tiny-llama")
    config = loaded.model.generation_config
    config.do_sample, config.temperature, config.top_p = True, 0.55, 0.8
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def test_defaults_come_from_the_generation_config_else_small_model_ones(tmp_path) -> None:
    plain = load_model("tiny-llama").model
    assert generation_defaults(plain) == SMALL_MODEL_DEFAULTS  # no sampling chosen there
    chosen = load_model(str(_sampling_teacher(tmp_path / "teacher"))).model
    defaults = generation_defaults(chosen)
    assert defaults["temperature"] == 0.55 and defaults["top_p"] == 0.8


async def test_the_chat_uses_and_shows_the_model_defaults_and_a_chosen_sampling(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINDSET_HOME", str(tmp_path / "home"))  # the chat agent's files
    teacher = _sampling_teacher(tmp_path / "teacher")
    engine = Engine(str(teacher), database=tmp_path / "m.db", runs_root=tmp_path / "r")
    engine.agent.configure(tools=False, max_tokens=3, rate_importance=False)
    assert (await engine.chat.sampling_defaults(TEACHER))["temperature"] == 0.55
    seen = []
    adapter = await engine.chat.adapter(TEACHER)
    stream = adapter.stream_chat

    def spy(messages, params, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((params.temperature, params.top_p))
        return stream(messages, params, **kwargs)

    adapter.stream_chat = spy  # type: ignore[method-assign]
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        await pilot.press("f5")
        pane = await mounted(pilot, app, ChatPane)
        label = app.query_one("#chat-sampling", Static)
        await wait_for(pilot, lambda: "0.55" in str(label.render()))
        assert "the model's defaults" in str(label.render())
        await pilot.press(*"hi", "enter")
        await wait_for(pilot, lambda: len(seen) == 1 and not pane.workers)
        assert seen[0] == (0.55, 0.8)  # the model's own sampling
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, AskScreen))
        app.screen.query_one("#ask-answer", Input).value = "7 1"  # out of range: refused
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("temperature" in n.message
                                          for n in app._notifications))
        assert "the model's defaults" in str(label.render())
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, AskScreen))
        app.screen.query_one("#ask-answer", Input).value = "0 1"
        await pilot.press("enter")
        await wait_for(pilot, lambda: "this chat's" in str(label.render()))
        app.query_one("#chat-input", Input).focus()
        await pilot.press(*"yo", "enter")
        await wait_for(pilot, lambda: len(seen) == 2 and not pane.workers)
        assert seen[1] == (0.0, 1.0)  # greedy, chosen for this conversation
        await pilot.press("ctrl+n")  # a new chat starts from the model's defaults again
        await wait_for(pilot, lambda: "the model's defaults" in str(label.render()))
