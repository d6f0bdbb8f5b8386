"""The agent service: the chat agent (:mod:`engine.agent`) on the chat service's models.

One :class:`~engine.agent.session.AgentSession` per chat target (teacher, student, remote),
built on first use on the :class:`~engine.services.chat.ChatService` adapter of that target,
so the agent never loads a second copy of a model. The sessions share one set of files
(:class:`~engine.agent.session.AgentPaths`, under the data directory: the terminal chat
uses the same ones), one embedder and one :class:`~engine.agent.agent.AgentSettings`: a
conversation, its branches and the agent's memories are the same whichever model answers.

A front end reads the dialog tree here (no model needed) and runs turns as async
iterators of :mod:`engine.agent.events`; a student's turn is watched by the chat service's
memory tracker, so :meth:`ChatService.last_memory_usage` covers agent replies too. The
event and view types a front end renders are re-exported from this module, so front ends
need not import :mod:`engine.agent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from engine.agent.affect import Affect
from engine.agent.agent import Agent, AgentSettings
from engine.agent.commands import CommandOutcome, run_command
from engine.agent.dialog import ConversationInfo, DialogNode, DialogStore
from engine.agent.embedding import Embedder, default_embedder
from engine.agent.events import (
    AgentEvent,
    Notice,
    Reflected,
    Remembered,
    Replied,
    Retrieved,
    StepDone,
    Summarised,
    Thought,
    Token,
    ToolUsed,
)
from engine.agent.long_term import ScoredMemory
from engine.agent.session import AgentPaths, AgentSession
from engine.errors import InputError, MindsetError, one_line
from engine.runtime import STUDENT, Runtime
from engine.services.chat import ChatService

__all__ = [
    "Affect", "AgentEvent", "AgentService", "AgentSettings", "CommandOutcome",
    "ConversationInfo", "DialogNode", "Notice", "Reflected", "Remembered", "Replied",
    "Retrieved", "ScoredMemory", "StepDone", "Summarised", "Thought", "Token", "ToolUsed",
    "VisibleTurn",
]

SETTING_NAMES = frozenset(f.name for f in dataclasses.fields(AgentSettings))


@dataclass(frozen=True)
class VisibleTurn:
    """One message of the visible path, with its place among its branches."""

    node: DialogNode
    index: int  # 1-based, among the node and its siblings
    count: int  # how many branches there are here


class AgentService:
    """The agent on each chat target, over one dialog tree and one long-term memory."""

    def __init__(self, runtime: Runtime, chat: ChatService, *,
                 paths: AgentPaths | None = None, settings: AgentSettings | None = None,
                 embedder: Embedder | None = None) -> None:
        self.runtime = runtime
        self.chat = chat
        self.paths = paths or AgentPaths()
        # Shared by every target. Its temperature and top-p are set for each turn: the
        # caller's, else those fixed with configure(), else the model's own defaults.
        self.settings = settings or AgentSettings()
        self._fixed_sampling: set[str] = set()
        self._embedder = embedder
        self._sessions: dict[str, AgentSession] = {}
        self._building: asyncio.Lock | None = None
        self._dialog: DialogStore | None = None
        self._opening = threading.Lock()
        self._warm = False

    def configure(self, **fields: Any) -> None:
        """Change agent settings (:class:`AgentSettings` fields) for every target, from the
        next turn on; tests use it for tiny models (``tools=False, max_tokens=8``)."""
        unknown = set(fields) - SETTING_NAMES
        if unknown:
            raise InputError(f"unknown agent settings {sorted(unknown)}; use some of "
                             + ", ".join(sorted(SETTING_NAMES)))
        for name, value in fields.items():
            setattr(self.settings, name, value)
        self._fixed_sampling |= {"temperature", "top_p"} & set(fields)

    # The dialog tree: no model needed --------------------------------------------------------

    def _store(self) -> DialogStore:
        with self._opening:  # two first reads at once open one store
            if self._dialog is None:
                self._dialog = DialogStore(self.paths.database)
            return self._dialog

    async def _read(self, call: Callable[[DialogStore], Any]) -> Any:
        """``call(store)`` off the event loop (SQLite may wait for another writer)."""
        return await asyncio.to_thread(lambda: call(self._store()))

    async def conversations(self) -> list[ConversationInfo]:
        """Every stored conversation, the most recently changed first."""
        found: list[ConversationInfo] = await self._read(lambda s: s.conversations())
        return found

    async def new_conversation(self, title: str = "") -> str:
        created: str = await self._read(lambda s: s.new_conversation(title))
        return created

    async def path(self, conversation_id: str) -> list[DialogNode]:
        """The visible conversation, oldest first."""
        nodes: list[DialogNode] = await self._read(lambda s: s.path(conversation_id))
        return nodes

    async def turns(self, conversation_id: str) -> list[VisibleTurn]:
        """The visible conversation with each message's branch position, in one read."""

        def read(store: DialogStore) -> list[VisibleTurn]:
            return [VisibleTurn(node, *store.position(node.id))
                    for node in store.path(conversation_id)]

        turns: list[VisibleTurn] = await self._read(read)
        return turns

    async def position(self, node_id: str) -> tuple[int, int]:
        """(1-based index among its siblings, number of siblings)."""
        where: tuple[int, int] = await self._read(lambda s: s.position(node_id))
        return where

    async def switch(self, node_id: str, step: int) -> DialogNode:
        """Show the branch ``step`` places from ``node_id`` (wrapping); returns it."""
        chosen: DialogNode = await self._read(lambda s: s.switch(node_id, step))
        return chosen

    async def export(self, conversation_id: str, fmt: str = "markdown") -> str:
        """The visible branch as Markdown or JSON."""
        text: str = await self._read(lambda s: s.export(conversation_id, fmt))
        return text

    # Sessions ------------------------------------------------------------------------------

    async def session(self, target: str) -> AgentSession:
        """The agent of ``target``, built on the chat service's adapter on first use."""
        if target == STUDENT and not self.runtime.student_spec:
            raise InputError("there is no student yet: train one in the Training pane, or "
                             "start the workbench with --student DIR")
        if self._building is None:
            self._building = asyncio.Lock()
        async with self._building:  # two first turns at once build one session
            adapter = await self.chat.adapter(target)
            session = self._sessions.get(target)
            if session is None:
                embedder = self._embedder or default_embedder()
                if not self._warm:  # the embedder loads here, not on the event loop mid-turn
                    await asyncio.to_thread(embedder.embed, ["warm up"])
                    self._warm = True
                session = await asyncio.to_thread(
                    AgentSession, adapter, paths=self.paths, embedder=embedder,
                    settings=self.settings, owns_adapters=False)
                self._sessions[target] = session
            elif session.cascade.small is not adapter:  # a new student was adopted
                session.replace_models(adapter)
            return session

    async def models(self, target: str) -> list[str]:
        """The models that answer for ``target``: the small one first."""
        return list((await self.session(target)).cascade.models)

    async def feeling(self, target: str, conversation_id: str) -> tuple[Affect, bool]:
        """The feeling the next prompt carries, and whether the user pinned it."""
        agent = (await self.session(target)).agent
        return await asyncio.to_thread(agent.feeling, conversation_id)

    # Turns ---------------------------------------------------------------------------------

    def respond(self, target: str, conversation_id: str, text: str, *,
                temperature: float | None = None,
                top_p: float | None = None) -> AsyncIterator[AgentEvent]:
        """The user says ``text`` at the end of the visible path; the reply's events."""
        return self._turn(target, lambda agent: agent.respond(conversation_id, text),
                          temperature, top_p)

    def edit(self, target: str, node_id: str, text: str, *, temperature: float | None = None,
             top_p: float | None = None) -> AsyncIterator[AgentEvent]:
        """A new branch beside the user turn ``node_id``, answered afresh."""
        return self._turn(target, lambda agent: agent.edit(node_id, text), temperature, top_p)

    def regenerate(self, target: str, node_id: str, *, temperature: float | None = None,
                   top_p: float | None = None) -> AsyncIterator[AgentEvent]:
        """Another reply beside the assistant turn ``node_id``."""
        return self._turn(target, lambda agent: agent.regenerate(node_id), temperature, top_p)

    async def command(self, target: str, conversation_id: str, line: str, *,
                      temperature: float | None = None,
                      top_p: float | None = None) -> CommandOutcome:
        """Answer a slash command (``/help`` lists them); a turn it starts (``/branch
        regen``, ``/reflect``) comes back as ``turn``, watched like any other."""
        session = await self.session(target)
        await self._sample(target, temperature, top_p)
        try:
            outcome = await run_command(session, conversation_id, line)
        except MindsetError:
            raise
        except Exception as exc:  # a library error becomes one line, like a turn's
            raise MindsetError(f"{line.strip() or 'the command'} failed: {one_line(exc)}"
                               ) from exc
        if outcome.turn is not None:
            started = outcome.turn
            outcome = dataclasses.replace(outcome, turn=self._turn(
                target, lambda _agent: started, temperature, top_p))
        return outcome

    async def _turn(self, target: str, start: Callable[[Agent], AsyncIterator[AgentEvent]],
                    temperature: float | None,
                    top_p: float | None) -> AsyncIterator[AgentEvent]:
        session = await self.session(target)
        await self._sample(target, temperature, top_p)
        events = start(session.agent)
        try:
            with contextlib.ExitStack() as tracking:
                tracked = False
                async for event in events:
                    # The memory tracker watches the reply, not the ratings after it.
                    if isinstance(event, Retrieved) and target == STUDENT and not tracked:
                        tracking.enter_context(self.chat.memory_use(target))
                        tracked = True
                    elif isinstance(event, Replied):
                        tracking.close()
                    yield event
        except MindsetError:
            raise
        except Exception as exc:  # network and library errors reach the user as one line
            raise MindsetError(f"{target} request failed: {one_line(exc)}") from exc
        finally:
            # Closed now, not by the garbage collector: a stopped turn ends where it stood.
            closing = getattr(events, "aclose", None)
            if closing is not None:
                await closing()

    async def _sample(self, target: str, temperature: float | None,
                      top_p: float | None) -> None:
        """This turn's sampling: the caller's choice, else the configured one, else the
        model's own defaults (what the chat shows as "the model's defaults")."""
        from engine.llm import SamplingParams
        from engine.llm.defaults import filled

        defaults = await self.chat.sampling_defaults(target)
        chosen = {"temperature": temperature, "top_p": top_p}
        for name in ("temperature", "top_p"):
            if chosen[name] is None and name in self._fixed_sampling:
                chosen[name] = getattr(self.settings, name)
        values = filled(defaults, **chosen)
        SamplingParams(**values).validate()  # InputError, naming the parameter
        self.settings.temperature = float(values["temperature"])
        self.settings.top_p = float(values["top_p"])

    async def close(self) -> None:
        """Close every session's files (the adapters are the chat service's); safe twice."""
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            with contextlib.suppress(Exception):
                await session.aclose()
        if self._dialog is not None:
            self._dialog.close()
            self._dialog = None
