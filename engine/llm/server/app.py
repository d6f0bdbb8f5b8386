"""The OpenAI-compatible HTTP API over local adapters (FastAPI).

Requests for one model take turns in arrival order (the adapter generates one reply at a
time); a client that disconnects cancels its generation, streamed or not. Prompts are
tokenised off the event loop, so one huge request never stalls the others; every request
first passes :class:`engine.llm.server.guard.RequestGuard` (Host, body size, body time).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterable, Mapping
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from engine import __version__
from engine.errors import InputError, MindsetError, one_line
from engine.llm.limits import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES
from engine.llm.local import ContextLengthError, LocalAdapter
from engine.llm.secrets import register_secret
from engine.llm.server.errors import APIError, from_input_error, install_error_handlers
from engine.llm.server.guard import RequestGuard
from engine.llm.server.schemas import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessageOut,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionRequest,
    ErrorResponse,
    MemoryOut,
    ModelList,
    ModelOut,
    TextCompletion,
    UsageOut,
)
from engine.llm.types import ChatMessage, SamplingParams, StreamChunk, TokenLogprob, Usage

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 413, 500)
}


def create_app(adapters: Mapping[str, LocalAdapter], *, api_key: str | None = None,
               allowed_hosts: Iterable[str] = (),
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> FastAPI:
    """The API serving ``adapters`` by model id.

    With ``api_key``, every route but /health needs it (the docs and schema too); without
    one, only requests whose Host is this server's address or one of ``allowed_hosts`` are
    answered (see :mod:`engine.llm.server.guard`).
    """
    if not adapters:
        raise InputError("the server needs at least one model")
    if max_body_bytes < 1 or not body_timeout_s > 0:
        raise InputError("the body limit and the body timeout must be positive")
    register_secret(api_key)
    created = int(time.time())
    # The stock docs routes cannot take a dependency: they are added below, behind the key.
    app = FastAPI(title="Mindset OpenAI-compatible API", version=__version__,
                  description="Local models behind the OpenAI API: /v1/models, "
                  "/v1/chat/completions and /v1/completions.",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, check_host=api_key is None,  # type: ignore[arg-type]
                       allowed_hosts=tuple(allowed_hosts), max_body_bytes=max_body_bytes,
                       body_timeout_s=body_timeout_s)
    bearer = HTTPBearer(auto_error=False, description="the key given to `mindset serve`")

    async def check_key(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
    ) -> None:
        if api_key is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def adapter_for(model: str) -> LocalAdapter:
        adapter = adapters.get(model)
        if adapter is None:
            raise APIError(404, f"the model {model!r} does not exist; served: "
                           f"{', '.join(adapters)}", param="model", code="model_not_found")
        return adapter

    install_error_handlers(app)
    auth = [Depends(check_key)]

    @app.get("/health", include_in_schema=False)
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=auth, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - docs")

    @app.get("/redoc", dependencies=auth, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    @app.get("/v1/models", dependencies=auth, response_model=ModelList,
             responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelOut(id=name, created=created) for name in adapters])

    @app.get("/v1/models/{model}", dependencies=auth, response_model=ModelOut,
             responses=ERROR_RESPONSES)
    async def get_model(model: str) -> ModelOut:
        adapter_for(model)
        return ModelOut(id=model, created=created)

    @app.post("/v1/chat/completions", dependencies=auth, response_model=ChatCompletion,
              responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        adapter = adapter_for(body.model)
        params = sampling(body, body.max_completion_tokens, adapter.sampling_defaults)
        check_labels(adapter, params)
        messages = [m.as_message() for m in body.messages]
        usage = Usage(prompt_tokens=await check_context(adapter, messages=messages))
        memory = await learn(adapter, body.learn, messages=messages)
        if body.stream:
            stream = adapter.stream_chat(messages, params)
            return sse_response(chat_events(stream, body.model, body.include_usage, usage,
                                            memory))
        reply = await until_disconnect(request, adapter.chat(messages, params))
        return ChatCompletion(
            id=f"chatcmpl-{reply.id}", created=int(time.time()), model=body.model,
            choices=[ChatChoice(message=ChatMessageOut(content=reply.text),
                                finish_reason=reply.finish_reason,
                                logprobs=ChoiceLogprobs.of(reply.logprobs))],
            usage=usage_out(reply.usage), memory=memory)

    @app.post("/v1/completions", dependencies=auth, response_model=TextCompletion,
              responses={**ERROR_RESPONSES, 200: {"content": {"text/event-stream": {}}}})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        adapter = adapter_for(body.model)
        params = sampling(body, None, adapter.sampling_defaults)
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise APIError(400, "give one prompt (a string, or a list of exactly one)",
                               param="prompt")
            prompt = body.prompt[0]
        else:
            prompt = body.prompt
        usage = Usage(prompt_tokens=await check_context(adapter, prompt=prompt))
        memory = await learn(adapter, body.learn, prompt=prompt)
        if body.stream:
            stream = adapter.stream_complete(prompt, params)
            return sse_response(completion_events(stream, body.model, body.include_usage, usage,
                                                  memory))
        reply = await until_disconnect(request, adapter.complete(prompt, params))
        return TextCompletion(
            id=f"cmpl-{reply.id}", created=int(time.time()), model=body.model,
            choices=[CompletionChoice(text=reply.text, finish_reason=reply.finish_reason)],
            usage=usage_out(reply.usage), memory=memory)

    return app


# Requests --------------------------------------------------------------------------------


def sampling(body: ChatCompletionRequest | CompletionRequest, max_tokens: int | None,
             defaults: dict[str, float | int]) -> SamplingParams:
    try:
        return body.sampling(max_tokens, defaults)
    except InputError as exc:
        raise from_input_error(exc) from None


def check_labels(adapter: LocalAdapter, params: SamplingParams) -> None:
    """Labels (the ``mindset`` field) for channels the model lacks: a 400."""
    try:
        adapter.check_labels(params)
    except InputError as exc:
        raise from_input_error(exc) from None


async def check_context(adapter: LocalAdapter, *, messages: list[ChatMessage] | None = None,
                        prompt: str | None = None) -> int:
    """The prompt's token count, counted on a worker thread (megabytes take seconds)."""
    try:
        return await asyncio.to_thread(adapter.count_prompt_tokens, messages=messages,
                                       prompt=prompt)
    except ContextLengthError as exc:
        raise APIError(400, str(exc), param="messages" if messages else "prompt",
                       code="context_length_exceeded") from None
    except InputError as exc:
        raise from_input_error(exc) from None


async def learn(adapter: LocalAdapter, asked: bool | None, *,
                messages: list[ChatMessage] | None = None,
                prompt: str | None = None) -> MemoryOut | None:
    """Reading mode, when the request or the model asks for it: the entries it added."""
    if not (adapter.learns if asked is None else asked):
        return None
    try:
        adapter.check_learn()
    except InputError as exc:
        raise APIError(400, f"{adapter.model}: {exc}", param="learn") from None
    added = await adapter.read_prompt(messages=messages, prompt=prompt)
    return MemoryOut(entries_added=added)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise APIError(499, "the client closed the request")
    finally:
        if not task.done():
            task.cancel()


def usage_out(usage: Usage) -> UsageOut:
    return UsageOut(prompt_tokens=usage.prompt_tokens,
                    completion_tokens=usage.completion_tokens,
                    total_tokens=usage.total_tokens)


# Server-sent events ----------------------------------------------------------------------


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


DONE = "data: [DONE]\n\n"


async def chat_events(stream: AsyncGenerator[StreamChunk, None], model: str, include_usage: bool,
                      usage: Usage, memory: MemoryOut | None = None) -> AsyncIterator[str]:
    head: dict[str, Any] = {"id": "", "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": model}

    def chunk(delta: dict[str, str], finish: str | None,
              tokens: list[TokenLogprob] | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if tokens:
            logprobs = ChoiceLogprobs.of(tokens)
            choice["logprobs"] = logprobs.model_dump() if logprobs is not None else None
        body: dict[str, Any] = {**head, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        if memory is not None and finish:
            body["memory"] = memory.model_dump()
        return body

    started = False
    async for event in guarded(stream, usage):
        if isinstance(event, str):
            yield event
            return
        head["id"] = f"chatcmpl-{event.id}"
        if not started:
            started = True
            yield sse(chunk({"role": "assistant", "content": ""}, None))
        if event.text:
            yield sse(chunk({"content": event.text}, None, event.logprobs))
        if event.finish_reason:
            yield sse(chunk({}, event.finish_reason, None if event.text else event.logprobs))
            if include_usage:
                yield sse({**head, "choices": [], "usage": usage_out(usage).model_dump()})
    yield DONE


async def completion_events(stream: AsyncGenerator[StreamChunk, None], model: str,
                            include_usage: bool, usage: Usage,
                            memory: MemoryOut | None = None) -> AsyncIterator[str]:
    head: dict[str, Any] = {"id": "", "object": "text_completion", "created": int(time.time()),
                            "model": model}
    async for event in guarded(stream, usage):
        if isinstance(event, str):
            yield event
            return
        head["id"] = f"cmpl-{event.id}"
        if event.text or event.finish_reason:
            body: dict[str, Any] = {**head, "choices": [
                {"index": 0, "text": event.text, "logprobs": None,
                 "finish_reason": event.finish_reason}]}
            if include_usage:
                body["usage"] = None
            if memory is not None and event.finish_reason:
                body["memory"] = memory.model_dump()
            yield sse(body)
        if event.finish_reason and include_usage:
            yield sse({**head, "choices": [], "usage": usage_out(usage).model_dump()})
    yield DONE


async def guarded(stream: AsyncGenerator[StreamChunk, None],
                  usage: Usage) -> AsyncIterator[StreamChunk | str]:
    """The stream's chunks, then an error event if it fails; always closes the stream, which
    stops the generation when the client has gone (the response task is cancelled)."""
    try:
        async for chunk in stream:
            if chunk.usage is not None:
                usage.prompt_tokens = chunk.usage.prompt_tokens
                usage.completion_tokens = chunk.usage.completion_tokens
            yield chunk
    except InputError as exc:
        yield sse(from_input_error(exc).body())
    except MindsetError as exc:
        yield sse(APIError(500, str(exc), kind="server_error").body())
    except Exception as exc:
        yield sse(APIError(500, f"generation failed: {one_line(exc)}",
                           kind="server_error").body())
    finally:
        await stream.aclose()
