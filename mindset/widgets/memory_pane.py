"""The Memory pane: browse, search and edit a memory table, page by page from the database."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from rich.cells import cell_len
from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Input, Select, Static

from engine.errors import MindsetError
from engine.facade import STUDENT
from engine.views import DeletedEntries, EntryView
from mindset.protocols import MemoryAPI
from mindset.screens.entry_edit import EntryEdit, EntryEditScreen, EntryInsertScreen, NewEntry
from mindset.widgets.messages import ModelLoaded

PAGE_SIZE = 50
# Actions a featural table refuses (its slots are fixed; reading writes associative entries).
DEAD_NORM = 1e-6  # as the engine counts dead values
FIXED_SLOT_REFUSALS = ("insert", "evict", "recombine", "read_notes")
RAW = "raw: "  # marks promotes read straight through the output embedding (no annotations)
COLUMNS = ("id", "label", "access", "last access", "norm", "promotes")
# What the columns mean, shown above them: the first view should not need the manual.
COLUMN_HELP = ("[dim]access: reads by the model (browsing does not count) · norm: size of "
               "the value, 0 = dead · promotes: tokens it pushes up (raw: projected; "
               "measured: a annotates) · s: sort[/dim]")
ORDERS = ("norm", "usage", "id")  # s cycles through them; featural tables open by norm
ORDER_WORDS = {"norm": "largest value first", "usage": "most read first", "id": "by id"}
DEAD = "dead · "


class MemoryPane(Vertical):
    """One table at a time; only the visible page is read from the database."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("e", "edit", "Edit entry", id="memory.edit"),
        Binding("x,delete", "delete", "Delete entry", id="memory.delete"),
        Binding("u", "undo", "Undo delete", id="memory.undo"),
        Binding("i", "insert", "Insert entry", id="memory.insert"),
        Binding("slash", "search", "Search", id="memory.search"),
        Binding("n", "page(1)", "Next page", id="memory.next_page"),
        Binding("p", "page(-1)", "Previous page", id="memory.previous_page"),
        Binding("v", "evict", "Run eviction", id="memory.evict"),
        Binding("m", "recombine", "Run recombination", id="memory.recombine"),
        Binding("r", "refresh", "Refresh", id="memory.refresh"),
        Binding("s", "sort", "Sort", id="memory.sort"),
        Binding("a", "annotate", "Annotate from a text", id="memory.annotate"),
        Binding("l", "read_notes", "Read notes into it", id="memory.read_notes"),
        # Edits of a featural table change the live student only, until it is saved.
        Binding("w", "save_student", "Save student", id="memory.save_student", show=False),
    ]

    def __init__(self, memory: MemoryAPI, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.memory = memory
        self.table_name: str | None = None
        self.page_offset = 0
        self.table_size = 0
        self.search_results: list[EntryView] | None = None
        self.rows: list[EntryView] = []
        self.undo_stack: list[DeletedEntries] = []
        self.order: str | None = None  # None: the table's own default (see _order)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Keys are offered only where they apply: a featural table has fixed slots."""
        if action in FIXED_SLOT_REFUSALS and self.table_name is not None:
            return not self.memory.fixed_slots(self.table_name)
        return True

    def compose(self) -> ComposeResult:
        with Horizontal(id="memory-top"):
            yield Select([], prompt="choose a table", id="memory-table")
            yield Input(placeholder="/ search: text (through the model) or #id",
                        id="memory-search")
        yield Static("", id="memory-stats")
        yield Static(COLUMN_HELP, id="memory-columns")
        table: DataTable[str] = DataTable(id="memory-rows", cursor_type="row", zebra_stripes=True)
        yield table
        yield Static("", id="memory-detail")
        yield Static("", id="memory-page", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#memory-rows", DataTable).add_columns(*COLUMNS)
        self.load_tables()

    # ------------------------------------------------------------------------ loading

    @work(exclusive=True, group="memory-tables", exit_on_error=False)
    async def load_tables(self) -> None:
        status = self.memory.availability()
        if not status.ok:
            self._show_missing(status.reason)
            return
        try:
            names = await self.memory.table_names()
        except MindsetError as exc:
            self._show_missing(str(exc))
            self.notify(str(exc), title="memory database", severity="error", timeout=10)
            return
        self._show_warnings()
        select = self.query_one("#memory-table", Select)
        select.set_options([(name, name) for name in names])
        if not names:
            self.query_one("#memory-stats", Static).update(
                "No memory tables yet: distil a student (Training pane, or F9 for the quick "
                "start) and its tables appear here."
            )
            return
        if self.table_name not in names:
            self.table_name = names[0]
        if select.value == self.table_name:
            self.load_page()  # no change event: refresh the rows ourselves
        select.value = self.table_name

    def _show_warnings(self) -> None:
        """What reconciling a student's tables with it found, once each (nothing of the
        user's is dropped, but they should know the student on disk disagrees)."""
        for message in self.memory.take_warnings():
            table, _, text = message.partition(": ")
            self.notify(text or message, title=f"memory table {table}" if text else "memory",
                        severity="warning", timeout=20)

    def _show_missing(self, reason: str) -> None:
        self.query_one("#memory-stats", Static).update(f"[b]Memory unavailable:[/b] {reason}")

    @on(Select.Changed, "#memory-table")
    def _table_chosen(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self.table_name = event.value
            self.page_offset = 0
            self.search_results = None
            self.order = None
            self.load_page()

    @work(exclusive=True, group="memory-page", exit_on_error=False)
    async def load_page(self) -> None:
        if self.table_name is None:
            return
        self.refresh_bindings()  # the footer offers what this table takes
        try:
            stats = await self.memory.table_stats(self.table_name)
            if self.search_results is not None:
                rows = self.search_results
            else:
                rows = await self.memory.table_page(self.table_name, self.page_offset, PAGE_SIZE,
                                                    order=self._order())
        except MindsetError as exc:
            self.notify(str(exc), title="memory", severity="error", timeout=10)
            return
        self.table_size = int(stats.get("rows", 0) or 0)
        self._show_stats(stats)
        self._show_rows(rows)

    def _show_stats(self, stats: dict[str, Any]) -> None:
        rows = int(stats.get("rows", 0) or 0)
        never = int(stats.get("never_accessed", 0) or 0)
        index = stats.get("index")
        index_kind = index.get("kind", index.get("type", "")) if isinstance(index, dict) else index
        parts = [
            f"size [b]{rows}[/b]",
            f"capacity [b]{stats.get('capacity') or 'unbounded'}[/b]",
            f"used [b]{rows - never}[/b] ({(rows - never) / rows:.0%})" if rows else "used 0",
            f"accesses [b]{stats.get('total_accesses', 0)}[/b]",
            f"dims {stats.get('key_dim')}→{stats.get('value_dim')}",
        ]
        if index_kind:
            parts.append(f"index {index_kind}")
        dead = int(stats.get("dead", 0) or 0)
        if dead:
            parts.append(f"dead [b]{dead}[/b] (norm 0, marked)")
        parts.append(f"sorted {ORDER_WORDS[self._order()]}")
        self.query_one("#memory-stats", Static).update("  ·  ".join(parts))

    def _order(self) -> str:
        """The chosen sort, else the table's default: a featural table's largest values first
        (its dead slots last), an associative table's in the order they were written."""
        if self.order is not None:
            return self.order
        name = self.table_name or ""
        # By name too: the pane may show a mirror before its student has loaded.
        featural = bool(name) and (self.memory.fixed_slots(name) or name.endswith("_featural"))
        return "norm" if featural else "id"

    def action_sort(self) -> None:
        """Cycle the sort: largest value, most read, id."""
        self.order = ORDERS[(ORDERS.index(self._order()) + 1) % len(ORDERS)]
        self.page_offset = 0
        self.search_results = None
        self.notify(f"sorted {ORDER_WORDS[self.order]}", timeout=3)
        self.load_page()

    def _show_rows(self, rows: list[EntryView]) -> None:
        current = self._current()  # the cursor stays on its entry when the order moves it
        self.rows = rows
        table = self.query_one("#memory-rows", DataTable)
        cursor = table.cursor_row
        if current is not None:
            cursor = next((i for i, row in enumerate(rows) if row.id == current.id), cursor)
        cells = [(str(row.id), escape(_label(row)), str(row.access_count), row.last_access,
                  f"{row.norm:.3f}", escape(_promotes(row))) for row in rows]
        table.clear(columns=True)
        # Columns sized to the page's content here, not when the table next idles: a frame
        # drawn before that (a busy app) would show the new rows cut to the old widths.
        for index, label in enumerate(COLUMNS):
            width = max([cell_len(label)] + [cell_len(cell[index]) for cell in cells])
            table.add_column(label, width=width)
        for row, cell in zip(rows, cells, strict=True):
            table.add_row(*cell, key=str(row.id))
        if rows:
            table.move_cursor(row=min(cursor, len(rows) - 1))
        self._show_detail()
        page = self.query_one("#memory-page", Static)
        if self.search_results is not None:
            page.update(f"{len(rows)} search results  ·  r: back to the table")
        else:
            last = min(self.page_offset + len(rows), self.table_size)
            first = self.page_offset + 1 if rows else 0
            page.update(f"rows {first}-{last} of {self.table_size}  ·  n/p: next/previous page")

    @on(DataTable.RowHighlighted, "#memory-rows")
    def _row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    def _show_detail(self) -> None:
        """The highlighted entry's triggers and what its promotes column means."""
        entry = self._current()
        detail = self.query_one("#memory-detail", Static)
        if entry is None:
            detail.update("")
            return
        if entry.promotes_measured:
            lines = [f"[b]#{entry.id}[/b] {escape(_label(entry))}  ·  promotes (measured: the "
                     f"logit drop when its read is removed): {escape(' '.join(entry.top_tokens))}"]
            lines += [f"  [dim]trigger:[/dim] {escape(t)}" for t in entry.triggers[:3]]
        elif entry.slot is not None:
            lines = [f"[b]#{entry.id}[/b] slot {entry.slot}  ·  not annotated: promotes shows the "
                     "raw projection of its value onto the vocabulary; a: annotate the layer "
                     "from a text (its triggers, measured promotes and labels)"]
        elif entry.source:
            lines = [f"[b]#{entry.id}[/b] {escape(entry.label)}  ·  read from "
                     f"{escape(entry.source)}: its value makes the model expect what "
                     "followed this context"]
        else:
            lines = [f"[b]#{entry.id}[/b] {escape(entry.label)}  ·  promotes: the raw "
                     "projection of its value onto the vocabulary"]
        detail.update("\n".join(lines))

    @on(ModelLoaded)
    def _model_loaded(self, message: ModelLoaded) -> None:
        if message.role == STUDENT:
            self.load_tables()  # a student brings (or mirrors) its memory tables
        elif self.table_name is not None:
            self.load_page()  # the "promotes" column needs a model; fill it in now

    # ------------------------------------------------------------------------ actions

    def _current(self) -> EntryView | None:
        table = self.query_one("#memory-rows", DataTable)
        if not self.rows or table.cursor_row < 0 or table.cursor_row >= len(self.rows):
            return None
        return self.rows[table.cursor_row]

    def action_page(self, step: int) -> None:
        if self.search_results is not None:
            return
        new_offset = self.page_offset + step * PAGE_SIZE
        if new_offset < 0 or (step > 0 and new_offset >= self.table_size):
            return
        self.page_offset = new_offset
        self.load_page()

    def action_refresh(self) -> None:
        self.search_results = None
        self.load_tables()
        self.load_page()

    @work(exclusive=True, group="memory-save", exit_on_error=False)
    async def action_save_student(self) -> None:
        """Write the live student, edits included, back to its student directory."""
        try:
            directory = await self.memory.save_student()
        except MindsetError as exc:
            self.notify(str(exc), title="student not saved", severity="error", timeout=12)
            return
        self.notify(f"student saved to {directory}", title="student saved")

    def show_entry(self, table: str, entry_id: int) -> None:
        """Show the entry ``entry_id`` of ``table`` (opened from a trace)."""
        self.table_name = table
        select = self.query_one("#memory-table", Select)
        with select.prevent(Select.Changed):
            select.value = table
        self.query_one("#memory-search", Input).value = f"#{entry_id}"
        self.run_search(f"#{entry_id}")

    def _ask_path(self, question: str, then: Callable[[str, str], object]) -> None:
        """Ask for a path, then run ``then(table, path)`` on the table chosen now."""
        if self.table_name is None:
            self.notify("choose a table first", severity="warning")
            return
        from mindset.screens.ask import AskScreen

        table_name = self.table_name

        def chosen(path: str | None) -> None:
            if path:
                then(table_name, path)

        self.app.push_screen(AskScreen(question), chosen)

    def action_annotate(self) -> None:
        self._ask_path("Annotate this layer's entries from a text file (their triggers, "
                       "measured promotes, labels): path", self.annotate)

    def action_read_notes(self) -> None:
        self._ask_path("Read a text file or a folder of notes into this memory (an entry "
                       "per new context): path", self.read_notes)

    @work(group="memory-write", exit_on_error=False)
    async def annotate(self, table_name: str, path: str) -> None:
        self.notify(f"annotating {table_name} from {path}…", title="annotate")
        try:
            count = await self.memory.annotate(table_name, path)
        except MindsetError as exc:
            self.notify(str(exc), title="not annotated", severity="error", timeout=12)
            return
        self.notify(f"{count} entries of {table_name} annotated", title="annotate")
        self.load_page()

    @work(group="memory-write", exit_on_error=False)
    async def read_notes(self, table_name: str, path: str) -> None:
        self.notify(f"reading {path} into {table_name}…", title="learning by reading")
        try:
            summary = await self.memory.read_notes(table_name, path)
        except MindsetError as exc:
            self.notify(str(exc), title="not read", severity="error", timeout=12)
            return
        self.notify(summary.describe(), title="learning by reading", timeout=10)
        self.load_page()

    def action_search(self) -> None:
        self.query_one("#memory-search", Input).focus()

    @on(Input.Submitted, "#memory-search")
    def _search_submitted(self, event: Input.Submitted) -> None:
        self.run_search(event.value.strip())

    @work(exclusive=True, group="memory-page", exit_on_error=False)
    async def run_search(self, text: str) -> None:
        if self.table_name is None or not text:
            self.search_results = None
            self.load_page()
            return
        try:
            if text.lstrip("#").isdigit():
                rows = await self.memory.find_entry(self.table_name, int(text.lstrip("#")))
            else:
                rows = await self.memory.search_text(self.table_name, text)
        except MindsetError as exc:
            self.notify(str(exc), title="search failed", severity="error")
            return
        self.search_results = rows
        self._show_rows(rows)
        self.query_one("#memory-rows", DataTable).focus()

    def action_edit(self) -> None:
        entry = self._current()
        if entry is None or self.table_name is None:
            return
        table_name = self.table_name

        def apply(edit: EntryEdit | None) -> None:
            if edit is not None:
                self.apply_edit(table_name, entry.id, edit)

        self.app.push_screen(EntryEditScreen(entry), apply)

    @work(group="memory-write", exit_on_error=False)
    async def apply_edit(self, table_name: str, entry_id: int, edit: EntryEdit) -> None:
        try:
            await self.memory.update_entry(
                table_name, entry_id, label=edit.label, tags=edit.tags, scale=edit.scale,
                value=edit.value_numbers, value_text=edit.value_text,
            )
        except (MindsetError, ValueError) as exc:
            self.notify(str(exc), title="edit not saved", severity="error", timeout=10)
            return
        self.notify(f"entry #{entry_id} saved")
        await self._refresh_rows()

    async def _refresh_rows(self) -> None:
        if self.search_results is not None and self.table_name is not None:
            ids = [row.id for row in self.search_results]
            refreshed: list[EntryView] = []
            for entry_id in ids:
                refreshed.extend(await self.memory.find_entry(self.table_name, entry_id))
            self.search_results = refreshed
        self.load_page()

    @work(group="memory-write", exit_on_error=False)
    async def action_delete(self) -> None:
        entry = self._current()
        if entry is None or self.table_name is None:
            return
        try:
            deleted = await self.memory.delete_entries(self.table_name, [entry.id])
        except MindsetError as exc:
            self.notify(str(exc), title="delete failed", severity="error")
            return
        self.undo_stack.append(deleted)
        if self.search_results is not None:
            self.search_results = [r for r in self.search_results if r.id != entry.id]
        self.notify(f"entry #{entry.id} deleted  ·  u: undo")
        self.load_page()

    @work(group="memory-write", exit_on_error=False)
    async def action_undo(self) -> None:
        if not self.undo_stack:
            self.notify("nothing to undo", severity="information")
            return
        deleted = self.undo_stack.pop()
        try:
            new_ids = await self.memory.restore_entries(deleted)
        except MindsetError as exc:
            self.undo_stack.append(deleted)
            self.notify(str(exc), title="undo failed", severity="error")
            return
        self.notify(f"restored {len(new_ids)} entr{'y' if len(new_ids) == 1 else 'ies'} "
                    f"(#{', #'.join(map(str, new_ids))})")
        self.load_page()

    def action_insert(self) -> None:
        if self.table_name is None:
            self.notify("choose a table first", severity="warning")
            return
        table_name = self.table_name

        def insert(new: NewEntry | None) -> None:
            if new is not None:
                self.insert_entry(table_name, new)

        self.app.push_screen(EntryInsertScreen(), insert)

    @work(group="memory-write", exit_on_error=False)
    async def insert_entry(self, table_name: str, new: NewEntry) -> None:
        try:
            entry_id = await self.memory.insert_entry(table_name, label=new.label, text=new.text)
        except MindsetError as exc:
            self.notify(str(exc), title="insert failed", severity="error", timeout=10)
            return
        self.notify(f"inserted entry #{entry_id}")
        self.load_page()

    @work(group="memory-write", exit_on_error=False)
    async def action_evict(self) -> None:
        await self._policy("eviction", self.memory.evict)

    @work(group="memory-write", exit_on_error=False)
    async def action_recombine(self) -> None:
        await self._policy("recombination", self.memory.recombine)

    async def _policy(self, name: str, run: Callable[[str], Awaitable[str]]) -> None:
        if self.table_name is None:
            self.notify("choose a table first", severity="warning")
            return
        try:
            result = await run(self.table_name)
        except (MindsetError, TypeError, ValueError) as exc:
            self.notify(f"{name} failed: {exc}", severity="error", timeout=10)
            return
        self.notify(f"{name} done: {result}")
        self.load_page()


def _label(row: EntryView) -> str:
    """The user's label, else the annotation's (marked as automatic); dead rows marked."""
    label = row.label or (f"auto: {row.auto_label}" if row.auto_label else "")
    return (DEAD + label) if row.norm < DEAD_NORM else label


def _promotes(row: EntryView) -> str:
    words = " ".join(row.top_tokens)
    return words if row.promotes_measured or not words else RAW + words
