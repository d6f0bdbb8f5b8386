"""What one agent turn reports as it goes: the stream a terminal chat or the Chat pane
renders. Every event is a frozen dataclass; :data:`AgentEvent` is their union."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.agent.affect import Affect
from engine.agent.dialog import DialogNode
from engine.agent.long_term import Memory, ScoredMemory
from engine.agent.tools import ToolResult


@dataclass(frozen=True)
class Retrieved:
    """The memories put into this reply's prompt, with their three scores."""

    memories: tuple[ScoredMemory, ...]


@dataclass(frozen=True)
class Thought:
    """The inner dialogue before a reply (stored as an ``inner`` turn)."""

    node: DialogNode


@dataclass(frozen=True)
class Token:
    """A piece of the reply as it streams."""

    text: str


@dataclass(frozen=True)
class StepDone:
    """One model call of the turn, and who answered it (the cascade's record)."""

    step: str
    model: str
    deferred: bool = False
    uncertainty: float | None = None
    measure: str = "none"


@dataclass(frozen=True)
class ToolUsed:
    name: str
    argument: str
    result: ToolResult
    node: DialogNode  # the tool turn holding the result


@dataclass(frozen=True)
class Notice:
    """Something the user should see: an unreadable feeling tag, a rating that was not a
    number. Also written to the log."""

    text: str


@dataclass(frozen=True)
class Replied:
    """The reply, stored; ``affect`` is its feeling (None when it could not be read)."""

    node: DialogNode
    affect: Affect | None


@dataclass(frozen=True)
class Remembered:
    """Memories written after the reply (the turns, with their rated importance)."""

    memories: tuple[Memory, ...]


@dataclass(frozen=True)
class Summarised:
    text: str
    turns: int
    memory_id: int | None


@dataclass(frozen=True)
class Reflected:
    questions: tuple[str, ...]
    memories: tuple[Memory, ...] = field(default_factory=tuple)


AgentEvent = (Retrieved | Thought | Token | StepDone | ToolUsed | Notice | Replied
              | Remembered | Summarised | Reflected)
