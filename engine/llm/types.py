"""The values every LLM adapter speaks: messages, sampling parameters, chunks and completions."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from engine.errors import InputError

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")
FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


MessageLike = ChatMessage | Mapping[str, Any]


def as_messages(messages: Iterable[MessageLike]) -> list[ChatMessage]:
    """Accept :class:`ChatMessage` objects or ``{"role": ..., "content": ...}`` dicts."""
    result: list[ChatMessage] = []
    for index, message in enumerate(messages):
        role: Any
        content: Any
        if isinstance(message, ChatMessage):
            role, content = message.role, message.content
        else:
            role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InputError(
                f"message {index} has role {role!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise InputError(f"message {index} has no text content; give a string")
        result.append(ChatMessage(str(role), content))
    if not result:
        raise InputError("no messages given; a chat needs at least one message")
    return result


@dataclass
class SamplingParams:
    """How to sample. ``temperature`` 0 means greedy; ``top_k`` 0 means no top-k cut."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> SamplingParams:
        """Return self, or raise :class:`InputError` naming the bad parameter."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InputError(f"max_tokens must be a whole number >= 1, not {self.max_tokens!r}")
        if not _finite(self.temperature) or not 0 <= self.temperature <= 2:
            raise InputError(f"temperature must be between 0 and 2, not {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], not {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be a whole number >= 0, not {self.top_k!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InputError(
                f"repetition_penalty must be > 0, not {self.repetition_penalty!r}"
            )
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError("stop takes at most 4 non-empty strings")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class StreamChunk:
    """A piece of a streamed reply. The last chunk has ``finish_reason`` and ``usage`` set.

    ``id`` is the interaction id (the same on every chunk of one call): pass it as
    ``parent_id`` of the next call to continue that branch of the conversation.
    """

    id: str
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class Completion:
    """A whole reply."""

    id: str
    model: str
    text: str
    finish_reason: str
    usage: Usage
    latency_s: float
    conversation_id: str | None = None


def new_id() -> str:
    return uuid.uuid4().hex
