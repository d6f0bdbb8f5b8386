"""The first-run offer: distil one layer of the default model in a few minutes."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static


class QuickStartScreen(ModalScreen[bool]):
    """Asks once; ``enter`` starts the quick start, ``escape`` leaves the workbench as is."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter,s", "start", "Start", id="quick_start.start"),
        Binding("escape,n", "later", "Not now", id="quick_start.later"),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="quick-start-box"):
            yield Static("[b]Welcome to Mindset[/b]", id="quick-start-title")
            yield Static(
                "You have no student model yet. Press [b]enter[/b] to distil one layer of "
                "the default model into a memory layer: a few minutes on a laptop, with the "
                "loss and progress shown live in the Training pane. Afterwards the Memory "
                "pane shows a memory table of your own.\n\n"
                "[b]escape[/b]: not now (F9 offers it again)."
            )

    def action_start(self) -> None:
        self.dismiss(True)

    def action_later(self) -> None:
        self.dismiss(False)
