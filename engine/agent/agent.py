"""One turn of the agent, as a stream of events.

A turn: the user's message joins the dialog tree; memories relevant to it are retrieved
(recency, importance, relevance); the prompt is built from the system prompt, the current
feeling, the rolling summary, the retrieved memories, open tasks and the recent turns; an
optional inner thought comes first; the reply streams, calling tools on the way; its
feeling tag is read; the turns are rated and stored as memories; old turns are folded into
the summary when the context fills; and a reflection runs when enough importance has piled
up. Every model call goes through the :class:`~engine.agent.cascade.Cascade`, which says
which model answered.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from engine.agent import prompts
from engine.agent.affect import NEUTRAL, Affect, ParseFailure, estimate_affect, split_reply
from engine.agent.cascade import Cascade, StepResult
from engine.agent.context import ContextBuilder
from engine.agent.dialog import DialogNode, DialogStore
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
from engine.agent.long_term import LongTermMemory, Memory, RetrievalWeights
from engine.agent.state import PIN_SETTING, SYSTEM_SETTING, AgentState
from engine.agent.tools import ToolBox, ToolResult
from engine.agent.upkeep import Upkeep
from engine.errors import InputError
from engine.llm.types import ChatMessage, SamplingParams

log = logging.getLogger("mindset.agent")


@dataclass
class AgentSettings:
    max_tokens: int = 200
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    seed: int | None = None
    context_tokens: int = 1024  # for the recent turns; older ones go into the summary
    retrieve_k: int = 4
    weights: RetrievalWeights = field(default_factory=RetrievalWeights)
    reflection_threshold: int = 60  # summed importance since the last reflection
    reflection_questions: int = 3
    inner_dialogue: bool = False
    feelings: bool = True  # ask each reply for its feeling tag
    tools: bool = True
    max_tool_rounds: int = 2
    rate_importance: bool = True
    summaries: bool = True  # fold old turns into a rolling summary (else: truncate)
    remember: bool = True  # write each turn to long-term memory


class Agent:
    """The agent over a dialog store, a long-term memory, its state and tools."""

    def __init__(self, cascade: Cascade, dialog: DialogStore, memory: LongTermMemory,
                 state: AgentState, tools: ToolBox | None = None,
                 settings: AgentSettings | None = None) -> None:
        self.cascade = cascade
        self.dialog = dialog
        self.memory = memory
        self.state = state
        self.tools = tools
        self.settings = settings or AgentSettings()
        self.settings.weights.validate()

    # Settings the user changes from the chat ---------------------------------------------

    @property
    def system_prompt(self) -> str:
        return str(self.state.setting(SYSTEM_SETTING, prompts.DEFAULT_SYSTEM_PROMPT))

    def set_system_prompt(self, text: str | None) -> None:
        """Replace the system prompt; None or empty restores the default."""
        self.state.set_setting(SYSTEM_SETTING, text.strip() if text and text.strip() else None)

    @property
    def pinned(self) -> Affect | None:
        value = self.state.setting(PIN_SETTING)
        return Affect(**value) if isinstance(value, dict) else None

    def pin(self, affect: Affect | None) -> None:
        """Hold the feeling fed into every prompt (None: follow the replies again)."""
        self.state.set_setting(PIN_SETTING, None if affect is None else {
            "arousal": affect.arousal, "valence": affect.valence, "label": affect.label})

    def feeling(self, conversation_id: str) -> tuple[Affect, bool]:
        """The feeling the next prompt carries, and whether the user pinned it."""
        pinned = self.pinned
        if pinned is not None:
            return pinned, True
        for node in reversed(self.dialog.path(conversation_id)):
            if node.role == "assistant" and node.arousal is not None \
                    and node.valence is not None:
                return Affect(node.arousal, node.valence, node.emotion or ""), False
        return NEUTRAL, False

    # Turns ----------------------------------------------------------------------------------

    async def respond(self, conversation_id: str, text: str, *,
                      parent_id: str | None = None) -> AsyncIterator[AgentEvent]:
        """The user says ``text`` (after ``parent_id``, default the end of the visible path)."""
        if not text.strip():
            raise InputError("the message is empty; type something to say")
        if parent_id is None:
            path = self.dialog.path(conversation_id)
            parent_id = path[-1].id if path else None
        user = self.dialog.add(conversation_id, parent_id, "user", text)
        async for event in self._turn(user):
            yield event

    async def edit(self, node_id: str, text: str) -> AsyncIterator[AgentEvent]:
        """Change an earlier user turn: a new branch from there, answered afresh."""
        node = self.dialog.node(node_id)
        if node.role != "user":
            raise InputError("only your own turns can be edited; regenerate a reply instead")
        if not text.strip():
            raise InputError("the message is empty; type something to say")
        user = self.dialog.edit(node_id, text)
        async for event in self._turn(user):
            yield event

    async def regenerate(self, node_id: str) -> AsyncIterator[AgentEvent]:
        """Another reply in place of ``node_id``: a sibling branch (after the same thought
        and tool results, when there were any)."""
        node = self.dialog.node(node_id)
        if node.role != "assistant" or node.parent_id is None:
            raise InputError("only a reply can be regenerated; pick an assistant turn")
        user = next((n for n in reversed(self.dialog.path_to(node.parent_id))
                     if n.role == "user"), None)
        if user is None:
            raise InputError("this reply answers no user turn; there is nothing to regenerate")
        async for event in self._turn(user, sibling_of=node):
            yield event

    async def _turn(self, user: DialogNode, *,
                    sibling_of: DialogNode | None = None) -> AsyncIterator[AgentEvent]:
        events: list[AgentEvent] = []
        upkeep = self._upkeep(events)
        conversation = user.conversation_id
        builder = ContextBuilder(self.dialog, self.memory, self.state, self.tools, self.settings)
        affect, pinned = self.feeling(conversation)
        # The reply hangs under the user turn, or under what a regenerated one hung under.
        anchor = self.dialog.node(sibling_of.parent_id) if sibling_of and sibling_of.parent_id \
            else user
        path = self.dialog.path_to(anchor.id)
        # Fold what no longer fits into the summary before building the prompt.
        folded = builder.overflow(path) if self.settings.summaries else []
        if folded:
            covered = builder.summary_for(path)
            text, memory_id = await upkeep.summarise(
                conversation, covered.text if covered else "", folded,
                covered.turns if covered else 0)
            events.append(Summarised(text, len(folded), memory_id))
        retrieved = builder.retrieve(path, user.content)
        events.append(Retrieved(tuple(retrieved)))
        for event in self._drain(events):
            yield event
        thought: DialogNode | None = anchor if anchor.role == "inner" else None
        if self.settings.inner_dialogue and sibling_of is None:
            messages = builder.fitted([*path, _asking(user, prompts.INNER)], retrieved,
                                      affect, pinned, thought=None,
                                      adapters=self.cascade.adapters, max_tokens=96)
            inner = await self._call("inner", messages, max_tokens=96,
                                     conversation_id=conversation)
            yield self._step(inner)
            # user -> thought -> reply: exports and prompts leave the thought out.
            thought = self.dialog.add(conversation, user.id, "inner", inner.text.strip(),
                                      model=inner.model, interaction_id=inner.interaction_id)
            anchor = thought
            yield Thought(thought)
        tool_turns: list[DialogNode] = []
        reply_parent = anchor
        final: StepResult | None = None
        shown = ""
        for round_ in range(self.settings.max_tool_rounds + 1):
            messages = builder.fitted(path + tool_turns, retrieved, affect, pinned,
                                      thought=thought, adapters=self.cascade.adapters,
                                      max_tokens=self.settings.max_tokens)
            held = HoldBack()
            async for piece in self._stream("answer", messages, conversation,
                                            _last_call(path + tool_turns)):
                if isinstance(piece, StepResult):
                    final = piece
                    break
                for text in held.push(piece):
                    yield Token(text)
            assert final is not None
            yield self._step(final)
            call = prompts.find_tool_call(final.text) if self.tools and self.settings.tools \
                else None
            if call is None or round_ == self.settings.max_tool_rounds:
                shown = held.emitted
                break
            name, argument, start = call
            said = final.text[:start].strip() or f"(calling {name})"
            asked = self.dialog.add(conversation, reply_parent.id, "assistant", said,
                                    model=final.model, interaction_id=final.interaction_id,
                                    meta={"tool_call": {"name": name, "argument": argument}})
            result = await self._use_tool(name, argument, conversation)
            done = self.dialog.add(conversation, asked.id, "tool", f"{name}: {result.text}",
                                   meta={"tool": name, "ok": result.ok})
            tool_turns += [asked, done]
            reply_parent = done
            yield ToolUsed(name, argument, result, done)
        assert final is not None
        visible, parsed = split_reply(final.text) if self.settings.feelings \
            else (final.text.strip(), None)
        reply_affect = parsed if isinstance(parsed, Affect) else None
        meta: dict[str, object] = {"memories": [s.memory.id for s in retrieved],
                                   "deferred": final.deferred}
        if isinstance(parsed, Affect):
            meta["feeling_source"] = "reply"
        elif isinstance(parsed, ParseFailure):
            # Logged and shown; the loop goes on with a feeling estimated from the text.
            meta["feeling_error"] = parsed.reason
            meta["feeling_source"] = "estimated from the text"
            reply_affect = estimate_affect(visible or final.text, self.memory.embedder.embed)
            log.warning("unreadable feeling tag: %s", parsed.reason)
            yield Notice(f"could not read the reply's feeling ({parsed.reason}); estimated "
                         f"it from the text: {reply_affect.describe()}")
        if visible.startswith(shown) and len(visible) > len(shown):
            yield Token(visible[len(shown):])
        fields: dict[str, Any] = {"model": final.model, "meta": meta,
                                  "interaction_id": final.interaction_id}
        if reply_affect is not None:
            fields.update(arousal=reply_affect.arousal, valence=reply_affect.valence,
                          emotion=reply_affect.label or None)
        if sibling_of is not None and not tool_turns:
            reply = self.dialog.regenerate(sibling_of.id, visible or final.text, **fields)
        else:
            reply = self.dialog.add(conversation, reply_parent.id, "assistant",
                                    visible or final.text, **fields)
        yield Replied(reply, reply_affect)
        remembered = await self._remember(upkeep, [] if sibling_of else [user], reply) \
            if self.settings.remember else []
        if remembered:
            yield Remembered(tuple(remembered))
        for event in self._drain(events):
            yield event
        if upkeep.reflection_due(self.settings.reflection_threshold):
            asked_questions, reflections = await upkeep.reflect(
                self.settings.reflection_questions, conversation_id=conversation)
            for event in self._drain(events):
                yield event
            yield Reflected(tuple(asked_questions), tuple(reflections))

    async def observe(self, conversation_id: str, role: str, text: str) -> list[AgentEvent]:
        """Record a turn without replying (a transcript being imported, a scripted turn):
        it joins the dialog and the long-term memory like a spoken one, rated the same."""
        if role not in ("user", "assistant"):
            raise InputError(f"an observed turn is 'user' or 'assistant', not {role!r}")
        if not text.strip():
            raise InputError("the turn is empty; give its text")
        events: list[AgentEvent] = []
        upkeep = self._upkeep(events)
        node = self.dialog.append(conversation_id, role, text)
        if not self.settings.remember:
            return events
        written = await self._remember(upkeep, [], node)
        events.append(Remembered(tuple(written)))
        if upkeep.reflection_due(self.settings.reflection_threshold):
            asked, reflections = await upkeep.reflect(self.settings.reflection_questions,
                                                      conversation_id=conversation_id)
            events.append(Reflected(tuple(asked), tuple(reflections)))
        return events

    async def reflect(self, conversation_id: str | None = None) -> AsyncIterator[AgentEvent]:
        """Reflect now (``/reflect``), whatever the threshold."""
        events: list[AgentEvent] = []
        upkeep = self._upkeep(events)
        asked, written = await upkeep.reflect(self.settings.reflection_questions,
                                              conversation_id=conversation_id)
        for event in self._drain(events):
            yield event
        yield Reflected(tuple(asked), tuple(written))

    async def add_task(self, description: str, *, conversation_id: str | None = None,
                       source: str = "user") -> tuple[int, int]:
        """Queue a task; the model sets its priority. Returns (task id, priority)."""
        events: list[AgentEvent] = []
        priority = await self._upkeep(events).rate("priority", prompts.PRIORITY,
                                                   conversation_id, task=description)
        task = self.state.add_task(description, priority, source=source,
                                   conversation_id=conversation_id)
        return task.id, task.priority

    # Parts ----------------------------------------------------------------------------------

    def _upkeep(self, events: list[AgentEvent]) -> Upkeep:
        def report(text: str) -> None:
            log.warning("%s", text)
            events.append(Notice(text))

        return Upkeep(self.cascade, self.memory, self.state, report,
                      lambda result: events.append(self._step(result)), self.settings.seed)

    @staticmethod
    def _drain(events: list[AgentEvent]) -> list[AgentEvent]:
        drained = list(events)
        events.clear()
        return drained

    @staticmethod
    def _step(result: StepResult) -> StepDone:
        return StepDone(result.step, result.model, result.deferred, result.uncertainty,
                        result.measure)

    async def _call(self, step: str, messages: list[ChatMessage], *, max_tokens: int,
                    conversation_id: str) -> StepResult:
        params = _params(self.settings, max_tokens)
        return await self.cascade.run(step, messages, params, conversation_id=conversation_id)

    async def _stream(self, step: str, messages: list[ChatMessage], conversation_id: str,
                      parent_id: str | None) -> AsyncIterator[str | StepResult]:
        params = _params(self.settings, self.settings.max_tokens)
        async for piece in self.cascade.stream(step, messages, params,
                                               conversation_id=conversation_id,
                                               parent_id=parent_id):
            yield piece

    async def _use_tool(self, name: str, argument: str, conversation_id: str) -> ToolResult:
        if name in ("add_task", "task"):
            task_id, priority = await self.add_task(argument, conversation_id=conversation_id,
                                                    source="agent")
            return ToolResult(name, True, f"task #{task_id} queued at priority {priority}")
        assert self.tools is not None
        specs = {spec.name: spec for spec in self.tools.specs()}
        spec = specs.get(name)
        arguments: dict[str, object] = {}
        if spec is not None and spec.parameters:
            arguments[next(iter(spec.parameters))] = argument
        return await self.tools.call(name, arguments)

    async def _remember(self, upkeep: Upkeep, users: list[DialogNode],
                        reply: DialogNode) -> list[Memory]:
        written: list[Memory] = []
        for node in [*users, reply]:
            speaker = "The user said" if node.role == "user" else "I replied"
            text = f"{speaker}: {node.content}"
            importance = 5
            if self.settings.rate_importance:
                importance = await upkeep.rate("importance", prompts.IMPORTANCE,
                                               node.conversation_id, text=text)
            written.append(self.memory.add(text, kind="turn", importance=importance,
                                           conversation_id=node.conversation_id,
                                           node_id=node.id))
            if node.importance is None:
                self.dialog.annotate(node.id, importance=importance)
        return written


class HoldBack:
    """Streams a reply's text but holds back what may be the start of a feeling tag or a
    tool call (``[``, ``<``, ``{``, or a trailing "feeling:"), which the user never sees."""

    MARKERS = ("[", "<", "{")
    KEYWORDS = ("feeling", "emotion", "mood")

    def __init__(self) -> None:
        self.buffer = ""
        self.emitted = ""
        self.stopped = False

    def push(self, text: str) -> list[str]:
        if self.stopped:
            return []
        self.buffer += text
        cut = len(self.buffer)
        for marker in self.MARKERS:
            where = self.buffer.find(marker)
            if where >= 0:
                cut = min(cut, where)
                self.stopped = True
        lower = self.buffer.lower()
        for word in self.KEYWORDS:
            where = lower.find(word + ":")
            if where >= 0:
                cut = min(cut, where)
                self.stopped = True
        if not self.stopped:
            cut = max(0, min(cut, len(self.buffer) - 9))  # "feeling:" may be arriving
        ready, self.buffer = self.buffer[:cut], self.buffer[cut:]
        self.emitted += ready
        return [ready] if ready else []


def _asking(user: DialogNode, text: str) -> DialogNode:
    """A transient user turn (not stored) that asks the model something after ``user``."""
    return replace(user, id=f"{user.id}:ask", parent_id=user.id, content=text, meta={})


def _last_call(path: list[DialogNode]) -> str | None:
    """The interaction id of the newest model turn on ``path``: a reply's log entry names
    the call it continues, as the dialog tree does."""
    return next((n.interaction_id for n in reversed(path) if n.interaction_id), None)


def _params(settings: AgentSettings, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=settings.temperature,
                          top_p=settings.top_p, seed=settings.seed).validate()
