"""The prompt of one reply: system prompt, feeling, rolling summary, retrieved memories,
open tasks, tools, and as many recent turns as the budget holds.

Turns are counted at about four characters a token (plus four per message), which holds for
English with the byte-level BPE tokenizers we serve and needs no tokenizer for remote APIs.
A summary counts only on the branch it was written for: after a switch to another branch,
that branch's old turns are summarised afresh.
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.agent import prompts
from engine.agent.affect import Affect
from engine.agent.dialog import DialogNode, DialogStore
from engine.agent.long_term import LongTermMemory, ScoredMemory
from engine.agent.state import SYSTEM_SETTING, AgentState, Summary
from engine.agent.tools import ToolBox
from engine.errors import InputError
from engine.llm.types import ChatMessage

SPOKEN = ("user", "assistant", "tool")
KEEP_AT_LEAST = 2  # turns never folded into the summary, however long they are


def estimate_tokens(text: str) -> int:
    return len(text) // 4 + 4


class ContextBuilder:
    def __init__(self, dialog: DialogStore, memory: LongTermMemory, state: AgentState,
                 tools: ToolBox | None, settings: object) -> None:
        self.dialog = dialog
        self.memory = memory
        self.state = state
        self.tools = tools
        self.settings = settings

    @property
    def budget(self) -> int:
        return int(getattr(self.settings, "context_tokens", 1024))

    def summary_for(self, path: Sequence[DialogNode]) -> Summary | None:
        """The conversation's summary, when it was written for this branch."""
        if not path:
            return None
        summary = self.state.summary(path[-1].conversation_id)
        if summary is None or summary.upto_node_id not in {node.id for node in path}:
            return None
        return summary

    def window(self, path: Sequence[DialogNode]) -> list[DialogNode]:
        """The spoken turns after the summary's last one."""
        summary = self.summary_for(path)
        turns = [node for node in path if node.role in SPOKEN]
        if summary is not None:
            ids = [node.id for node in turns]
            if summary.upto_node_id in ids:
                turns = turns[ids.index(summary.upto_node_id) + 1:]
        return turns

    def overflow(self, path: Sequence[DialogNode]) -> list[DialogNode]:
        """The oldest turns of the window to fold into the summary, so that the rest fits
        in half the budget (folding in halves keeps summaries rare); empty when it fits."""
        turns = self.window(path)
        sizes = [estimate_tokens(node.content) for node in turns]
        if sum(sizes) <= self.budget or len(turns) <= KEEP_AT_LEAST:
            return []
        kept, total = 0, 0
        for size in reversed(sizes):
            if kept >= KEEP_AT_LEAST and total + size > self.budget // 2:
                break
            kept += 1
            total += size
        return turns[:len(turns) - kept]

    def recent(self, path: Sequence[DialogNode]) -> list[DialogNode]:
        """The window's newest turns that fit the budget (the rest is summarised)."""
        turns = self.window(path)
        chosen: list[DialogNode] = []
        total = 0
        for node in reversed(turns):
            size = estimate_tokens(node.content)
            if chosen and total + size > self.budget:
                break
            chosen.append(node)
            total += size
        return list(reversed(chosen))

    def retrieve(self, path: Sequence[DialogNode], query: str) -> list[ScoredMemory]:
        """Memories for ``query``, leaving out the turns already in the prompt."""
        k = int(getattr(self.settings, "retrieve_k", 4))
        if k <= 0 or not len(self.memory):
            return []
        shown = {node.id for node in self.recent(path)}
        weights = getattr(self.settings, "weights", None)
        found = self.memory.search(query, k=k + len(shown) + 1, weights=weights)
        return [s for s in found if s.memory.node_id not in shown][:k]

    def fitted(self, path: Sequence[DialogNode], retrieved: Sequence[ScoredMemory],
               affect: Affect, pinned: bool, *, thought: DialogNode | None,
               adapters: Sequence[object], max_tokens: int) -> list[ChatMessage]:
        """The prompt, cut to fit the models' context: old turns go first, then the tool
        list, then the tasks and the summary, then memories from the least relevant up."""
        everything = len(retrieved)
        # (tool list, tasks and summary, memories kept), most complete first.
        variants = [(True, True, everything), (False, True, everything),
                    (False, False, everything)]
        variants += [(False, False, n) for n in range(everything - 1, -1, -1)]
        failure: InputError | None = None
        for tools, extras, kept in variants:
            messages = self.messages(path, retrieved[:kept], affect, pinned, thought=thought,
                                     tools=tools, extras=extras)
            try:
                return fit_messages(messages, adapters, max_tokens)
            except InputError as exc:
                failure = exc
        assert failure is not None
        raise failure

    def messages(self, path: Sequence[DialogNode], retrieved: Sequence[ScoredMemory],
                 affect: Affect, pinned: bool, *, thought: DialogNode | None = None,
                 tools: bool = True, extras: bool = True) -> list[ChatMessage]:
        system = [self._system_prompt()]
        if getattr(self.settings, "feelings", True):
            held = " (held there by the user)" if pinned else ""
            system.append(f"Your feeling now{held}: {affect.describe()}. "
                          + prompts.FEELING_INSTRUCTION)
        summary = self.summary_for(path) if extras else None
        if summary is not None:
            system.append(f"Summary of the conversation so far: {summary.text}")
        if retrieved:
            system.append("Things you remember:\n" + "\n".join(
                f"- [#{s.memory.id}] {s.memory.text}" for s in retrieved))
        tasks = self.state.tasks()[:3] if extras else []
        if tasks:
            system.append("Your open tasks, most urgent first:\n" + "\n".join(
                f"- #{t.id} (priority {t.priority}) {t.description}" for t in tasks))
        if tools and self.tools is not None and getattr(self.settings, "tools", True):
            listed = self.tools.describe() + "\n" + prompts.TASK_TOOL
            system.append(prompts.TOOL_INSTRUCTION.format(tools=listed))
        if thought is not None:
            system.append(f"Your private thoughts before this reply: {thought.content}")
        messages = [ChatMessage("system", "\n\n".join(system))]
        for node in self.recent(path):
            if node.role == "tool":
                # Chat templates of small models know no tool role: results come as input.
                messages.append(ChatMessage("user", f"Tool result: {node.content}"))
            else:
                messages.append(ChatMessage(node.role, node.content))
        return messages

    def _system_prompt(self) -> str:
        return str(self.state.setting(SYSTEM_SETTING, prompts.DEFAULT_SYSTEM_PROMPT))


def context_overflow(exc: InputError) -> bool:
    """Whether a refusal is about the prompt's length: a local model's
    ``ContextLengthError`` or a server's ``context_length_exceeded``, both worded so."""
    return "context" in str(exc)


def fit_messages(messages: list[ChatMessage], adapters: Sequence[object],
                 max_tokens: int) -> list[ChatMessage]:
    """Drop the oldest turns (never the system prompt or the last message) until the prompt
    and the reply fit every local model's context; remote models count for themselves."""
    limits = [(a, int(getattr(a, "context_length", 0))) for a in adapters
              if callable(getattr(a, "count_prompt_tokens", None))]
    if not limits:
        return messages
    fitted = list(messages)
    for adapter, context in limits:
        count = adapter.count_prompt_tokens  # type: ignore[attr-defined]
        while True:
            try:
                tokens = count(messages=fitted)
            except InputError:
                tokens = context
            if tokens + max_tokens <= context:
                break
            if len(fitted) <= 2:
                raise InputError(
                    f"the system prompt and the message are {tokens} tokens, and with the "
                    f"{max_tokens}-token reply that exceeds the model's {context}-token "
                    "context; shorten the system prompt or the message, or retrieve fewer "
                    "memories")
            del fitted[1]
    return fitted
