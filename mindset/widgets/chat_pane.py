"""The Chat pane: the chat agent's conversations, streamed, with branches and a side panel.

The conversation is the agent's persisted dialog tree (``engine.agent``): what the log
shows is read back from it after every turn, so branches survive a restart and a stopped
reply leaves only what the agent stored. The pane opens the most recent conversation;
``ctrl+n`` starts a new one (stored with its first message), ``/branch conversations`` and
``/branch open ID`` move between them. Lines starting with ``/`` are the agent's slash
commands (``/help``); their answers are notes in the log, shown until the conversation
changes. The side panel (:mod:`mindset.widgets.agent_side`) shows what the reply recalled,
read, felt and called.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Select, Static
from textual.worker import Worker, WorkerState

from engine.errors import MindsetError, one_line
from engine.facade import STUDENT
from engine.services.agent import (
    AgentEvent,
    Notice,
    Reflected,
    Replied,
    Retrieved,
    StepDone,
    Summarised,
    Thought,
    Token,
    ToolUsed,
    VisibleTurn,
)
from engine.services.chat import ChatMessage
from mindset.protocols import AgentAPI, ChatAPI, KnowledgeAPI
from mindset.widgets.agent_side import AgentSide, TurnReport
from mindset.widgets.chat_log import ChatLog, MessageBox, Note
from mindset.widgets.messages import ModelLoaded

PLACEHOLDER = "Message (enter to send; /help lists the commands)"
TITLE_CHARS = 48  # a conversation is titled by the start of its first message
CHAT_GROUP = "chat"


class ChatPane(Vertical):
    """Chat with the agent on the teacher, a student or a remote API."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+r", "regenerate", "Regenerate", id="chat.regenerate"),
        Binding("ctrl+o", "edit_turn", "Edit turn", id="chat.edit"),
        Binding("alt+left", "branch(-1)", "Previous branch", id="chat.branch_previous"),
        Binding("alt+right", "branch(1)", "Next branch", id="chat.branch_next"),
        Binding("escape", "stop", "Stop reply", id="chat.stop"),
        Binding("ctrl+n", "new_chat", "New chat", id="chat.new"),
        Binding("ctrl+g", "trace", "Trace reply", id="chat.trace"),
        Binding("ctrl+s", "sampling", "Sampling", id="chat.sampling"),
    ]

    def __init__(self, chat: ChatAPI, *, agent: AgentAPI, knowledge: KnowledgeAPI | None = None,
                 id: str | None = None) -> None:
        super().__init__(id=id)
        self.chat = chat
        self.agent = agent
        self.knowledge = knowledge
        self.conversation_id: str | None = None  # None: a new chat, stored on its first turn
        self.user_opened = False  # ctrl+n or /branch open came before the start-up read
        self.turns: list[VisibleTurn] = []  # the visible path, as last read
        self.notes: list[Note] = []  # command answers, after the turn they followed
        self.editing: VisibleTurn | None = None
        self.report: TurnReport | None = None  # what the last turn reported
        # This conversation's sampling; None: the model's defaults (engine.llm.defaults).
        self.temperature: float | None = None
        self.top_p: float | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(id="chat-top"):
            yield Select(
                [(target, target) for target in self.chat.chat_targets()],
                value=self.chat.chat_targets()[0], allow_blank=False, id="chat-model",
            )
            yield Static("", id="chat-state")
            yield Static("", id="chat-sampling")
        with Horizontal(id="chat-main"):
            yield ChatLog(id="chat-log")
            yield AgentSide(id="chat-side")
        yield Input(placeholder=PLACEHOLDER, id="chat-input")

    def on_mount(self) -> None:
        self.open_latest()

    @property
    def busy(self) -> bool:
        """Whether a turn or a command is running."""
        return any(w.node is self and w.group == CHAT_GROUP
                   and w.state in (WorkerState.PENDING, WorkerState.RUNNING)
                   for w in self.workers)

    def _target(self) -> str:
        return str(self.query_one("#chat-model", Select).value)

    # ------------------------------------------------------------------------ the log

    @work(group="chat-log", exit_on_error=False)
    async def open_latest(self) -> None:
        """The most recent conversation, so a restart continues where the chat stood."""
        try:
            conversations = await self.agent.conversations()
        except MindsetError as exc:
            self.notify(str(exc), title="chat", severity="error", timeout=10)
            return
        if conversations and self.conversation_id is None and not self.user_opened:
            self.conversation_id = conversations[0].id
        await self._show_path()

    async def _show_path(self, cut: str | None = None) -> None:
        """Read the visible path back from the store and show it (up to ``cut``)."""
        self.turns = await self.agent.turns(self.conversation_id) if self.conversation_id \
            else []
        await self.query_one(ChatLog).show(self.turns, self.notes, cut)
        self._show_state()

    def _show_state(self, text: str = "") -> None:
        self.query_one("#chat-state", Static).update(text)

    def _note(self, text: str) -> None:
        """Keep a command's answer after the turn now at the end of the visible path."""
        self.notes.append((self.turns[-1].node.id if self.turns else None, text))

    def _open(self, conversation_id: str | None) -> None:
        """Show another conversation (None: a new chat); its sampling starts afresh."""
        self.conversation_id, self.user_opened = conversation_id, True
        self.notes, self.editing, self.report = [], None, None
        self.temperature = self.top_p = None  # sampling is chosen per conversation
        self.query_one(AgentSide).reset()
        self.show_sampling()

    # ------------------------------------------------------------------------ sampling

    @on(ModelLoaded)
    def _model_loaded(self, message: ModelLoaded) -> None:
        select = self.query_one("#chat-model", Select)
        targets = self.chat.chat_targets()
        current = select.value
        select.set_options([(t, t) for t in targets])
        if current in targets:
            select.value = current
        self.show_sampling()

    @on(Select.Changed, "#chat-model")
    def _target_changed(self, _event: Select.Changed) -> None:
        self.show_sampling()

    @work(exclusive=True, group="chat-sampling", exit_on_error=False)
    async def show_sampling(self) -> None:
        """The sampling the next reply gets: this conversation's, or the model's defaults."""
        label = self.query_one("#chat-sampling", Static)
        try:
            defaults = await self.chat.sampling_defaults(self._target())
        except MindsetError:
            label.update("")
            return
        if not defaults and self.temperature is None and self.top_p is None:
            label.update("[dim]sampling: the API's defaults  ·  ctrl+s: change[/dim]")
            return
        temperature = self.temperature if self.temperature is not None \
            else defaults.get("temperature", 1.0)
        top_p = self.top_p if self.top_p is not None else defaults.get("top_p", 1.0)
        whose = "this chat's" if (self.temperature, self.top_p) != (None, None) \
            else "the model's defaults"
        label.update(f"[dim]temperature {temperature:g} · top-p {top_p:g} ({whose})  ·  "
                     "ctrl+s: change[/dim]")

    def action_sampling(self) -> None:
        from mindset.screens.ask import AskScreen

        def chosen(text: str | None) -> None:
            if text is None:
                return
            parts = text.replace(",", " ").split()
            if not parts:  # empty: back to the model's defaults
                self.temperature = self.top_p = None
                self.show_sampling()
                return
            try:
                temperature = float(parts[0])
                top_p = float(parts[1]) if len(parts) > 1 else None
            except ValueError:
                self.notify(f"give a temperature and optionally a top-p, such as 0.2 0.9; "
                            f"not {text!r}", severity="error")
                return
            try:  # the same ranges every request is held to
                self.chat.check_sampling(temperature, top_p)
            except MindsetError as exc:
                self.notify(str(exc), severity="error")
                return
            self.temperature, self.top_p = temperature, top_p
            self.show_sampling()

        self.app.push_screen(AskScreen("Sampling for this chat: temperature and top-p, such "
                                       "as 0.2 0.9 (0: greedy; empty: the model's defaults)",
                                       ""), chosen)

    # ------------------------------------------------------------------------ sending

    @on(Input.Submitted, "#chat-input")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        if self._refuse_while_busy():  # one turn at a time: the tree grows in order
            return
        event.input.value = ""
        if text.startswith("/"):
            self.run_command(text)
        elif self.editing is not None:
            node_id, self.editing = self.editing.node.id, None
            event.input.placeholder = PLACEHOLDER
            self.run_turn("edit", text, node_id)
        else:
            self.run_turn("respond", text)

    @work(exclusive=True, group=CHAT_GROUP, exit_on_error=False)
    async def run_turn(self, kind: str, text: str = "", node_id: str | None = None) -> None:
        """Say ``text`` (respond), replace the user turn ``node_id`` with it (edit), or
        answer again in place of the reply ``node_id`` (regenerate); stream the reply."""
        target = self._target()
        sampling = {"temperature": self.temperature, "top_p": self.top_p}
        before = len(self.turns)
        try:
            if kind == "respond":
                if self.conversation_id is None:
                    await self.agent.models(target)  # the model answers: store the chat
                    self.conversation_id = await self.agent.new_conversation(
                        text.splitlines()[0][:TITLE_CHARS])
                events = self.agent.respond(target, self.conversation_id, text, **sampling)
            elif kind == "edit" and node_id is not None:
                events = self.agent.edit(target, node_id, text, **sampling)
            elif node_id is not None:
                events = self.agent.regenerate(target, node_id, **sampling)
            else:
                return
            await self._show_path(cut=None if kind == "respond" else node_id)
            if text:
                await self.query_one(ChatLog).add_message("user", text)
            await self._play(target, events, reply=True)
        except MindsetError as exc:
            self.notify(str(exc), title="chat request failed", severity="error", timeout=10)
            await self._finish(target)
            chat_input = self.query_one("#chat-input", Input)
            if text and kind == "respond" and len(self.turns) == before \
                    and not chat_input.value:
                chat_input.value = text  # nothing was stored: the message is not lost
            return
        await self._finish(target)

    async def _play(self, target: str, events: AsyncIterator[AgentEvent], *,
                    reply: bool) -> None:
        """Show a turn's events as they come: the reply in the log, the rest aside. A
        command's turn (``/reflect``) gets a reply box only once it says something."""
        report = self.report = TurnReport(target)
        side = self.query_one(AgentSide)
        side.begin(recalling=reply)
        self._show_state(f"[i]{escape(target)} is replying…[/i]")
        stream = await self.query_one(ChatLog).reply_box(target) if reply else None
        models: list[str] = []
        try:
            async for event in events:
                if isinstance(event, Token):
                    if stream is None:
                        stream = await self.query_one(ChatLog).reply_box(target)
                    report.tokens += 1
                    await stream.write(event.text)
                else:
                    self._record(event, report)
                if isinstance(event, StepDone) and event.deferred and not models:
                    models = await self.agent.models(target)
                side.show(report, models)
        finally:
            if stream is not None:
                await stream.stop()

    def _record(self, event: AgentEvent, report: TurnReport) -> None:
        if isinstance(event, Retrieved):
            report.recalled = event.memories
        elif isinstance(event, StepDone):
            report.steps.append(event)
        elif isinstance(event, ToolUsed):
            report.tools.append(event)
        elif isinstance(event, Notice):
            report.notices.append(event.text)
            self.notify(event.text, title="agent", severity="warning", timeout=6)
        elif isinstance(event, Replied):
            report.affect, report.replied = event.affect, True
            # The agent records where the feeling came from; only a tag is "the reply".
            report.estimated = event.node.meta.get("feeling_source") not in (None, "reply")
        elif isinstance(event, Summarised):
            report.notices.append(f"folded {event.turns} older turns into the summary")
        elif isinstance(event, Thought):  # /inner on: the thought is shown, not spoken
            report.notices.append(f"thought before replying: {event.node.content}")
        elif isinstance(event, Reflected):
            lines = [f"reflected on: {q}" for q in event.questions]
            lines += [f"#{m.id} {m.text}" for m in event.memories]
            self._note("\n".join(lines) or "reflection found nothing to ask about yet")

    async def _finish(self, target: str) -> None:
        """After a turn or a command: the stored path, what the reply read and felt."""
        await self._show_path()
        side = self.query_one(AgentSide)
        side.show_memory_use(self.chat.last_memory_usage(target))
        if self.conversation_id is None:
            return
        try:
            held, pinned = await self.agent.feeling(target, self.conversation_id)
        except MindsetError:
            return  # the model is unavailable: its error was shown already
        side.show_feeling(self.report, held, pinned)

    @work(exclusive=True, group=CHAT_GROUP, exit_on_error=False)
    async def run_command(self, line: str) -> None:
        """A slash command; its answer becomes a note in the log."""
        target = self._target()
        name, *rest = line.split()
        if name.lower() == "/model" and rest:
            self.notify("choose the model in the switcher above the chat", severity="warning")
            return
        try:
            if self.conversation_id is None:
                self.conversation_id = await self.agent.new_conversation("workbench chat")
            outcome = await self.agent.command(target, self.conversation_id, line,
                                               temperature=self.temperature, top_p=self.top_p)
            if outcome.conversation_id != self.conversation_id:
                self._open(outcome.conversation_id)
            await self._show_path()
            if outcome.quit:
                self._note("/quit leaves the terminal chat; ctrl+q quits the workbench")
            elif outcome.text:
                self._note(f"{line}\n{outcome.text}")
            if outcome.turn is not None:
                await self._play(target, outcome.turn, reply=False)
        except MindsetError as exc:
            self.notify(str(exc), title=name, severity="error", timeout=10)
        await self._finish(target)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """A stopped or failed turn: show what the agent stored, and say why it failed."""
        worker = event.worker
        if worker.node is not self or worker.group != CHAT_GROUP:
            return
        if event.state == WorkerState.ERROR:
            self.notify(f"the chat failed: {one_line(worker.error)}" if worker.error
                        else "the chat failed", severity="error", timeout=10)
        if event.state in (WorkerState.CANCELLED, WorkerState.ERROR):
            self.reload(self._target())

    @work(exclusive=True, group="chat-log", exit_on_error=False)
    async def reload(self, target: str) -> None:
        if not self.busy:
            await self._finish(target)

    # ------------------------------------------------------------------------ actions

    def _chosen(self, role: str | None = None) -> VisibleTurn | None:
        """The focused turn (of ``role``), else the last one on the visible path."""
        focused = self.app.focused
        if isinstance(focused, MessageBox) and focused.turn is not None \
                and (role is None or focused.role == role):
            return focused.turn
        return next((t for t in reversed(self.turns)
                     if role is None or t.node.role == role), None)

    def _refuse_while_busy(self) -> bool:
        if self.busy:
            self.notify("a reply is on its way: wait for it, or press escape to stop it",
                        severity="warning")
        return self.busy

    def action_regenerate(self) -> None:
        if self._refuse_while_busy():
            return
        turn = self._chosen("assistant")
        if turn is None or turn.node.parent_id is None:
            self.notify("nothing to regenerate yet", severity="warning")
            return
        self.run_turn("regenerate", "", turn.node.id)

    def action_edit_turn(self) -> None:
        turn = self._chosen("user")
        if turn is None:
            self.notify("no message of yours to edit yet", severity="warning")
            return
        self.editing = turn
        chat_input = self.query_one("#chat-input", Input)
        chat_input.value = turn.node.content
        chat_input.placeholder = "Edit the message; enter sends it as a new branch " \
            "(escape: cancel)"
        chat_input.focus()

    def action_branch(self, step: int) -> None:
        if self._refuse_while_busy():
            return
        turn = self._chosen()
        if turn is None or turn.count < 2:  # the nearest fork from the end of the path
            turn = next((t for t in reversed(self.turns) if t.count > 1), None)
        if turn is None:
            self.notify("no other branch here", severity="information")
            return
        self.switch_branch(turn.node.id, step)

    @work(exclusive=True, group="chat-log", exit_on_error=False)
    async def switch_branch(self, node_id: str, step: int) -> None:
        try:
            await self.agent.switch(node_id, step)
        except MindsetError as exc:
            self.notify(str(exc), severity="error")
        await self._show_path()

    def action_trace(self) -> None:
        """Open the memory entries behind the student's last (or focused) reply."""
        turn = self._chosen("assistant")
        if turn is None or turn.node.parent_id is None or not turn.node.content:
            self.notify("no reply to trace yet: ask the student something first",
                        severity="warning")
            return
        if self.knowledge is None:
            self.notify("tracing is not available in this workbench", severity="error")
            return
        if self._target() != STUDENT:
            self.notify("tracing explains a student's memory: choose the student in the model "
                        "switcher and ask again", severity="warning", timeout=8)
            return
        from mindset.screens.trace import TraceScreen

        # The conversation as the user sees it, up to the reply: their turns and the replies.
        ids = [t.node.id for t in self.turns]
        before = self.turns[:ids.index(turn.node.id)] if turn.node.id in ids else []
        messages = [ChatMessage(t.node.role, t.node.content) for t in before
                    if t.node.role in ("user", "assistant")]
        self.app.push_screen(TraceScreen(self.knowledge, self.chat, messages,
                                         turn.node.content))

    def action_stop(self) -> None:
        if self.busy:
            self.workers.cancel_group(self, CHAT_GROUP)
        elif self.editing is not None:
            self.editing = None
            chat_input = self.query_one("#chat-input", Input)
            chat_input.value = ""
            chat_input.placeholder = PLACEHOLDER

    def action_new_chat(self) -> None:
        self.workers.cancel_group(self, CHAT_GROUP)
        self._open(None)
        self.reload(self._target())
