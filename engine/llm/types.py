"""The values every LLM adapter speaks: messages, sampling parameters, chunks and completions,
and the ``[llm]`` settings adapters are built from."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from engine.errors import InputError
from engine.textdata import utf8_problem

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
        check_text(content, f"message {index}", param=f"messages.{index}.content")
        result.append(ChatMessage(str(role), content))
    if not result:
        raise InputError("no messages given; a chat needs at least one message")
    return result


# Below these, sampling divides logits into infinities (a NaN distribution): 1e-45 is
# refused, not clamped, so that a typo is seen rather than silently made greedy.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 2.0
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 10.0
MAX_TOP_LOGPROBS = 20


class ParameterError(InputError):
    """A bad value for one named request parameter (the server reports ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


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
    # Return each sampled token's log-probability and this many alternatives (0 to
    # MAX_TOP_LOGPROBS); None returns none. The agent's cascade reads them as uncertainty.
    logprobs: int | None = None
    # Label channels (engine.model.label_channels): one (arousal, valence) in [-1, 1] for
    # every token, and whether to flag a chat's data tokens (engine.llm.labels; None: when
    # the model has a content channel). A model without the channel refuses them.
    affect: tuple[float, float] | None = None
    content_labels: bool | None = None

    def validate(self) -> SamplingParams:
        """Return self, or raise :class:`ParameterError` naming the bad parameter."""
        if not _whole(self.max_tokens) or self.max_tokens < 1:
            raise ParameterError("max_tokens", "max_tokens must be a whole number >= 1, not "
                                 f"{self.max_tokens!r}")
        temperature = self.temperature
        if not _finite(temperature) or not (
                temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
            raise ParameterError("temperature", "temperature must be 0 (greedy) or between "
                                 f"{MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, not "
                                 f"{temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise ParameterError("top_p", f"top_p must be in (0, 1], not {self.top_p!r}")
        if not _whole(self.top_k) or self.top_k < 0:
            raise ParameterError("top_k", f"top_k must be a whole number >= 0, not "
                                 f"{self.top_k!r}")
        penalty = self.repetition_penalty
        if not _finite(penalty) or not MIN_REPETITION_PENALTY <= penalty <= MAX_REPETITION_PENALTY:
            raise ParameterError("repetition_penalty", "repetition_penalty must be between "
                                 f"{MIN_REPETITION_PENALTY:g} and {MAX_REPETITION_PENALTY:g} "
                                 f"(1 means none), not {penalty!r}")
        if len(self.stop) > 4 or any(not isinstance(s, str) or not s for s in self.stop):
            raise ParameterError("stop", "stop takes at most 4 non-empty strings")
        for stop in self.stop:
            check_text(stop, "a stop string", param="stop")
        if self.seed is not None and not _whole(self.seed):
            raise ParameterError("seed", f"seed must be a whole number, not {self.seed!r}")
        if self.logprobs is not None and (not _whole(self.logprobs)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ParameterError("top_logprobs", "top_logprobs must be a whole number from 0 "
                                 f"to {MAX_TOP_LOGPROBS}, not {self.logprobs!r}")
        if self.affect is not None and (
                not isinstance(self.affect, tuple | list) or len(self.affect) != 2
                or not all(_finite(v) and -1 <= v <= 1 for v in self.affect)):
            raise ParameterError("mindset.affect", "affect must be (arousal, valence), each "
                                 f"from -1 to 1, not {self.affect!r}")
        if self.content_labels is not None and not isinstance(self.content_labels, bool):
            raise ParameterError("mindset.content_labels", "content_labels must be true or "
                                 f"false, not {self.content_labels!r}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) \
        and math.isfinite(value)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_text(text: str, what: str, *, param: str | None = None) -> str:
    """Return ``text``, or raise when it cannot be encoded as UTF-8: a lone surrogate
    (``"\\ud800"`` in JSON) or an undecodable byte smuggled in by ``surrogateescape``
    (a command-line argument that is not UTF-8). Tokenizers and SQLite fail on both."""
    problem = utf8_problem(text)
    if problem is not None:
        message = f"{what} is not valid UTF-8 text ({problem})"
        if param is not None:
            raise ParameterError(param, message) from None
        raise InputError(message) from None
    return text


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token: its text, log-probability under the model (before sampling's
    temperature and cuts) and the most likely alternatives, as OpenAI's ``logprobs``."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


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
    logprobs: list[TokenLogprob] | None = None  # the tokens behind ``text``, when asked


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
    logprobs: list[TokenLogprob] | None = None


def new_id() -> str:
    return uuid.uuid4().hex


# Specs with no adapter prefix, and configs that name none, go to this adapter.
DEFAULT_ADAPTER = "local"


@dataclass
class LLMConfig:
    """The ``[llm]`` table of the config file (see :mod:`engine.llm.config`)."""

    adapter: str = DEFAULT_ADAPTER
    model: str | None = None
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
