"""The OpenAI-compatible adapter against the real local server, and adapter specs/config."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.errors import InputError, MindsetError
from engine.llm.config import LLMConfig, build_adapter, read_llm_config
from engine.llm.local import LocalAdapter
from engine.llm.log import InteractionLog
from engine.llm.openai_adapter import LLMError, OpenAIAdapter
from engine.llm.server import BackgroundServer, create_app, free_port
from engine.llm.types import SamplingParams

SERVER_KEY = "sk-serverkey-0123456789abcdef"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    adapter = LocalAdapter.from_spec("tiny-llama")
    with BackgroundServer(create_app({"tiny-llama": adapter}, api_key=SERVER_KEY)) as server:
        yield server.base_url
    torch.set_num_threads(threads)


@pytest.fixture
def log(tmp_path: Path) -> InteractionLog:
    return InteractionLog(tmp_path / "client-log.sqlite")


def remote(base_url: str, log: InteractionLog | None = None, key: str = SERVER_KEY,
           **options: object) -> OpenAIAdapter:
    return OpenAIAdapter("tiny-llama", api_key=key, base_url=base_url, log=log,
                         **options)  # type: ignore[arg-type]


async def test_chat_stream_and_complete_through_the_adapter(base_url: str,
                                                            log: InteractionLog) -> None:
    adapter = remote(base_url, log)
    params = SamplingParams(max_tokens=8, temperature=0)
    reply = await adapter.chat(HELLO, params)
    chunks = [c async for c in adapter.stream_chat(HELLO, params)]
    completion = await adapter.complete("Hello", params)
    await adapter.aclose()
    assert reply.text == "\n" * 8 and reply.usage.completion_tokens == 8
    assert "".join(c.text for c in chunks) == reply.text
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert completion.text.startswith("ooo")
    assert [e.kind for e in log.recent()] == ["completion", "chat", "chat"]
    assert {e.adapter for e in log.recent()} == {"openai"}


async def test_branches_share_a_conversation(base_url: str, log: InteractionLog) -> None:
    adapter = remote(base_url, log)
    params = SamplingParams(max_tokens=2, temperature=0)
    root = await adapter.chat(HELLO, params)
    turn = [*HELLO, {"role": "assistant", "content": root.text}]
    left = await adapter.chat([*turn, {"role": "user", "content": "left"}], params,
                              parent_id=root.id)
    right_chunks = [c async for c in adapter.stream_chat(
        [*turn, {"role": "user", "content": "right"}], params, parent_id=root.id)]
    await adapter.aclose()
    conversation = log.conversation(root.id)
    assert [e.id for e in conversation] == [root.id, left.id, right_chunks[0].id]
    assert [e.parent_id for e in conversation] == [None, root.id, root.id]
    assert left.conversation_id == root.id


async def test_wrong_key_is_a_clear_error(base_url: str, log: InteractionLog) -> None:
    adapter = remote(base_url, log, key="sk-wrongkey-abcdefabcdef12345")
    with pytest.raises(LLMError, match="rejected the API key") as caught:
        await adapter.chat(HELLO)
    await adapter.aclose()
    assert "wrongkey" not in str(caught.value)
    [entry] = log.recent()
    assert entry.finish_reason == "error" and entry.error and "401" in entry.error


async def test_unreachable_server_is_a_clear_error_after_retries(log: InteractionLog) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    adapter = remote(url, log, max_retries=1)
    with pytest.raises(LLMError, match=r"cannot reach .* after 1 retries"):
        await adapter.chat(HELLO)
    with pytest.raises(LLMError, match="cannot reach"):
        async for _ in adapter.stream_complete("Hello"):
            pass
    await adapter.aclose()


async def test_unknown_model_and_bad_request_errors(base_url: str) -> None:
    adapter = OpenAIAdapter("nope", api_key=SERVER_KEY, base_url=base_url)
    with pytest.raises(LLMError, match="no model 'nope'"):
        await adapter.chat(HELLO)
    too_long = remote(base_url)
    with pytest.raises(InputError, match="context"):
        await too_long.complete("x" * 3000)
    await adapter.aclose()
    await too_long.aclose()


async def test_keys_never_reach_the_log(base_url: str, log: InteractionLog) -> None:
    adapter = remote(base_url, log)
    # Even a key pasted into a message is masked before it is stored.
    await adapter.chat([{"role": "user", "content": f"my key is {SERVER_KEY}"}],
                       SamplingParams(max_tokens=2))
    await adapter.aclose()
    assert "my key is [redacted]" in log.recent()[0].messages[0]["content"]  # type: ignore[index]
    assert "OpenAIAdapter(model='tiny-llama'" in repr(adapter)
    assert SERVER_KEY not in repr(adapter) and SERVER_KEY not in str(vars(adapter))
    for path in log.path.parent.iterdir():
        assert SERVER_KEY.encode() not in path.read_bytes()


def test_config_file_and_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "config.toml"
    assert read_llm_config(config_file) == LLMConfig()
    config_file.write_text('[llm]\nadapter = "openai"\nmodel = "m1"\n'
                           'base_url = "http://127.0.0.1:9/v1"\napi_key = "sk-fromconfig-123456"\n')
    config = read_llm_config(config_file)
    assert (config.adapter, config.model, config.base_url) == ("openai", "m1",
                                                               "http://127.0.0.1:9/v1")
    assert "fromconfig" not in repr(config)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    adapter = build_adapter(None, config=config, log=False)
    assert isinstance(adapter, OpenAIAdapter) and adapter.model == "m1"
    assert adapter.base_url.startswith("http://127.0.0.1:9/v1")
    assert build_adapter("openai:m2", config=config, log=False).model == "m2"
    local = build_adapter("tiny-llama", config=config, log=False)
    assert isinstance(local, LocalAdapter) and local.model == "tiny-llama"
    config_file.write_text("[llm]\nadapter = 3\n")
    with pytest.raises(InputError, match="must be a string"):
        read_llm_config(config_file)
    config_file.write_text("[llm\n")
    with pytest.raises(InputError, match="not valid TOML"):
        read_llm_config(config_file)


def test_openai_without_a_key_says_where_to_put_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(MindsetError, match="OPENAI_API_KEY"):
        build_adapter("openai:gpt-4o-mini", config=LLMConfig(), log=False)
