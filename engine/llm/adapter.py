"""The one async interface to any model, and the logging every adapter shares.

An adapter answers chats and plain text completions, whole or streamed. Streams are async
iterators of :class:`StreamChunk`; leaving the ``async for`` early (``break``), closing the
iterator, or cancelling the task that reads it stops the generation. Every call, finished,
failed or cancelled, is written to the :class:`InteractionLog` when the adapter has one.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from engine.llm.log import Interaction, InteractionLog
from engine.llm.types import (
    ChatMessage,
    Completion,
    MessageLike,
    SamplingParams,
    StreamChunk,
    TokenLogprob,
    Usage,
    as_messages,
    check_text,
    new_id,
)


@runtime_checkable
class LLMAdapter(Protocol):
    """What the workbench, the agent and the server rely on."""

    adapter_name: str
    model: str

    async def chat(self, messages: Iterable[MessageLike], params: SamplingParams | None = None,
                   *, conversation_id: str | None = None,
                   parent_id: str | None = None) -> Completion: ...

    def stream_chat(self, messages: Iterable[MessageLike],
                    params: SamplingParams | None = None, *,
                    conversation_id: str | None = None,
                    parent_id: str | None = None) -> AsyncGenerator[StreamChunk, None]: ...

    async def complete(self, prompt: str, params: SamplingParams | None = None, *,
                       conversation_id: str | None = None,
                       parent_id: str | None = None) -> Completion: ...

    def stream_complete(self, prompt: str, params: SamplingParams | None = None, *,
                        conversation_id: str | None = None,
                        parent_id: str | None = None) -> AsyncGenerator[StreamChunk, None]: ...

    async def aclose(self) -> None: ...


@dataclass
class GenerationRequest:
    """What a concrete adapter is asked to generate. ``usage`` is kept up to date as it goes,
    so that a cancelled call is still logged with the tokens it spent."""

    id: str
    kind: str  # "chat" or "completion"
    params: SamplingParams
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    usage: Usage = field(default_factory=Usage)


class BaseAdapter(ABC):
    """Implements :class:`LLMAdapter` on top of one method, :meth:`_stream`."""

    adapter_name: ClassVar[str] = "base"

    def __init__(self, model: str, *, log: InteractionLog | None = None) -> None:
        self.model = model
        self.log = log

    @abstractmethod
    def _stream(self, request: GenerationRequest) -> AsyncGenerator[StreamChunk, None]:
        """Yield text pieces; the last chunk carries ``finish_reason`` (and ``usage``)."""

    async def _complete(self, request: GenerationRequest) -> StreamChunk:
        """A whole reply as one chunk. Adapters with a cheaper non-streaming path override it."""
        pieces: list[str] = []
        tokens: list[TokenLogprob] | None = None
        last = StreamChunk(request.id, "")
        async for chunk in self._stream(request):
            pieces.append(chunk.text)
            if chunk.logprobs is not None:
                tokens = (tokens or []) + chunk.logprobs
            last = chunk
        return StreamChunk(request.id, "".join(pieces), last.finish_reason or "stop",
                           last.usage or request.usage, tokens)

    # The public interface ------------------------------------------------------------------

    def stream_chat(self, messages: Iterable[MessageLike], params: SamplingParams | None = None,
                    *, conversation_id: str | None = None,
                    parent_id: str | None = None) -> AsyncGenerator[StreamChunk, None]:
        request = self._request("chat", params, messages=as_messages(messages))
        return self._logged_stream(request, conversation_id, parent_id)

    def stream_complete(self, prompt: str, params: SamplingParams | None = None, *,
                        conversation_id: str | None = None,
                        parent_id: str | None = None) -> AsyncGenerator[StreamChunk, None]:
        request = self._request("completion", params, prompt=_check_prompt(prompt))
        return self._logged_stream(request, conversation_id, parent_id)

    async def chat(self, messages: Iterable[MessageLike], params: SamplingParams | None = None,
                   *, conversation_id: str | None = None,
                   parent_id: str | None = None) -> Completion:
        request = self._request("chat", params, messages=as_messages(messages))
        return await self._logged_complete(request, conversation_id, parent_id)

    async def complete(self, prompt: str, params: SamplingParams | None = None, *,
                       conversation_id: str | None = None,
                       parent_id: str | None = None) -> Completion:
        request = self._request("completion", params, prompt=_check_prompt(prompt))
        return await self._logged_complete(request, conversation_id, parent_id)

    async def aclose(self) -> None:  # noqa: B027 (optional hook, not abstract)
        """Release clients and threads. The base adapter holds none."""

    # Logging -------------------------------------------------------------------------------

    def _request(self, kind: str, params: SamplingParams | None, *,
                 messages: list[ChatMessage] | None = None,
                 prompt: str | None = None) -> GenerationRequest:
        params = (params or SamplingParams()).validate()
        return GenerationRequest(new_id(), kind, params, messages=messages, prompt=prompt)

    def _conversation(self, request: GenerationRequest, conversation_id: str | None,
                      parent_id: str | None) -> str:
        if conversation_id:
            return conversation_id
        if parent_id and self.log is not None:
            found = self.log.conversation_of(parent_id)
            if found:
                return found
        return request.id

    async def _logged_stream(self, request: GenerationRequest, conversation_id: str | None,
                             parent_id: str | None) -> AsyncGenerator[StreamChunk, None]:
        conversation = self._conversation(request, conversation_id, parent_id)
        started = time.perf_counter()
        first_token: float | None = None
        pieces: list[str] = []
        finish: str | None = "cancelled"
        error: str | None = None
        inner = self._stream(request)
        try:
            async for chunk in inner:
                if chunk.text and first_token is None:
                    first_token = time.perf_counter() - started
                pieces.append(chunk.text)
                if chunk.finish_reason:
                    finish = chunk.finish_reason
                if chunk.usage is not None:
                    request.usage = chunk.usage
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            finish = "cancelled"
            raise
        except Exception as exc:
            finish, error = "error", str(exc) or type(exc).__name__
            raise
        finally:
            await inner.aclose()  # stops the generation when the reader leaves early
            self._write_log(request, conversation, parent_id, "".join(pieces), finish, error,
                            time.perf_counter() - started, first_token)

    async def _logged_complete(self, request: GenerationRequest, conversation_id: str | None,
                               parent_id: str | None) -> Completion:
        conversation = self._conversation(request, conversation_id, parent_id)
        started = time.perf_counter()
        text, finish, error = "", "cancelled", None
        tokens: list[TokenLogprob] | None = None
        try:
            chunk = await self._complete(request)
            text, finish, tokens = chunk.text, chunk.finish_reason or "stop", chunk.logprobs
            if chunk.usage is not None:
                request.usage = chunk.usage
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            finish, error = "error", str(exc) or type(exc).__name__
            raise
        finally:
            latency = time.perf_counter() - started
            self._write_log(request, conversation, parent_id, text, finish, error, latency, None)
        return Completion(request.id, self.model, text, finish, request.usage, latency,
                          conversation, tokens)

    def _write_log(self, request: GenerationRequest, conversation_id: str,
                   parent_id: str | None, response: str, finish: str | None,
                   error: str | None, latency: float, ttft: float | None) -> None:
        if self.log is None:
            return
        self.log.record(Interaction(
            id=request.id,
            conversation_id=conversation_id,
            parent_id=parent_id,
            adapter=self.adapter_name,
            model=self.model,
            kind=request.kind,
            messages=None if request.messages is None
            else [m.as_dict() for m in request.messages],
            prompt=request.prompt,
            params=self._logged_params(request.params),
            response=response,
            finish_reason=finish,
            prompt_tokens=request.usage.prompt_tokens,
            completion_tokens=request.usage.completion_tokens,
            latency_s=latency,
            ttft_s=ttft,
            error=error,
        ))

    def _logged_params(self, params: SamplingParams) -> dict[str, Any]:
        return params.as_dict()


def _check_prompt(prompt: str) -> str:
    from engine.errors import InputError

    if not isinstance(prompt, str):
        raise InputError("the prompt must be a string")
    return check_text(prompt, "the prompt", param="prompt")
