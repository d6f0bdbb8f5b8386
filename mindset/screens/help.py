"""The help screen: every key of the workbench, as remapped by the config file."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static


def key_label(binding: Binding, keymap: Mapping[str, str]) -> str:
    keys = keymap.get(binding.id or "", binding.key)
    return ", ".join(part.strip() for part in keys.split(","))


class HelpScreen(ModalScreen[None]):
    """A table of sections, keys, actions and binding ids (the names the config uses)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,f1", "dismiss", "Close", id="help.close"),
    ]

    def __init__(
        self, sections: list[tuple[str, list[Binding]]], keymap: Mapping[str, str]
    ) -> None:
        super().__init__()
        self.sections = sections
        self.keymap = keymap

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Static(
                "[b]Mindset keys[/b]  ·  esc, q or F1 closes this help  ·  remap any key in "
                "the config file's \\[keys] table by its id, e.g.  \"tab.chat\" = \"f8\"",
                id="help-title",
            )
            yield DataTable(id="help-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_columns("where", "key", "does", "id")
        # The palette's key belongs to Textual, not to a binding of ours: listed by hand.
        table.add_row("App", "ctrl+p", "command palette: every action, and screenshots", "")
        for section, bindings in self.sections:
            for binding in bindings:
                table.add_row(
                    section, key_label(binding, self.keymap), binding.description, binding.id
                )

    async def action_dismiss(self, result: None = None) -> None:
        self.dismiss(result)
