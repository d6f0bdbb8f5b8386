"""Hostile and broken requests against the real server on 127.0.0.1 (tiny models).

Each case gets a 4xx with an OpenAI-style error object, never a 500, a stall or a held
connection: absurd sampling values, lone surrogates, oversized and unfinished bodies, a huge
prompt while others are served, a foreign Host header without a key, the docs without the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import torch

from engine.llm.adapter import GenerationRequest
from engine.llm.local import LocalAdapter
from engine.llm.log import InteractionLog
from engine.llm.server import BackgroundServer, create_app
from engine.model.loading import LoadedModel
from engine.model.tiny import byte_level_tokenizer, tiny_model

MODEL = "tiny-llama"
HELLO = [{"role": "user", "content": "hi"}]
MAX_BODY = 6 * 1024 * 1024  # above the 5 MB prompt below, so that it reaches the tokenizer
BODY_TIMEOUT_S = 2.0
SOCKET_TIMEOUT_S = 60.0  # only a server that never answers gets near this
PROMPT_ANSWER_S = 20.0  # well under SOCKET_TIMEOUT_S: a stalled loop fails, not races
ALLOWED = "mindset.test"
KEY = "abuse-test-key-0123456789"


@dataclass
class Served:
    server: BackgroundServer
    adapter: LocalAdapter

    @property
    def root(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"


def tiny_adapter(log: InteractionLog) -> LocalAdapter:
    loaded = LoadedModel(tiny_model("llama", max_position_embeddings=64),
                         byte_level_tokenizer(), "tiny", "llama")
    return LocalAdapter(loaded, name=MODEL, log=log)


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """No key: the Host check is on."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    log = InteractionLog(tmp_path_factory.mktemp("abuse") / "log.sqlite")
    adapter = LocalAdapter.from_spec(MODEL, log=log)
    app = create_app({MODEL: adapter}, allowed_hosts=[ALLOWED], max_body_bytes=MAX_BODY,
                     body_timeout_s=BODY_TIMEOUT_S)
    with BackgroundServer(app) as server:
        yield Served(server, adapter)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = InteractionLog(tmp_path_factory.mktemp("abuse-keyed") / "log.sqlite")
    adapter = tiny_adapter(log)
    with BackgroundServer(create_app({MODEL: adapter}, api_key=KEY)) as server:
        yield Served(server, adapter)


def assert_error(response: httpx.Response, status: int, *, param: str | None = None,
                 code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "server_error")
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return dict(error)


def post_raw(served: Served, path: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{served.root}{path}", content=body, timeout=SOCKET_TIMEOUT_S,
                      headers={"Content-Type": "application/json"})


def raw_exchange(served: Served, head: bytes, body: bytes = b"") -> tuple[bytes, bool]:
    """Send bytes on a bare socket; return what came back and whether the server closed."""
    with socket.create_connection((served.server.host, served.server.port),
                                  timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(head + body)
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return received, True
            received += data


def parse_raw(received: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


# Sampling values that used to divide logits into infinities --------------------------------


@pytest.mark.parametrize(("path", "field", "value"), [
    ("/v1/chat/completions", "temperature", 1e-45),
    ("/v1/completions", "temperature", 1e-45),
    ("/v1/chat/completions", "repetition_penalty", 1e-40),
    ("/v1/completions", "repetition_penalty", 1e-40),
])
def test_tiny_sampling_values_are_400_naming_the_param(open_server: Served, path: str,
                                                       field: str, value: float) -> None:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 3, field: value}
    body.update({"messages": HELLO} if "chat" in path else {"prompt": "Hello"})
    response = httpx.post(f"{open_server.root}{path}", json=body, timeout=SOCKET_TIMEOUT_S)
    error = assert_error(response, 400, param=field)
    assert field in error["message"]


@pytest.mark.parametrize(("path", "raw", "param"), [
    ("/v1/chat/completions",
     rb'{"model": "tiny-llama", "messages": [{"role": "user", "content": "a\ud800b"}]}',
     "messages.0.content"),
    ("/v1/chat/completions", rb'{"model": "tiny-llama", "messages": [{"role": "user", '
     rb'"content": [{"type": "text", "text": "\udfff"}]}]}', "messages.0.content.0.text"),
    ("/v1/completions", rb'{"model": "tiny-llama", "prompt": "a\ud800b"}', "prompt"),
    ("/v1/completions", rb'{"model": "tiny-llama", "prompt": "x", "stop": "\ud800"}', "stop"),
    ("/v1/completions", rb'{"model": "tiny\ud800", "prompt": "x"}', "model"),
])
def test_lone_surrogates_are_400(open_server: Served, path: str, raw: bytes,
                                 param: str) -> None:
    error = assert_error(post_raw(open_server, path, raw), 400, param=param)
    # Ours names the character; pydantic's own check (on constrained fields) says "unicode".
    assert any(word in error["message"] for word in ("U+D800", "U+DFFF", "unicode"))


@pytest.mark.parametrize("raw", [
    b'{"model": "tiny-llama", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
    b'{"model": "tiny-llama", "prompt": "x", "temperature": NaN}',
    b'{"model": "tiny-llama", "prompt": "x", "top_p": Infinity}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"model": "tiny-llama", "prompt": "x", "seed": 1e400}',
], ids=["5000-digit-int", "nan", "infinity", "deep-nesting", "huge-float-seed"])
def test_malformed_numbers_and_nesting_are_400(open_server: Served, raw: bytes) -> None:
    assert_error(post_raw(open_server, "/v1/completions", raw), 400)


# Bodies: too large, unfinished ---------------------------------------------------------------


def test_oversized_body_is_413(open_server: Served) -> None:
    body = json.dumps({"model": MODEL, "prompt": "x" * (MAX_BODY + 10)}).encode()
    assert_error(post_raw(open_server, "/v1/completions", body), 413, code="request_too_large")


def test_oversized_content_length_is_413_without_reading_the_body(open_server: Served) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (open_server.server.port, 10**9))
    received, closed = raw_exchange(open_server, head)  # not one byte of the body is sent
    status, body = parse_raw(received)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    assert closed


def test_chunked_body_over_the_limit_is_413(open_server: Served) -> None:
    chunk = b"x" * (1024 * 1024)
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(7)) + b"0\r\n\r\n"
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            % open_server.server.port)
    with socket.create_connection((open_server.server.host, open_server.server.port),
                                  timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):  # it may answer and close before taking it all
            sock.sendall(body)
        received = b""
        while data := sock.recv(65536):
            received += data
    status, error = parse_raw(received)
    assert status == 413 and error["error"]["code"] == "request_too_large"


async def test_unfinished_body_times_out_and_others_are_served(open_server: Served) -> None:
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
            % open_server.server.port)
    stuck = asyncio.create_task(asyncio.to_thread(raw_exchange, open_server, head, b'{"mod'))
    async with httpx.AsyncClient(base_url=open_server.root, timeout=SOCKET_TIMEOUT_S) as http:
        # While that connection waits for its body, other clients get answers.
        assert (await http.get("/health")).json() == {"status": "ok"}
        reply = await http.post("/v1/chat/completions", json={
            "model": MODEL, "messages": HELLO, "max_tokens": 3, "temperature": 0})
        # Served in full: the random tiny model's three tokens may decode to no text at all.
        assert reply.status_code == 200
        assert reply.json()["usage"]["completion_tokens"] >= 1
        assert not stuck.done()  # it is still waiting (the timeout is seconds away)
    received, closed = await stuck
    status, body = parse_raw(received)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert closed  # the connection was freed, not held


# A huge prompt is tokenised off the event loop ---------------------------------------------


async def test_huge_prompt_is_tokenised_off_the_loop_while_another_client_streams(
        open_server: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = open_server.adapter
    original: Callable[[GenerationRequest], list[int]] = adapter.encode
    started, release = threading.Event(), threading.Event()
    threads: list[str] = []

    def encode(request: GenerationRequest) -> list[int]:
        content = request.messages[-1].content if request.messages else ""
        if len(content) > 1_000_000:
            threads.append(threading.current_thread().name)
            started.set()
            # Holds the tokenisation until the other clients are served: were it on the event
            # loop, they could not be, and this would wait out its bound.
            release.wait(SOCKET_TIMEOUT_S)
        return original(request)

    monkeypatch.setattr(adapter, "encode", encode)
    huge = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 5_000_000}],
            "max_tokens": 3}
    streamed = {"model": MODEL, "messages": HELLO, "max_tokens": 40, "stream": True}
    async with httpx.AsyncClient(base_url=open_server.root, timeout=SOCKET_TIMEOUT_S) as http:
        async with http.stream("POST", "/v1/chat/completions", json=streamed) as stream:
            lines = stream.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            big = asyncio.create_task(http.post("/v1/chat/completions", json=huge))
            assert await asyncio.to_thread(started.wait, SOCKET_TIMEOUT_S)
            health = await http.get("/health", timeout=PROMPT_ANSWER_S)
            rest = [line async for line in lines if line]
        release.set()
        response = await big
    assert health.json() == {"status": "ok"}
    assert rest[-1] == "data: [DONE]"
    assert threads and threads[0] != open_server.server.thread.name
    assert_error(response, 400, param="messages", code="context_length_exceeded")


# Host checks without a key; the docs behind the key --------------------------------------------


@pytest.mark.parametrize("host", [
    "evil.example", "evil.example:{port}", "127.0.0.1:{other}", "localhost:{other}",
    "127.0.0.1.evil.example:{port}", "[::1", "",
])
def test_a_foreign_host_without_a_key_is_refused(open_server: Served, host: str) -> None:
    port = open_server.server.port
    headers = {"Host": host.format(port=port, other=port + 1)}
    for response in (
        httpx.get(f"{open_server.root}/v1/models", headers=headers),
        httpx.post(f"{open_server.root}/v1/chat/completions", headers=headers,
                   json={"model": MODEL, "messages": HELLO, "max_tokens": 2}),
    ):
        assert_error(response, 400, code="invalid_host")


@pytest.mark.parametrize("host", [
    "127.0.0.1:{port}", "localhost:{port}", "LOCALHOST.:{port}", "[::1]:{port}", ALLOWED,
    f"{ALLOWED}:8443",
])
def test_this_servers_own_names_are_answered(open_server: Served, host: str) -> None:
    response = httpx.get(f"{open_server.root}/v1/models",
                         headers={"Host": host.format(port=open_server.server.port)})
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [MODEL]


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/v1/models"])
def test_docs_and_schema_need_the_key_when_one_is_set(keyed_server: Served, path: str) -> None:
    url = f"{keyed_server.root}{path}"
    assert_error(httpx.get(url), 401, code="invalid_api_key")
    assert_error(httpx.get(url, headers={"Authorization": "Bearer wrong-key-but-long-1234"}),
                 401, code="invalid_api_key")
    allowed = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"})
    assert allowed.status_code == 200
    if path == "/openapi.json":
        assert "/v1/chat/completions" in allowed.json()["paths"]


def test_with_a_key_the_host_is_not_checked(keyed_server: Served) -> None:
    # The key is what keeps a rebinding page out; a proxy's name must still work.
    response = httpx.get(f"{keyed_server.root}/v1/models",
                         headers={"Authorization": f"Bearer {KEY}", "Host": "proxy.example"})
    assert response.status_code == 200


def test_docs_are_open_without_a_key_on_this_servers_address(open_server: Served) -> None:
    assert httpx.get(f"{open_server.root}/docs").status_code == 200
    schema = httpx.get(f"{open_server.root}/openapi.json").json()
    assert "413" in schema["paths"]["/v1/completions"]["post"]["responses"]
