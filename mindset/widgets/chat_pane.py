"""The Chat pane: streaming replies, a model switcher, branches, and the memory side panel."""

from __future__ import annotations

from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Input, Markdown, Select, Static

from engine.errors import MindsetError
from engine.facade import STUDENT
from engine.services.chat import ChatMessage
from mindset.protocols import ChatAPI, KnowledgeAPI
from mindset.widgets.chat_tree import ChatTree, Turn
from mindset.widgets.messages import ModelLoaded


class MessageBox(Vertical, can_focus=True):
    """One turn: a header (role, branch position) and its Markdown body."""

    def __init__(self, turn: Turn) -> None:
        super().__init__(classes=f"message {turn.role}")
        self.turn = turn

    def compose(self) -> ComposeResult:
        yield Static(self.header_text(), classes="message-header")
        yield Markdown(self.turn.content, classes="message-body")

    def header_text(self) -> str:
        index, count = self.turn.position()
        branch = f"  [dim]branch {index}/{count}  (alt+←/→)[/dim]" if count > 1 else ""
        return f"[b]{self.turn.role}[/b]{branch}"


class ChatPane(Vertical):
    """Chat with the teacher, a student or a remote API."""

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

    def __init__(self, chat: ChatAPI, *, knowledge: KnowledgeAPI | None = None,
                 id: str | None = None) -> None:
        super().__init__(id=id)
        self.chat = chat
        self.knowledge = knowledge
        self.conversation = ChatTree()
        self.editing: Turn | None = None
        self.max_tokens = 128
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
            yield VerticalScroll(id="chat-log")
            with Vertical(id="chat-side"):
                yield Static("[b]memory used[/b]", classes="side-title")
                yield Static(
                    "Chat with a student to see which memory entries its reply used most.",
                    id="chat-memory",
                )
        yield Input(placeholder="Message (enter to send)", id="chat-input")

    # ------------------------------------------------------------------------- rendering

    async def _render_path(self) -> None:
        log = self.query_one("#chat-log", VerticalScroll)
        await log.remove_children()
        await log.mount_all([MessageBox(turn) for turn in self.conversation.path()])
        log.scroll_end(animate=False)

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
        target = str(self.query_one("#chat-model", Select).value)
        try:
            defaults = await self.chat.sampling_defaults(target)
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

    # -------------------------------------------------------------------------- sending

    @on(Input.Submitted, "#chat-input")
    async def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            return
        event.input.value = ""
        if self.editing is not None:
            turn = self.conversation.branch_from(self.editing, text)
            self.editing = None
            event.input.placeholder = "Message (enter to send)"
        else:
            turn = self.conversation.append("user", text)
        await self._render_path()
        self.reply_to(turn)

    @work(exclusive=True, group="chat", exit_on_error=False)
    async def reply_to(self, user_turn: Turn, replace: Turn | None = None) -> None:
        """Stream the model's reply to ``user_turn`` into a new assistant turn."""
        target = str(self.query_one("#chat-model", Select).value)
        history = [*self.conversation.history_before(user_turn), user_turn]
        messages = [ChatMessage(t.role, t.content) for t in history]
        reply = (self.conversation.branch_from(replace, "") if replace is not None
                 else self.conversation.add(user_turn, "assistant", ""))
        await self._render_path()
        box = self.query(MessageBox).last()
        body = box.query_one(Markdown)
        log = self.query_one("#chat-log", VerticalScroll)
        log.anchor()
        state = self.query_one("#chat-state", Static)
        state.update(f"[i]{target} is replying…[/i]")
        stream = Markdown.get_stream(body)
        try:
            async for piece in self.chat.stream_chat(
                target, messages, max_tokens=self.max_tokens, temperature=self.temperature,
                top_p=self.top_p,
            ):
                reply.content += piece
                await stream.write(piece)
        except MindsetError as exc:
            self.notify(str(exc), title="chat request failed", severity="error", timeout=10)
            if not reply.content:
                reply.content = f"*(no reply: {exc})*"
                await stream.write(reply.content)
        finally:
            await stream.stop()
            state.update("")
        self._show_memory_usage(target)

    def _show_memory_usage(self, target: str) -> None:
        panel = self.query_one("#chat-memory", Static)
        usage = self.chat.last_memory_usage(target)
        if usage is None:
            panel.update("Memory use is shown for student models with memory layers.")
            return
        if not usage:
            panel.update("The reply used no memory entries.")
            return
        lines = [f"{u.table} #{u.id}  {u.weight:.2f}  {u.label}" for u in usage]
        panel.update("\n".join(lines))

    # -------------------------------------------------------------------------- actions

    def _focused_turn(self, role: str | None = None) -> Turn | None:
        focused = self.app.focused
        if isinstance(focused, MessageBox) and (role is None or focused.turn.role == role):
            return focused.turn
        for turn in reversed(self.conversation.path()):
            if role is None or turn.role == role:
                return turn
        return None

    def action_regenerate(self) -> None:
        turn = self._focused_turn("assistant")
        if turn is None or turn.parent is None:
            self.notify("nothing to regenerate yet", severity="warning")
            return
        self.reply_to(turn.parent, replace=turn)

    def action_edit_turn(self) -> None:
        turn = self._focused_turn("user")
        if turn is None:
            self.notify("no message of yours to edit yet", severity="warning")
            return
        self.editing = turn
        chat_input = self.query_one("#chat-input", Input)
        chat_input.value = turn.content
        chat_input.placeholder = "Edit the message; enter sends it as a new branch"
        chat_input.focus()

    async def action_branch(self, step: int) -> None:
        turn = self._focused_turn()
        # The nearest turn on the path that has siblings to move between.
        candidates = [t for t in reversed(self.conversation.path()) if len(t.siblings()) > 1]
        if turn is None or len(turn.siblings()) < 2:
            turn = candidates[0] if candidates else None
        if turn is None:
            self.notify("no other branch here", severity="information")
            return
        self.conversation.switch(turn, step)
        await self._render_path()

    def action_trace(self) -> None:
        """Open the memory entries behind the student's last (or focused) reply."""
        turn = self._focused_turn("assistant")
        if turn is None or turn.parent is None or not turn.content:
            self.notify("no reply to trace yet: ask the student something first",
                        severity="warning")
            return
        if self.knowledge is None:
            self.notify("tracing is not available in this workbench", severity="error")
            return
        if str(self.query_one("#chat-model", Select).value) != STUDENT:
            self.notify("tracing explains a student's memory: choose the student in the model "
                        "switcher and ask again", severity="warning", timeout=8)
            return
        from mindset.screens.trace import TraceScreen

        history = [*self.conversation.history_before(turn.parent), turn.parent]
        messages = [ChatMessage(t.role, t.content) for t in history]
        self.app.push_screen(TraceScreen(self.knowledge, self.chat, messages, turn.content))

    def action_stop(self) -> None:
        self.workers.cancel_group(self, "chat")

    async def action_new_chat(self) -> None:
        self.workers.cancel_group(self, "chat")
        self.conversation = ChatTree()
        self.temperature = self.top_p = None  # sampling is chosen per conversation
        self.show_sampling()
        await self._render_path()
