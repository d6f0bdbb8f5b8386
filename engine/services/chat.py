"""The chat service: replies from the teacher, the student or a remote API, streamed.

One LLM adapter per chat target, built on the models the runtime already loaded (so a chat
never loads a second copy). A student's reply is watched by a memory tracker, when the
memory service gives one, and :meth:`ChatService.last_memory_usage` says which entries it
read most.

Importing this module loads :mod:`engine.llm`'s light parts (no torch, no HTTP client).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from engine.errors import MindsetError, one_line
from engine.llm.types import ChatMessage
from engine.runtime import REMOTE, STUDENT, TEACHER, Runtime
from engine.views import MemoryUse

if TYPE_CHECKING:
    from engine.llm.adapter import BaseAdapter
    from engine.services.memory_mirror import MemoryTracker

__all__ = ["ChatMessage", "ChatService"]

TrackerFactory = Callable[[], "MemoryTracker | None"]


class ChatService:
    """Chat targets, their adapters and the memory use of the last reply of each."""

    def __init__(self, runtime: Runtime, *, tracker: TrackerFactory | None = None) -> None:
        self.runtime = runtime
        self._tracker = tracker
        self._adapters: dict[str, BaseAdapter] = {}
        self._memory_usage: dict[str, list[MemoryUse]] = {}
        runtime.on_student_dropped(self._student_dropped)

    def chat_targets(self) -> list[str]:
        """Models the chat can talk to."""
        targets = [TEACHER]
        if self.runtime.student_spec:
            targets.append(STUDENT)
        targets.append(REMOTE)
        return targets

    def last_memory_usage(self, target: str) -> list[MemoryUse] | None:
        """The memory entries the last reply of ``target`` used most; None when the model
        has no memory layers that report it."""
        return self._memory_usage.get(target)

    @contextlib.contextmanager
    def memory_use(self, target: str) -> Iterator[None]:
        """Record which memory entries the model calls inside the block read, for
        :meth:`last_memory_usage` (a student's, when the memory service gives a tracker;
        for any other target nothing is recorded)."""
        tracker = self._tracker() if target == STUDENT and self._tracker is not None else None
        if tracker is None:
            yield
            return
        tracker.attach()
        try:
            yield
        finally:
            tracker.detach()
            self._memory_usage[target] = tracker.top()

    async def stream_chat(
        self,
        target: str,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int = 128,
        temperature: float | None = None,
        top_p: float | None = None,
        conversation_id: str | None = None,
    ) -> AsyncIterator[str]:
        """Stream a reply from ``target`` (teacher, student or remote) through the LLM
        adapters, piece by piece; sampling left out (None) is the model's default (see
        :mod:`engine.llm.defaults`). Failures arrive as :class:`MindsetError`."""
        from engine.llm import SamplingParams
        from engine.llm.defaults import filled

        adapter = await self._adapter(target)
        chosen = filled(getattr(adapter, "sampling_defaults", {}), temperature=temperature,
                        top_p=top_p)
        params = SamplingParams(max_tokens=max_tokens, **chosen).validate()  # InputError
        payload = [{"role": m.role, "content": m.content} for m in messages]
        with self.memory_use(target):
            try:
                async for chunk in adapter.stream_chat(payload, params,
                                                       conversation_id=conversation_id):
                    if chunk.text:
                        yield chunk.text
            except MindsetError:
                raise
            except Exception as exc:  # network and library errors reach the user as one line
                raise MindsetError(f"{target} request failed: {one_line(exc)}") from exc

    def check_sampling(self, temperature: float | None, top_p: float | None) -> None:
        """Raise :class:`MindsetError` (one line, naming the parameter) when a chosen
        temperature or top-p is out of range; None means the model's default."""
        from engine.llm import SamplingParams
        from engine.llm.defaults import filled

        SamplingParams(**filled({}, temperature=temperature, top_p=top_p)).validate()

    async def sampling_defaults(self, target: str) -> dict[str, float | int]:
        """The sampling a reply from ``target`` gets when none is chosen: its generation
        config's, or conservative small-model defaults; empty for a remote API (its own)."""
        if target == REMOTE:
            return {}
        from engine.llm.defaults import filled

        adapter = await self._adapter(target)
        return filled(getattr(adapter, "sampling_defaults", {}), temperature=None, top_p=None)

    async def adapter(self, target: str) -> BaseAdapter:
        """The adapter of a chat target (the agent's turns run on it too)."""
        return await self._adapter(target)

    async def _adapter(self, target: str) -> BaseAdapter:
        """One adapter per chat target, built on the models the runtime already loaded."""
        if target in self._adapters:
            return self._adapters[target]
        from engine.llm import InteractionLog

        log = InteractionLog()
        adapter: BaseAdapter
        if target == REMOTE:
            from engine.llm import build_adapter

            try:
                adapter = build_adapter("openai", log=log)
            except MindsetError as exc:
                raise MindsetError(
                    f"no remote model: {exc} (set [llm] model and base_url in the config "
                    "file, and OPENAI_API_KEY)"
                ) from exc
        else:
            from engine.llm.local import LocalAdapter

            loaded = await self.runtime.load_model(target)
            adapter = LocalAdapter(loaded, name=loaded.spec, log=log)
        self._adapters[target] = adapter
        return adapter

    async def _student_dropped(self) -> None:
        adapter = self._adapters.pop(STUDENT, None)
        if adapter is not None:
            with contextlib.suppress(Exception):
                await adapter.aclose()

    async def close(self) -> None:
        """Close every adapter (their HTTP clients and logs)."""
        adapters, self._adapters = self._adapters, {}
        for adapter in adapters.values():
            with contextlib.suppress(Exception):
                await adapter.aclose()
