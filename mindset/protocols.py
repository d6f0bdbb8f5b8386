"""What each workbench pane needs from the engine, as small typed protocols.

A pane depends on exactly the calls it makes, not on the whole :class:`engine.facade.Engine`;
the app passes the engine's services in, and a test can pass a light fake. Importing this
module is cheap: it names engine types only for type checking.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from engine.services.agent import (
        Affect,
        AgentEvent,
        CommandOutcome,
        ConversationInfo,
        DialogNode,
        VisibleTurn,
    )
    from engine.services.chat import ChatMessage
    from engine.services.jobs import JobEvent, WorkEstimate
    from engine.services.memory_reading import ReadSummary
    from engine.views import (
        Availability,
        DeletedEntries,
        EditRecord,
        EntryView,
        JobRequest,
        JobView,
        MemoryUse,
        ModelNode,
        ReplyTrace,
        ShapeReport,
        SurgeryView,
    )


class MemoryAPI(Protocol):
    """The Memory pane's calls (``engine.memory``)."""

    def availability(self) -> Availability: ...

    async def table_names(self) -> list[str]: ...

    async def table_stats(self, table: str) -> dict[str, Any]: ...

    async def table_page(self, table: str, offset: int, limit: int, *,
                         order: str = "id") -> list[EntryView]: ...

    async def find_entry(self, table: str, entry_id: int) -> list[EntryView]: ...

    async def search_text(self, table: str, text: str) -> list[EntryView]: ...

    async def update_entry(
        self, table: str, entry_id: int, *, label: str | None = None,
        tags: list[str] | None = None, scale: float | None = None,
        value: list[float] | None = None, value_text: str | None = None,
    ) -> None: ...

    async def delete_entries(self, table: str, ids: list[int]) -> DeletedEntries: ...

    async def restore_entries(self, deleted: DeletedEntries) -> list[int]: ...

    async def insert_entry(
        self, table: str, *, label: str | None = None, text: str | None = None
    ) -> int: ...

    async def evict(self, table: str) -> str: ...

    async def recombine(self, table: str) -> str: ...

    async def save_student(self) -> str: ...

    async def annotate(self, table: str, path: str) -> int: ...

    async def read_notes(self, table: str, path: str) -> ReadSummary: ...

    def take_warnings(self) -> list[str]: ...

    def fixed_slots(self, table: str) -> bool: ...


class ModelsAPI(Protocol):
    """The Model pane's calls (the engine itself: models are engine-wide)."""

    @property
    def student_spec(self) -> str | None: ...

    def spec_for(self, role: str) -> str | None: ...

    def model_error(self, role: str) -> str | None: ...

    def describe_model(self, role: str) -> ModelNode | None: ...

    async def load_model(self, role: str) -> object: ...


class ChatAPI(Protocol):
    """The Chat pane's calls (``engine.chat``)."""

    def chat_targets(self) -> list[str]: ...

    def stream_chat(
        self, target: str, messages: Sequence[ChatMessage], *, max_tokens: int = ...,
        temperature: float | None = ..., top_p: float | None = ...,
    ) -> AsyncIterator[str]: ...

    async def sampling_defaults(self, target: str) -> dict[str, float | int]: ...

    def check_sampling(self, temperature: float | None, top_p: float | None) -> None: ...

    def last_memory_usage(self, target: str) -> list[MemoryUse] | None: ...


class AgentAPI(Protocol):
    """The Chat pane's agent calls (``engine.agent``): the dialog tree and its turns."""

    async def conversations(self) -> list[ConversationInfo]: ...

    async def new_conversation(self, title: str = ...) -> str: ...

    async def path(self, conversation_id: str) -> list[DialogNode]: ...

    async def turns(self, conversation_id: str) -> list[VisibleTurn]: ...

    async def position(self, node_id: str) -> tuple[int, int]: ...

    async def switch(self, node_id: str, step: int) -> DialogNode: ...

    async def export(self, conversation_id: str, fmt: str = ...) -> str: ...

    async def models(self, target: str) -> list[str]: ...

    async def feeling(self, target: str, conversation_id: str) -> tuple[Affect, bool]: ...

    def respond(self, target: str, conversation_id: str, text: str, *,
                temperature: float | None = ...,
                top_p: float | None = ...) -> AsyncIterator[AgentEvent]: ...

    def edit(self, target: str, node_id: str, text: str, *, temperature: float | None = ...,
             top_p: float | None = ...) -> AsyncIterator[AgentEvent]: ...

    def regenerate(self, target: str, node_id: str, *, temperature: float | None = ...,
                   top_p: float | None = ...) -> AsyncIterator[AgentEvent]: ...

    async def command(self, target: str, conversation_id: str, line: str, *,
                      temperature: float | None = ...,
                      top_p: float | None = ...) -> CommandOutcome: ...


class KnowledgeAPI(Protocol):
    """The trace screen's calls (``engine.knowledge``): trace a reply, edit, undo."""

    async def trace_reply(self, messages: Sequence[ChatMessage], reply: str,
                          token: int = 0, limit: int = 15) -> ReplyTrace: ...

    async def scale(self, layer: int, slots: list[int], factor: float,
                    note: str = "") -> EditRecord: ...

    async def delete(self, layer: int, slots: list[int], note: str = "") -> EditRecord: ...

    async def insert_fact(self, messages: Sequence[ChatMessage], subject: str, answer: str,
                          *, layer: int | None = None, note: str = "") -> EditRecord: ...

    async def undo(self, edit_id: int | None = None, note: str = "") -> EditRecord: ...

    async def history(self) -> list[EditRecord]: ...


class JobsAPI(Protocol):
    """The Training pane's calls (``engine.jobs``)."""

    @property
    def default_teacher(self) -> str: ...

    def availability(self) -> Availability: ...

    def quick_start_request(self) -> JobRequest: ...

    async def list_jobs(self) -> list[JobView]: ...

    async def check_request(self, request: JobRequest) -> dict[str, str]: ...

    async def launch_job(self, request: JobRequest) -> JobView: ...

    async def estimate_request(self, request: JobRequest) -> WorkEstimate: ...

    def follow_job(self, job_id: str) -> AsyncIterator[JobEvent]: ...

    async def control_job(self, job_id: str, command: str) -> None: ...


class SurgeryAPI(Protocol):
    """The Model pane's surgery calls (``engine.surgery``): reshape, measure, heal, save."""

    @property
    def role(self) -> str: ...

    @property
    def result(self) -> object | None: ...  # the reshaped model, once an operation is applied

    @property
    def history(self) -> list[str]: ...

    @property
    def perplexity(self) -> dict[str, float]: ...

    def operations(self) -> dict[str, str]: ...

    def set_role(self, role: str) -> None: ...

    def discard(self) -> None: ...

    async def preview(self, name: str, params: dict[str, Any]) -> SurgeryView: ...

    async def apply(self, name: str, params: dict[str, Any]) -> SurgeryView: ...

    async def report(self, which: str = ..., *, importance: bool = ...) -> ShapeReport: ...

    async def evaluate(self, which: str = ...) -> float: ...

    async def heal(self, *, steps: int = ..., train: str = ...,
                   on_progress: Callable[[int, int, float], None] | None = ...,
                   should_stop: Callable[[], bool] | None = ...) -> str: ...

    async def save(self, directory: str) -> str: ...
