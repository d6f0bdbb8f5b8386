"""The real server on 127.0.0.1, driven by the real ``openai`` client, with tiny models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from engine.llm.local import LocalAdapter
from engine.llm.log import InteractionLog
from engine.llm.server import BackgroundServer, create_app
from engine.model.loading import LoadedModel
from engine.model.tiny import byte_level_tokenizer, tiny_model

API_KEY = "test-server-key-4f9c2a7e"
MODEL = "tiny-llama"
SHORT = "tiny-short"  # 64-token context: fast generations for property-based tests
HELLO = [{"role": "user", "content": "hi"}]


@dataclass
class Served:
    server: BackgroundServer
    adapter: LocalAdapter
    log: InteractionLog

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def client(self, key: str = API_KEY, **options: object) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0,
                                  **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread beats two contended cores
    log = InteractionLog(tmp_path_factory.mktemp("server") / "log.sqlite")
    adapter = LocalAdapter.from_spec(MODEL, log=log)
    short = LocalAdapter(LoadedModel(tiny_model("llama", max_position_embeddings=64),
                                     byte_level_tokenizer(), SHORT, "llama"), log=log)
    app = create_app({MODEL: adapter, SHORT: short}, api_key=API_KEY)
    with BackgroundServer(app) as server:
        yield Served(server, adapter, log)
    torch.set_num_threads(threads)


async def test_lists_models(served: Served) -> None:
    async with served.client() as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL, SHORT]
        assert (await client.models.retrieve(MODEL)).id == MODEL


async def test_chat_without_streaming(served: Served) -> None:
    async with served.client() as client:
        reply = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == "\n" * 6
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 6
    assert reply.usage.prompt_tokens == 21
    [entry] = served.log.search("hi", 50)[:1]
    assert entry.messages == HELLO and entry.response == "\n" * 6


async def test_left_out_sampling_is_the_model_default(served: Served) -> None:
    from engine.llm.defaults import SMALL_MODEL_DEFAULTS

    async with served.client() as client:
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "defaults left"}],
            max_tokens=2)
        await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "defaults chosen"}],
            max_tokens=2, top_p=0.5)
    [defaulted] = served.log.search("defaults left", 5)
    [chosen] = served.log.search("defaults chosen", 5)
    assert defaulted.params["temperature"] == SMALL_MODEL_DEFAULTS["temperature"]
    assert defaulted.params["top_p"] == SMALL_MODEL_DEFAULTS["top_p"]
    assert chosen.params["top_p"] == 0.5  # a given value wins
    assert chosen.params["temperature"] == SMALL_MODEL_DEFAULTS["temperature"]


async def test_chat_streaming_matches_the_whole_reply_and_reports_usage(served: Served) -> None:
    arguments: dict[str, Any] = dict(model=MODEL, messages=HELLO, max_tokens=20,
                                     temperature=0.9, seed=5)
    async with served.client() as client:
        whole = await client.chat.completions.create(**arguments)
        stream = await client.chat.completions.create(
            **arguments, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20


async def test_stream_ends_with_done(served: Served) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "stream": True}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        response = await http.post(f"{served.base_url}/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.splitlines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in events)


async def test_completions_with_and_without_streaming(served: Served) -> None:
    async with served.client() as client:
        whole = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=10,
                                                temperature=0)
        stream = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=10,
                                                 temperature=0, stream=True)
        pieces = [c.choices[0].text async for c in stream if c.choices]
    assert whole.choices[0].text == "".join(pieces)
    assert whole.choices[0].text.startswith("ooo")
    assert whole.usage is not None and whole.usage.completion_tokens == 10


async def test_stop_strings_through_the_api(served: Served) -> None:
    async with served.client() as client:
        reply = await client.completions.create(model=MODEL, prompt="Hello", max_tokens=10,
                                                temperature=0, stop="oo")
    assert reply.choices[0].text == ""
    assert reply.choices[0].finish_reason == "stop"


async def test_wrong_or_missing_key_gets_401(served: Served) -> None:
    async with served.client(key="not-the-key") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.models.list()
    assert caught.value.status_code == 401
    assert "not-the-key" not in str(caught.value)
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{served.base_url}/models")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


async def test_unknown_model_is_404(served: Served) -> None:
    async with served.client() as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="gpt-9", messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


async def test_too_long_prompt_is_400_context_length(served: Served) -> None:
    async with served.client() as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model=MODEL, prompt="x" * 2000, max_tokens=5)
    assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    assert "1024" in caught.value.body["message"]  # type: ignore[index]


@pytest.mark.parametrize(("body", "param"), [
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": HELLO, "temperature": 5}, "temperature"),
    ({"model": MODEL, "messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": HELLO, "n": 3}, "n"),
    ({"model": MODEL, "messages": HELLO, "stop": ["", "x"]}, "stop"),
    ({"messages": HELLO}, "model"),
    ({"model": MODEL, "messages": HELLO, "temperature": 1e-45}, "temperature"),
    ({"model": MODEL, "messages": HELLO, "temperature": -0.5}, "temperature"),
    ({"model": MODEL, "messages": HELLO, "repetition_penalty": 1e-40}, "repetition_penalty"),
    ({"model": MODEL, "messages": HELLO, "repetition_penalty": 0}, "repetition_penalty"),
    ({"model": MODEL, "messages": HELLO, "top_p": 0}, "top_p"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
])
async def test_invalid_bodies_get_400_error_objects(served: Served, body: dict[str, object],
                                                    param: str | None) -> None:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        response = await http.post(f"{served.base_url}/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param


async def test_malformed_json_gets_400(served: Served) -> None:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}",
                                          "Content-Type": "application/json"}) as http:
        response = await http.post(f"{served.base_url}/chat/completions", content=b"{not json")
        wrong_type = await http.post(f"{served.base_url}/completions", content=b"[1, 2]")
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]
    assert wrong_type.status_code == 400


async def test_disconnect_mid_stream_stops_generation(served: Served) -> None:
    adapter = served.adapter
    before = adapter.tokens_generated
    async with served.client() as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "disconnect me"}],
            max_tokens=1000, temperature=0, stream=True)  # type: ignore[arg-type]
        received = 0
        async for _ in stream:
            received += 1
            if received == 5:
                break
        await stream.close()
    deadline = time.monotonic() + 20
    while adapter.active and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    settled = adapter.tokens_generated
    await asyncio.sleep(0.3)
    assert not adapter.active
    assert adapter.tokens_generated == settled  # nothing is generating any more
    assert settled - before < 500  # stopped early, far from the 1000 asked for
    [entry] = served.log.search("disconnect", 5)
    assert entry.finish_reason == "cancelled"
    assert entry.completion_tokens < 500


async def test_disconnect_without_streaming_stops_generation(served: Served) -> None:
    adapter = served.adapter
    before = adapter.tokens_generated
    body = {"model": MODEL, "messages": [{"role": "user", "content": "give up waiting"}],
            "max_tokens": 1000, "temperature": 0}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{served.base_url}/chat/completions", json=body, timeout=0.5)
    deadline = time.monotonic() + 20
    while (adapter.active or not served.log.search("waiting", 5)) \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not adapter.active
    assert adapter.tokens_generated - before < 500
    [entry] = served.log.search("waiting", 5)
    assert entry.finish_reason == "cancelled"


async def test_concurrent_streams_all_complete_in_turn(served: Served) -> None:
    arguments: dict[str, Any] = dict(model=MODEL, messages=HELLO, max_tokens=15,
                                     temperature=0.8, seed=11)

    async def one(client: openai.AsyncOpenAI) -> str:
        stream = await client.chat.completions.create(**arguments, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async with served.client() as client:
        expected = await one(client)
        results = await asyncio.gather(*(one(client) for _ in range(4)))
    assert results == [expected] * 4


async def test_openapi_schema_describes_the_api(served: Served) -> None:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        schema = (await http.get(f"{served.root}/openapi.json")).json()
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions"} <= set(schema["paths"])
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "413"} <= set(chat["responses"])


def test_server_log_never_holds_the_key(served: Served) -> None:
    assert served.log.count() > 0
    for path in Path(served.log.path).parent.iterdir():
        assert API_KEY.encode() not in path.read_bytes()
