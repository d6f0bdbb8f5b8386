"""Modal forms for memory entries: edit (label, tags, value) and insert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from engine.views import EntryView


@dataclass
class EntryEdit:
    """What the user asked to change; None fields stay as they were."""

    label: str | None = None
    tags: list[str] | None = None
    scale: float | None = None
    value_numbers: list[float] | None = None
    value_text: str | None = None


def parse_numbers(text: str) -> list[float] | None:
    """``"0.1, 2, -3"`` -> floats; None when the text is not a list of numbers."""
    parts = [p for p in text.replace(",", " ").split() if p]
    try:
        return [float(p) for p in parts] if parts else None
    except ValueError:
        return None


class EntryEditScreen(ModalScreen[EntryEdit | None]):
    """Edit one entry: label, tags, scale the value, or replace it (numbers or a text)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="entry.cancel"),
        Binding("ctrl+s", "save", "Save", id="entry.save"),
    ]

    def __init__(self, entry: EntryView) -> None:
        super().__init__()
        self.entry = entry

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(f"[b]Edit entry #{self.entry.id}[/b]  norm {self.entry.norm:.3f}")
            yield Label("label")
            yield Input(self.entry.label, id="edit-label")
            yield Label("tags (comma separated)")
            yield Input(", ".join(self.entry.tags), id="edit-tags")
            yield Label("scale the value by")
            yield Input("1.0", id="edit-scale")
            yield Label("replace the value with (numbers, or a text run through the model)")
            yield Input("", id="edit-value")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="edit-save")
                yield Button("Cancel (esc)", id="edit-cancel")

    @on(Button.Pressed, "#edit-save")
    def action_save(self) -> None:
        label = self.query_one("#edit-label", Input).value.strip()
        tags_text = self.query_one("#edit-tags", Input).value
        tags = [t.strip() for t in tags_text.split(",") if t.strip()]
        scale_text = self.query_one("#edit-scale", Input).value.strip() or "1"
        try:
            scale = float(scale_text)
        except ValueError:
            self.notify(f"scale must be a number, not {scale_text!r}", severity="error")
            return
        value_text = self.query_one("#edit-value", Input).value.strip()
        numbers = parse_numbers(value_text) if value_text else None
        self.dismiss(EntryEdit(
            label=label if label != self.entry.label else None,
            tags=tags if tags != self.entry.tags else None,
            scale=scale if scale != 1.0 else None,
            value_numbers=numbers,
            value_text=value_text if value_text and numbers is None else None,
        ))

    @on(Button.Pressed, "#edit-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


@dataclass
class NewEntry:
    label: str
    text: str


class EntryInsertScreen(ModalScreen[NewEntry | None]):
    """Insert an entry whose key and value come from a text run through the model."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="insert.cancel"),
        Binding("ctrl+s", "save", "Insert", id="insert.save"),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static("[b]Insert an entry[/b]: its key and value come from the text")
            yield Label("text")
            yield Input("", id="insert-text")
            yield Label("label (optional)")
            yield Input("", id="insert-label")
            with Horizontal(classes="dialog-buttons"):
                yield Button("Insert (ctrl+s)", variant="primary", id="insert-save")
                yield Button("Cancel (esc)", id="insert-cancel")

    @on(Button.Pressed, "#insert-save")
    @on(Input.Submitted)
    def action_save(self) -> None:
        text = self.query_one("#insert-text", Input).value.strip()
        if not text:
            self.notify("type the text the entry stands for", severity="warning")
            return
        label = self.query_one("#insert-label", Input).value.strip() or text
        self.dismiss(NewEntry(label, text))

    @on(Button.Pressed, "#insert-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
