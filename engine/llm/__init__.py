"""LLM adapters, the interaction log and the local OpenAI-compatible server.

One async interface (:class:`LLMAdapter`) to any model::

    adapter = build_adapter("tiny-llama")          # or "default", "openai:gpt-4o-mini", ...
    reply = await adapter.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64))
    async for chunk in adapter.stream_chat(messages, params, parent_id=reply.id):
        print(chunk.text, end="")

Adapters are listed, by spec prefix, in :mod:`engine.llm.registry`.
Every call is logged to SQLite (:class:`InteractionLog`) with its conversation and parent ids.
Heavy libraries (torch, transformers, openai, fastapi) load only when an adapter is built, and
the names below load on first use: the CLI reads small modules (``limits``, ``registry``)
while it builds its parser, before the workbench's first frame.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.llm.adapter import BaseAdapter, LLMAdapter
    from engine.llm.config import LLMConfig, build_adapter, read_llm_config
    from engine.llm.log import Interaction, InteractionLog
    from engine.llm.registry import AdapterEntry, register_adapter
    from engine.llm.types import ChatMessage, Completion, SamplingParams, StreamChunk, Usage

_HOMES = {
    "AdapterEntry": "engine.llm.registry",
    "BaseAdapter": "engine.llm.adapter",
    "ChatMessage": "engine.llm.types",
    "Completion": "engine.llm.types",
    "Interaction": "engine.llm.log",
    "InteractionLog": "engine.llm.log",
    "LLMAdapter": "engine.llm.adapter",
    "LLMConfig": "engine.llm.config",
    "SamplingParams": "engine.llm.types",
    "StreamChunk": "engine.llm.types",
    "Usage": "engine.llm.types",
    "build_adapter": "engine.llm.config",
    "read_llm_config": "engine.llm.config",
    "register_adapter": "engine.llm.registry",
}

__all__ = [
    "AdapterEntry",
    "BaseAdapter",
    "ChatMessage",
    "Completion",
    "Interaction",
    "InteractionLog",
    "LLMAdapter",
    "LLMConfig",
    "SamplingParams",
    "StreamChunk",
    "Usage",
    "build_adapter",
    "read_llm_config",
    "register_adapter",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value
