"""The chat's slash commands, shared by ``mindset chat`` and the workbench's Chat pane.

:func:`run_command` answers one ``/command`` line with text to show, the conversation to
continue (``/new`` and ``/branch open`` change it) and, for commands that make the agent
speak (``/branch edit``, ``/branch regen``, ``/reflect``), the turn's event stream.
Bad input raises :class:`~engine.errors.InputError` with one line saying what to type.
"""

from __future__ import annotations

import shlex
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from engine.agent.affect import parse_pin
from engine.agent.events import AgentEvent
from engine.agent.session import AgentSession
from engine.agent.tools import format_table, run_readonly_sql
from engine.errors import InputError

HELP = """\
/sql QUERY                 a read-only SELECT on the agent's database
/memory search TEXT        memories for TEXT, with their recency, importance and relevance
/memory recent [N]         the newest memories
/memory add TEXT           remember a fact
/state                     feeling, models, memory, tasks, cascade
/summary                   the conversation's rolling summary
/reflect                   reflect now on recent memories
/tasks [add TEXT | done ID | drop ID | priority ID N]
/branch [list | next | prev | edit TEXT | regen | export markdown|json [FILE]]
/branch conversations | /branch open ID | /new [TITLE]
/model [SPEC [LARGER_SPEC]]  show or change the models (a larger one makes a cascade)
/emotion [NAME | AROUSAL VALENCE | off]   show, pin or unpin the feeling
/inner [on | off]          inner dialogue before each reply
/system [TEXT | reset]     show or replace the system prompt
/quit                      leave"""

ModelSwitch = Callable[[str, str | None], Awaitable[str]]


@dataclass
class CommandOutcome:
    text: str
    conversation_id: str
    turn: AsyncIterator[AgentEvent] | None = None
    quit: bool = False


async def run_command(session: AgentSession, conversation_id: str, line: str, *,
                      switch_models: ModelSwitch | None = None) -> CommandOutcome:
    """Answer one slash command line."""
    name, _, rest = line.strip().partition(" ")
    name, rest = name.lower().lstrip("/"), rest.strip()
    agent = session.agent

    def said(text: str) -> CommandOutcome:
        return CommandOutcome(text, conversation_id)

    if name in ("help", "?"):
        return said(HELP)
    if name in ("quit", "exit"):
        return CommandOutcome("", conversation_id, quit=True)
    if name == "sql":
        if not rest:
            raise InputError("give a query: /sql SELECT * FROM agent_tasks")
        columns, rows = run_readonly_sql(session.paths.database, rest)
        return said(format_table(columns, rows) if columns else "(no rows)")
    if name == "memory":
        return said(_memory(session, conversation_id, rest))
    if name == "state":
        return said(_state(session, conversation_id))
    if name == "summary":
        summary = agent.state.summary(conversation_id)
        return said(f"{summary.text}\n(covers {summary.turns} turns)" if summary
                    else "no summary yet: the conversation still fits the context")
    if name == "reflect":
        return CommandOutcome("reflecting on recent memories...", conversation_id,
                              agent.reflect(conversation_id))
    if name == "tasks":
        return said(await _tasks(session, conversation_id, rest))
    if name == "branch":
        return _branch(session, conversation_id, rest)
    if name == "new":
        new = session.dialog.new_conversation(rest)
        return CommandOutcome(f"new conversation {new}", new)
    if name == "model":
        if not rest:
            return said("models: " + " → ".join(session.cascade.models)
                        + (f" (defers above {session.cascade.entropy_threshold:g} nats)"
                           if session.cascade.large else ""))
        if switch_models is None:
            raise InputError("models cannot be changed here")
        parts = rest.split()
        if len(parts) > 2:
            raise InputError("give one model, or a small and a larger one: /model SPEC [SPEC]")
        return said(await switch_models(parts[0], parts[1] if len(parts) == 2 else None))
    if name in ("emotion", "feeling"):
        return said(_emotion(session, conversation_id, rest))
    if name == "inner":
        if rest not in ("", "on", "off"):
            raise InputError("say /inner on or /inner off")
        if rest:
            agent.settings.inner_dialogue = rest == "on"
        return said(f"inner dialogue is {'on' if agent.settings.inner_dialogue else 'off'}")
    if name == "system":
        if rest == "reset":
            agent.set_system_prompt(None)
        elif rest:
            agent.set_system_prompt(rest)
        return said(f"system prompt: {agent.system_prompt}")
    raise InputError(f"unknown command /{name}; /help lists them")


def _memory(session: AgentSession, conversation_id: str, rest: str) -> str:
    verb, _, text = rest.partition(" ")
    text = text.strip()
    memory = session.memory
    if verb == "search":
        if not text:
            raise InputError("say what to look for: /memory search my sister's name")
        found = memory.search(text, k=8, weights=session.agent.settings.weights)
        if not found:
            return "no memories yet"
        return "\n".join(f"#{s.memory.id} {s.memory.kind:10} score {s.score:.2f}  recency "
                         f"{s.recency:.2f} importance {s.importance:.2f} relevance "
                         f"{s.relevance:.2f}  {s.memory.text[:100]}" for s in found)
    if verb == "recent":
        count = _whole(text or "10", "the count")
        return "\n".join(f"#{m.id} {m.kind:10} imp {m.importance:2}  {m.text[:100]}"
                         for m in memory.recent(count)) or "no memories yet"
    if verb == "add":
        if not text:
            raise InputError("say what to remember: /memory add the meeting is on Friday")
        added = memory.add(text, kind="fact", importance=7, conversation_id=conversation_id)
        return f"remembered #{added.id}"
    raise InputError("use /memory search TEXT, /memory recent [N] or /memory add TEXT")


def _state(session: AgentSession, conversation_id: str) -> str:
    agent = session.agent
    affect, pinned = agent.feeling(conversation_id)
    stats = session.cascade.stats
    lines = [
        f"conversation {conversation_id} ({len(session.dialog.path(conversation_id))} turns "
        "on this branch)",
        f"feeling: {affect.describe()}" + (" — pinned" if pinned else ""),
        "models: " + " → ".join(session.cascade.models),
        f"memories: {len(session.memory)} in {session.paths.table}",
        f"open tasks: {len(agent.state.tasks())}",
        f"inner dialogue: {'on' if agent.settings.inner_dialogue else 'off'}",
    ]
    if session.cascade.large is not None:
        lines.append(f"cascade: {sum(stats.calls.values())} calls, deferral rate "
                     f"{stats.rate():.0%}")
    return "\n".join(lines)


async def _tasks(session: AgentSession, conversation_id: str, rest: str) -> str:
    state = session.agent.state
    verb, _, text = rest.partition(" ")
    text = text.strip()
    if verb == "add":
        if not text:
            raise InputError("say what the task is: /tasks add write the report")
        task_id, priority = await session.agent.add_task(text, conversation_id=conversation_id)
        return f"task #{task_id} queued at priority {priority} (rated by the model)"
    if verb in ("done", "drop"):
        task = state.set_status(_whole(text, "the task id"), "done" if verb == "done"
                                else "dropped")
        return f"task #{task.id} {task.status}"
    if verb == "priority":
        parts = text.split()
        if len(parts) != 2:
            raise InputError("say which task and its priority: /tasks priority 3 8")
        task = state.set_priority(_whole(parts[0], "the task id"),
                                  _whole(parts[1], "the priority"))
        return f"task #{task.id} now at priority {task.priority}"
    if verb:
        raise InputError("use /tasks, /tasks add TEXT, /tasks done ID, /tasks drop ID or "
                         "/tasks priority ID N")
    tasks = state.tasks()
    return "\n".join(f"#{t.id} [{t.priority}] {t.description} ({t.source})"
                     for t in tasks) or "no open tasks"


def _branch(session: AgentSession, conversation_id: str, rest: str) -> CommandOutcome:
    dialog = session.dialog
    verb, _, text = rest.partition(" ")
    text = text.strip()
    path = dialog.path(conversation_id)

    def said(message: str, conversation: str = conversation_id) -> CommandOutcome:
        return CommandOutcome(message, conversation)

    if verb in ("", "list"):
        lines = []
        for node in path:
            index, count = dialog.position(node.id)
            mark = f" [branch {index}/{count}]" if count > 1 else ""
            lines.append(f"{node.role:9}{mark} {node.content[:70]}")
        return said("\n".join(lines) or "the conversation is empty")
    if verb in ("next", "prev"):
        forks = [n for n in path if dialog.position(n.id)[1] > 1]
        if not forks:
            raise InputError("this conversation has no other branch; /branch edit TEXT makes one")
        moved = dialog.switch(forks[-1].id, 1 if verb == "next" else -1)
        index, count = dialog.position(moved.id)
        return said(f"branch {index}/{count}: {moved.role}: {moved.content[:70]}")
    if verb == "edit":
        last = next((n for n in reversed(path) if n.role == "user"), None)
        if last is None:
            raise InputError("there is no turn of yours to edit yet")
        return CommandOutcome("", conversation_id, session.agent.edit(last.id, text))
    if verb == "regen":
        last = next((n for n in reversed(path) if n.role == "assistant"), None)
        if last is None:
            raise InputError("there is no reply to regenerate yet")
        return CommandOutcome("", conversation_id, session.agent.regenerate(last.id))
    if verb == "export":
        parts = shlex.split(text) if text else []
        fmt = parts[0] if parts else "markdown"
        exported = dialog.export(conversation_id, fmt)
        if len(parts) > 1:
            target = Path(parts[1]).expanduser()
            try:
                target.write_text(exported, encoding="utf-8")
            except OSError as exc:
                raise InputError(f"cannot write {target}: {exc.strerror}; pick another "
                                 "file") from None
            return said(f"wrote this branch to {target}")
        return said(exported)
    if verb == "conversations":
        return said("\n".join(f"{c.id}  {c.title or '(untitled)'}  {c.messages} messages"
                              for c in dialog.conversations()))
    if verb == "open":
        known = {c.id for c in dialog.conversations()}
        if text not in known:
            raise InputError(f"no conversation {text!r}; /branch conversations lists them")
        return said(f"opened {text}", text)
    raise InputError("use /branch list|next|prev|edit TEXT|regen|export FORMAT [FILE]|"
                     "conversations|open ID")


def _emotion(session: AgentSession, conversation_id: str, rest: str) -> str:
    agent = session.agent
    if rest == "off":
        agent.pin(None)
        return "the feeling follows the replies again"
    if rest:
        pinned = parse_pin(rest)
        agent.pin(pinned)
        return f"feeling pinned at {pinned.describe()}"
    affect, pinned_now = agent.feeling(conversation_id)
    return f"feeling: {affect.describe()}" + (" (pinned; /emotion off)" if pinned_now else "")


def _whole(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{what} must be a whole number, not {text!r}") from None
