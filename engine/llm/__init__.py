"""LLM adapters, the interaction log and the local OpenAI-compatible server.

One async interface (:class:`LLMAdapter`) to any model::

    adapter = build_adapter("tiny-llama")          # or "default", "openai:gpt-4o-mini", ...
    reply = await adapter.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=64))
    async for chunk in adapter.stream_chat(messages, params, parent_id=reply.id):
        print(chunk.text, end="")

Adapters are listed, by spec prefix, in :mod:`engine.llm.registry`.
Every call is logged to SQLite (:class:`InteractionLog`) with its conversation and parent ids.
Heavy libraries (torch, transformers, openai, fastapi) load only when an adapter is built.
"""

from engine.llm.adapter import BaseAdapter, LLMAdapter
from engine.llm.config import LLMConfig, build_adapter, read_llm_config
from engine.llm.log import Interaction, InteractionLog
from engine.llm.registry import AdapterEntry, register_adapter
from engine.llm.types import ChatMessage, Completion, SamplingParams, StreamChunk, Usage

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
