"""The OpenAI-compatible adapter: OpenAI itself, or any server that speaks its API
(llama.cpp, vLLM, Ollama, ``mindset serve``), through the official ``openai`` client.

Connection errors, timeouts, 408/409/429 and 5xx responses are retried by the client with
exponential backoff (``max_retries``); whatever still fails becomes an :class:`LLMError` with
one line saying what went wrong and what to check.
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from typing import Any

from engine.errors import InputError, MindsetError
from engine.llm.adapter import BaseAdapter, GenerationRequest
from engine.llm.log import InteractionLog
from engine.llm.secrets import redact, register_secret
from engine.llm.types import StreamChunk, TokenLogprob, Usage

DEFAULT_MAX_RETRIES = 3
DEFAULT_TIMEOUT_S = 120.0


class LLMError(MindsetError):
    """A remote model could not be reached or refused the request."""


class OpenAIAdapter(BaseAdapter):
    adapter_name = "openai"

    def __init__(self, model: str, *, api_key: str | None = None, base_url: str | None = None,
                 log: InteractionLog | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        from openai import AsyncOpenAI

        super().__init__(model, log=log)
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if base_url is None:
                from engine.paths import config_path

                raise MindsetError(
                    "no OpenAI API key: set OPENAI_API_KEY, or api_key under [llm] in "
                    f"{config_path()}, or give base_url for a server that needs no key"
                )
            key = "none"  # local servers usually ignore the key, but the client needs one
        else:
            register_secret(key, "the API key (given, OPENAI_API_KEY or api_key under [llm])")
        # The key lives only inside the client; it is never an attribute of the adapter.
        self._client = AsyncOpenAI(api_key=key, base_url=base_url, max_retries=max_retries,
                                   timeout=timeout_s)
        self.base_url = str(self._client.base_url)
        self.max_retries = max_retries

    def __repr__(self) -> str:
        return f"OpenAIAdapter(model={self.model!r}, base_url={self.base_url!r})"

    def _arguments(self, request: GenerationRequest) -> dict[str, Any]:
        params = request.params
        arguments: dict[str, Any] = {
            "model": self.model,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            arguments["stop"] = params.stop
        if params.seed is not None:
            arguments["seed"] = params.seed
        if params.logprobs is not None and request.messages is not None:
            arguments["logprobs"] = True
            if params.logprobs:
                arguments["top_logprobs"] = params.logprobs
        # Not part of OpenAI's API, but understood by vLLM, llama.cpp and our server.
        extra: dict[str, Any] = {}
        if params.top_k:
            extra["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            extra["repetition_penalty"] = params.repetition_penalty
        if extra:
            arguments["extra_body"] = extra
        if request.messages is not None:
            arguments["messages"] = [m.as_dict() for m in request.messages]
        else:
            arguments["prompt"] = request.prompt
        return arguments

    async def _stream(self, request: GenerationRequest) -> AsyncGenerator[StreamChunk, None]:
        import openai

        arguments = self._arguments(request)
        endpoint = (self._client.chat.completions if request.messages is not None
                    else self._client.completions)
        try:
            stream = await endpoint.create(  # type: ignore[call-overload]
                stream=True, stream_options={"include_usage": True}, **arguments)
        except openai.APIError as exc:
            raise self._error(exc) from None
        finish: str | None = None
        usage: Usage | None = None
        try:
            async for event in stream:
                if event.usage is not None:
                    usage = Usage(event.usage.prompt_tokens, event.usage.completion_tokens)
                    request.usage = usage
                for choice in event.choices:
                    text = (choice.delta.content if request.messages is not None
                            else choice.text) or ""
                    if choice.finish_reason:
                        finish = choice.finish_reason
                    if text:
                        yield StreamChunk(request.id, text)
        except openai.APIError as exc:
            raise self._error(exc) from None
        finally:
            await stream.close()
        yield StreamChunk(request.id, "", finish or "stop", usage or request.usage)

    async def _complete(self, request: GenerationRequest) -> StreamChunk:
        import openai

        arguments = self._arguments(request)
        try:
            if request.messages is not None:
                chat = await self._client.chat.completions.create(**arguments)
                text = chat.choices[0].message.content or "" if chat.choices else ""
                finish = chat.choices[0].finish_reason if chat.choices else "stop"
                raw_usage = chat.usage
                tokens = _token_logprobs(chat.choices[0].logprobs if chat.choices else None)
            else:
                tokens = None
                completion = await self._client.completions.create(**arguments)
                text = completion.choices[0].text if completion.choices else ""
                finish = completion.choices[0].finish_reason if completion.choices else "stop"
                raw_usage = completion.usage
        except openai.APIError as exc:
            raise self._error(exc) from None
        usage = (Usage(raw_usage.prompt_tokens, raw_usage.completion_tokens)
                 if raw_usage is not None else Usage())
        if request.params.logprobs is None or request.messages is None:
            tokens = None
        return StreamChunk(request.id, text, finish or "stop", usage, tokens)

    def _error(self, exc: Exception) -> MindsetError:
        import openai

        where = self.base_url
        detail = redact(_api_message(exc))
        if isinstance(exc, openai.APITimeoutError):
            return LLMError(f"{where} did not answer in time after {self.max_retries} retries; "
                            "check the server or raise the timeout")
        if isinstance(exc, openai.APIConnectionError):
            return LLMError(f"cannot reach {where} after {self.max_retries} retries ({detail}); "
                            "check that the server is running and base_url is right")
        if isinstance(exc, openai.AuthenticationError):
            return LLMError(f"{where} rejected the API key (401); set OPENAI_API_KEY or "
                            "api_key under [llm] in the config file")
        if isinstance(exc, openai.PermissionDeniedError):
            return LLMError(f"{where} denied access (403): {detail}")
        if isinstance(exc, openai.NotFoundError):
            return LLMError(f"{where} has no model {self.model!r} (404): {detail}")
        if isinstance(exc, openai.RateLimitError):
            return LLMError(f"{where} is rate limiting (429) after {self.max_retries} retries; "
                            "wait and try again")
        if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
            return InputError(f"{where} refused the request ({exc.status_code}): {detail}")
        if isinstance(exc, openai.APIStatusError):
            return LLMError(f"{where} failed ({exc.status_code}) after {self.max_retries} "
                            f"retries: {detail}")
        return LLMError(f"{where}: {detail}")

    async def aclose(self) -> None:
        await self._client.close()


def _token_logprobs(logprobs: Any) -> list[TokenLogprob] | None:
    """OpenAI's ``choice.logprobs`` as ours; None when the server sent none."""
    content = getattr(logprobs, "content", None)
    if content is None:
        return None
    return [TokenLogprob(item.token, float(item.logprob),
                         tuple((alt.token, float(alt.logprob))
                               for alt in (item.top_logprobs or [])))
            for item in content]


def _api_message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
        if isinstance(body.get("message"), str):
            return str(body["message"])
    message = getattr(exc, "message", None) or str(exc)
    return str(message).splitlines()[0] if message else type(exc).__name__
