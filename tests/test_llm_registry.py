"""The adapter registry: one entry makes a new adapter buildable by spec and by config."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.errors import InputError, ModelLoadError
from engine.llm import AdapterEntry, BaseAdapter, register_adapter
from engine.llm.adapter import GenerationRequest
from engine.llm.config import LLMConfig, build_adapter, read_llm_config
from engine.llm.log import InteractionLog
from engine.llm.registry import ADAPTERS, parse_spec, specs_help
from engine.llm.types import StreamChunk


class EchoAdapter(BaseAdapter):
    """Replies with the prompt: a whole adapter in a few lines."""

    adapter_name = "echo"

    async def _stream(self, request: GenerationRequest) -> AsyncGenerator[StreamChunk, None]:
        text = request.prompt or (request.messages or [])[-1].content
        yield StreamChunk(request.id, text, "stop")


def build_echo(model: str | None, *, config: LLMConfig, log: InteractionLog | None,
               **options: Any) -> BaseAdapter:
    return EchoAdapter(model or "parrot", log=log)


@pytest.fixture
def echo_registered() -> Iterator[None]:
    saved = dict(ADAPTERS)
    register_adapter(AdapterEntry("echo", "echo:<name>: repeats the prompt", build_echo))
    yield
    ADAPTERS.clear()
    ADAPTERS.update(saved)


async def test_one_entry_makes_a_new_adapter_buildable(echo_registered: None,
                                                       tmp_path: Path) -> None:
    log = InteractionLog(tmp_path / "log.sqlite")
    adapter = build_adapter("echo:polly", config=LLMConfig(), log=log)
    assert isinstance(adapter, EchoAdapter) and adapter.model == "polly"
    reply = await adapter.complete("hello there")
    assert reply.text == "hello there"
    assert [(i.adapter, i.model) for i in log.recent()] == [("echo", "polly")]
    # The config file may name it, and a bare name takes the config's model.
    config_file = tmp_path / "config.toml"
    config_file.write_text('[llm]\nadapter = "echo"\nmodel = "kea"\n')
    config = read_llm_config(config_file)
    assert build_adapter(None, config=config, log=False).model == "kea"
    assert build_adapter("echo", config=config, log=False).model == "kea"
    assert build_adapter("echo", config=LLMConfig(), log=False).model == "parrot"
    assert "echo:<name>: repeats the prompt" in specs_help()


def test_specs_parse_as_before() -> None:
    remote = LLMConfig(adapter="openai", model="m1")
    assert parse_spec(None, remote) == ("openai", "m1")
    assert parse_spec("  ", LLMConfig()) == ("local", None)
    assert parse_spec("openai", remote) == ("openai", "m1")
    assert parse_spec("openai", LLMConfig(model="tiny-llama")) == ("openai", None)
    assert parse_spec("openai:", remote) == ("openai", "m1")
    assert parse_spec("openai:m2", remote) == ("openai", "m2")
    assert parse_spec("local:tiny-llama", remote) == ("local", "tiny-llama")
    assert parse_spec("tiny-llama", remote) == ("local", "tiny-llama")
    assert parse_spec("echo:polly", remote) == ("local", "echo:polly")  # not registered
    assert parse_spec("C:/models/x", remote) == ("local", "C:/models/x")


def test_unknown_specs_and_adapters_keep_their_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        build_adapter("nope:thing", config=LLMConfig(), log=False)
    assert str(caught.value) == (
        "unknown model 'nope:thing': not a built-in spec (default, tiny-gpt2, tiny-llama) "
        "and no such path; give one of the built-ins or a path that exists")
    config_file = tmp_path / "config.toml"
    config_file.write_text('[llm]\nadapter = "nope"\n')
    with pytest.raises(InputError) as refused:
        read_llm_config(config_file)
    assert str(refused.value) == f"{config_file}: llm.adapter is 'nope'; use one of local, openai"
    with pytest.raises(InputError, match="no remote model named"):
        build_adapter("openai", config=LLMConfig(), log=False)


def test_adapter_names_hold_no_colon() -> None:
    with pytest.raises(ValueError, match="no ':'"):
        register_adapter(AdapterEntry("a:b", "never", build_echo))
    assert "a:b" not in ADAPTERS
