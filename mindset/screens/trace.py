"""The trace screen: which memory entries a reply token used, and edits to them.

Opened from the Chat pane on a student's reply. It lists the memory reads behind one reply
token, ranked by influence (read weight × the entry's direct effect on that token's logit).
From there the user opens an entry in the Memory pane, scales or deletes it, inserts a fact
("this question → a new answer"), re-runs the question to see the answer change, and undoes
any edit. Every edit is journaled by the engine and survives a restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, Static

from engine.errors import MindsetError
from engine.facade import STUDENT
from engine.services.chat import ChatMessage
from engine.views import EditRecord, ReplyTrace, TracedRow
from mindset.protocols import ChatAPI, KnowledgeAPI
from mindset.screens.ask import AskScreen
from mindset.screens.messages import OpenMemoryEntry

COLUMNS = ("#", "layer", "entry", "slot", "weight", "influence", "label")


@dataclass
class FactRequest:
    subject: str
    answer: str
    layer: int | None


class TraceScreen(ModalScreen[None]):
    """The memory behind one reply of the student, and the edits made from it."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close", id="trace.close"),
        Binding("left_square_bracket", "token(-1)", "Previous token", id="trace.previous"),
        Binding("right_square_bracket", "token(1)", "Next token", id="trace.next"),
        Binding("o", "open_entry", "Open in Memory", id="trace.open"),
        Binding("s", "scale", "Scale entry", id="trace.scale"),
        Binding("x,delete", "delete", "Delete entry", id="trace.delete"),
        Binding("i", "insert", "Insert fact", id="trace.insert"),
        Binding("g", "rerun", "Re-run question", id="trace.rerun"),
        Binding("u", "undo", "Undo edit", id="trace.undo"),
        Binding("h", "history", "History", id="trace.history"),
    ]

    def __init__(self, knowledge: KnowledgeAPI, chat: ChatAPI,
                 messages: Sequence[ChatMessage], reply: str) -> None:
        super().__init__()
        self.knowledge = knowledge
        self.chat = chat
        self.messages = list(messages)
        self.reply = reply
        self.token = 0
        self.trace: ReplyTrace | None = None
        self.edits: list[EditRecord] = []
        self.answers: list[str] = []

    def compose(self) -> ComposeResult:
        with Vertical(id="trace-box"):
            question = self.messages[-1].content if self.messages else ""
            yield Static(f"[b]Memory behind the reply[/b] to: {escape(question)}",
                         id="trace-title")
            yield Static("tracing…", id="trace-tokens")
            table: DataTable[str] = DataTable(id="trace-rows", cursor_type="row",
                                              zebra_stripes=True)
            yield table
            yield Static("", id="trace-status")
            yield Static("[dim][ ]: token  ·  enter/o: open in Memory  ·  s: scale  ·  "
                         "x: delete  ·  i: insert a fact  ·  g: re-run  ·  u: undo  ·  "
                         "h: history  ·  esc: close[/dim]", id="trace-help")

    def on_mount(self) -> None:
        self.query_one("#trace-rows", DataTable).add_columns(*COLUMNS)
        self.load_trace()

    # ------------------------------------------------------------------------- tracing

    @work(exclusive=True, group="trace", exit_on_error=False)
    async def load_trace(self) -> None:
        try:
            trace = await self.knowledge.trace_reply(self.messages, self.reply, self.token)
        except MindsetError as exc:
            self.query_one("#trace-tokens", Static).update(f"[b]Not traced:[/b] {exc}")
            self.notify(str(exc), title="trace failed", severity="error", timeout=10)
            return
        self.trace = trace
        self._show_tokens(trace)
        self._show_rows(trace.rows)

    def _show_tokens(self, trace: ReplyTrace) -> None:
        pieces = []
        for index, token in enumerate(trace.tokens):
            text = escape(token.replace("\n", "⏎")) or "·"
            pieces.append(f"[reverse]{text}[/reverse]" if index == trace.token else text)
        layers = ", ".join(map(str, trace.layers[:4]))
        self.query_one("#trace-tokens", Static).update(
            f"token {trace.token + 1}/{len(trace.tokens)}: {''.join(pieces)}\n"
            f"[dim]logit {trace.logit:.2f}  ·  layers by influence: {layers}  ·  "
            "influence = read weight × the entry's direct effect on this token's logit[/dim]")

    def _show_rows(self, rows: list[TracedRow]) -> None:
        table = self.query_one("#trace-rows", DataTable)
        table.clear()
        for rank, row in enumerate(rows, start=1):
            entry = f"#{row.entry_id}" if row.entry_id is not None else "-"
            table.add_row(str(rank), str(row.layer), entry, str(row.slot), f"{row.weight:.3f}",
                          f"{row.influence:+.3f}", escape(row.label), key=str(rank))
        table.focus()

    def _current(self) -> TracedRow | None:
        if self.trace is None or not self.trace.rows:
            self.notify("no traced entry here", severity="warning")
            return None
        table = self.query_one("#trace-rows", DataTable)
        return self.trace.rows[min(max(table.cursor_row, 0), len(self.trace.rows) - 1)]

    def action_token(self, step: int) -> None:
        if self.trace is None:
            return
        new = self.token + step
        if 0 <= new < len(self.trace.tokens):
            self.token = new
            self.load_trace()

    # ------------------------------------------------------------------------- actions

    @on(DataTable.RowSelected, "#trace-rows")
    def _row_selected(self, _event: DataTable.RowSelected) -> None:
        self.action_open_entry()

    def action_open_entry(self) -> None:
        row = self._current()
        if row is None:
            return
        if row.entry_id is None:
            self.notify("this entry has no row in the Memory pane (its slot was deleted, or "
                        "the memory database is unavailable)", severity="warning")
            return
        self.app.post_message(OpenMemoryEntry(row.table, row.entry_id))
        self.dismiss(None)

    def action_scale(self) -> None:
        row = self._current()
        if row is None or not self._featural(row):
            return

        def scale(text: str | None) -> None:
            if text is None:
                return
            try:
                factor = float(text)
            except ValueError:
                self.notify(f"the factor must be a number, not {text!r}", severity="error")
                return
            self.run_edit("scale", row, factor)

        self.app.push_screen(AskScreen(f"Scale entry #{row.entry_id} (layer {row.layer}, "
                                       f"slot {row.slot}) by", "0.5"), scale)

    def action_delete(self) -> None:
        row = self._current()
        if row is not None and self._featural(row):
            self.run_edit("delete", row, 0.0)

    def _featural(self, row: TracedRow) -> bool:
        if row.kind != "featural":
            self.notify("associative entries are edited in the Memory pane (o opens it)",
                        severity="warning")
            return False
        return True

    @work(group="trace-edit", exit_on_error=False)
    async def run_edit(self, what: str, row: TracedRow, factor: float) -> None:
        try:
            if what == "delete":
                record = await self.knowledge.delete(row.layer, [row.slot])
            else:
                record = await self.knowledge.scale(row.layer, [row.slot], factor)
        except MindsetError as exc:
            self.notify(str(exc), title="edit not made", severity="error", timeout=10)
            return
        self._edited(record)

    def _edited(self, record: EditRecord) -> None:
        self.edits.append(record)
        self._status(f"edit {record.id}: {escape(record.what)} (layer {record.layer}, "
                     f"slot {', '.join(map(str, record.slots))})  ·  g: re-run  ·  u: undo")
        self.notify(f"edit {record.id} journaled: {record.what}", title="memory edited")
        self.load_trace()

    def _status(self, text: str) -> None:
        self.query_one("#trace-status", Static).update(text)

    def action_insert(self) -> None:
        def insert(request: FactRequest | None) -> None:
            if request is not None:
                self.run_insert(request)

        self.app.push_screen(FactScreen(self.messages[-1].content if self.messages else ""),
                             insert)

    @work(group="trace-edit", exit_on_error=False)
    async def run_insert(self, request: FactRequest) -> None:
        self._status(f"inserting “{escape(request.answer)}” (fitting the new value)…")
        try:
            record = await self.knowledge.insert_fact(self.messages, request.subject,
                                                      request.answer, layer=request.layer)
        except MindsetError as exc:
            self._status("")
            self.notify(str(exc), title="fact not inserted", severity="error", timeout=12)
            return
        self._edited(record)

    @work(exclusive=True, group="trace-rerun", exit_on_error=False)
    async def action_rerun(self) -> None:
        self._status("re-running the question (greedy)…")
        pieces: list[str] = []
        try:
            async for piece in self.chat.stream_chat(STUDENT, self.messages, max_tokens=48,
                                                     temperature=0.0):
                pieces.append(piece)
        except MindsetError as exc:
            self._status("")
            self.notify(str(exc), title="re-run failed", severity="error", timeout=10)
            return
        answer = "".join(pieces).strip()
        self.answers.append(answer)
        self._status(f"[b]before:[/b] {escape(self.reply.strip()[:200])}\n"
                     f"[b]now:[/b]    {escape(answer[:200])}")

    @work(group="trace-edit", exit_on_error=False)
    async def action_undo(self, edit_id: int | None = None) -> None:
        try:
            record = await self.knowledge.undo(edit_id)
        except MindsetError as exc:
            self.notify(str(exc), title="nothing undone", severity="warning", timeout=10)
            return
        self._status(f"edit {record.undoes} undone (journal entry {record.id})  ·  g: re-run")
        self.notify(f"edit {record.undoes} undone", title="memory edited")
        self.load_trace()

    @work(group="trace-history", exit_on_error=False)
    async def action_history(self) -> None:
        try:
            records = await self.knowledge.history()
        except MindsetError as exc:
            self.notify(str(exc), title="no history", severity="error")
            return

        def chosen(edit_id: int | None) -> None:
            if edit_id is not None:
                self.action_undo(edit_id)

        self.app.push_screen(HistoryScreen(records), chosen)

    def action_close(self) -> None:
        self.dismiss(None)


class FactScreen(ModalScreen[FactRequest | None]):
    """Insert a fact: after this question, the student should answer this."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Insert"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(f"[b]Insert a fact[/b] for: {escape(self.question)}")
            yield Label("subject: words of the question the fact is about (empty: the key "
                        "is the question's end, which is less specific)")
            yield Input("", id="fact-subject")
            yield Label("new answer")
            yield Input("", id="fact-answer")
            yield Label("memory layer (empty: the one the trace ranks highest)")
            yield Input("", id="fact-layer")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Insert (ctrl+s)", variant="primary", id="fact-save")
                yield Button("Cancel (esc)", id="fact-cancel")

    @on(Button.Pressed, "#fact-save")
    @on(Input.Submitted)
    def action_save(self) -> None:
        subject = self.query_one("#fact-subject", Input).value.strip()
        answer = self.query_one("#fact-answer", Input).value.strip()
        layer_text = self.query_one("#fact-layer", Input).value.strip()
        if subject and subject not in self.question:
            self.notify("the subject must be words of the question", severity="warning")
            return
        if not answer:
            self.notify("type the new answer", severity="warning")
            return
        if layer_text and not layer_text.isdigit():
            self.notify(f"the layer must be a number, not {layer_text!r}", severity="error")
            return
        self.dismiss(FactRequest(subject, answer, int(layer_text) if layer_text else None))

    @on(Button.Pressed, "#fact-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class HistoryScreen(ModalScreen[int | None]):
    """The student's edit journal; enter undoes the chosen edit."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Close")]

    def __init__(self, records: list[EditRecord]) -> None:
        super().__init__()
        self.records = records

    def compose(self) -> ComposeResult:
        with Vertical(id="history-box"):
            yield Static(f"[b]Edit history[/b]: {len(self.records)} journal entries  ·  "
                         "enter: undo the chosen edit  ·  esc: close")
            table: DataTable[str] = DataTable(id="history-rows", cursor_type="row")
            yield table

    def on_mount(self) -> None:
        table = self.query_one("#history-rows", DataTable)
        table.add_columns("id", "time", "layer", "slots", "what", "state")
        for record in self.records:
            state = (f"undone by {record.undone_by}" if record.undone_by is not None
                     else "" if record.op == "undo" else "applied")
            table.add_row(str(record.id), record.time, str(record.layer),
                          ",".join(map(str, record.slots)), escape(record.what), state,
                          key=str(record.id))
        table.focus()

    @on(DataTable.RowSelected, "#history-rows")
    def _chosen(self, event: DataTable.RowSelected) -> None:
        self.dismiss(int(str(event.row_key.value)))

    def action_cancel(self) -> None:
        self.dismiss(None)
