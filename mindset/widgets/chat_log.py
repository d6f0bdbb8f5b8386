"""The Chat pane's log: the visible path of a conversation, a reply as it streams, and the
notes slash commands leave (shown after the turn they followed, never stored)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.markup import escape
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Markdown, Static
from textual.widgets.markdown import MarkdownStream

from engine.services.agent import VisibleTurn

SHOWN_ROLES = ("user", "assistant", "tool")  # inner thoughts stay out of the log
Note = tuple[str | None, str]  # (the id of the turn it follows, None: the start; its text)


class MessageBox(Vertical, can_focus=True):
    """One turn: a header (role, model, branch position) and its Markdown body."""

    def __init__(self, role: str, content: str, *, turn: VisibleTurn | None = None,
                 model: str | None = None) -> None:
        super().__init__(classes=f"message {role}")
        self.role = role
        self.content = content
        self.turn = turn  # None while a turn is still being written
        self.model = model or (turn.node.model if turn is not None else None)

    @classmethod
    def of(cls, turn: VisibleTurn) -> MessageBox:
        return cls(turn.node.role, turn.node.content, turn=turn)

    def compose(self) -> ComposeResult:
        yield Static(self.header_text(), classes="message-header")
        yield Markdown(self.content, classes="message-body")

    def header_text(self) -> str:
        model = f"  [dim]{escape(self.model)}[/dim]" if self.model and self.role != "user" \
            else ""
        branch = ""
        if self.turn is not None and self.turn.count > 1:
            branch = f"  [dim]branch {self.turn.index}/{self.turn.count}  (alt+←/→)[/dim]"
        return f"[b]{self.role}[/b]{model}{branch}"


class NoteBox(Static):
    """A slash command's answer, as plain text."""

    DEFAULT_CSS = """
    NoteBox { color: $text-muted; border-left: thick $panel; }
    """

    def __init__(self, text: str) -> None:
        super().__init__(Text(text), classes="message system")


class ChatLog(VerticalScroll):
    """The turns of the visible path, with the notes that follow them."""

    async def show(self, turns: Sequence[VisibleTurn], notes: Sequence[Note],
                   cut: str | None = None) -> None:
        """Show ``turns`` up to, not including, the message ``cut`` (the one a running
        edit or regeneration replaces)."""
        boxes: list[Static | MessageBox] = [NoteBox(t) for a, t in notes if a is None]
        for turn in turns:
            if turn.node.id == cut:
                break
            if turn.node.role in SHOWN_ROLES:
                boxes.append(MessageBox.of(turn))
            boxes += [NoteBox(t) for a, t in notes if a == turn.node.id]
        await self.remove_children()
        await self.mount_all(boxes)
        self.scroll_end(animate=False)

    async def add_message(self, role: str, text: str) -> None:
        """A message not stored yet (the one being sent)."""
        await self.mount(MessageBox(role, text))
        self.scroll_end(animate=False)

    async def reply_box(self, model: str) -> MarkdownStream:
        """An empty reply at the end, and the stream that writes into it."""
        box = MessageBox("assistant", "", model=model)
        await self.mount(box)
        self.anchor()
        return Markdown.get_stream(box.query_one(Markdown))
