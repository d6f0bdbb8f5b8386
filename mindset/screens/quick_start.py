"""The first-run offer: distil one layer of the default model in a few minutes.

It says how long that will take on this machine: the engine times the teacher (a few
seconds, in the background while the offer is read) and estimates the quick start's phases
from it, and it says what the result will be.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from engine.errors import MindsetError

if TYPE_CHECKING:
    from engine.services.jobs import WorkEstimate

Estimator = Callable[[], Awaitable["WorkEstimate"]]
Describer = Callable[[], Awaitable[str]]


class QuickStartScreen(ModalScreen[bool]):
    """Asks once; ``enter`` starts the quick start, ``escape`` leaves the workbench as is."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter,s", "start", "Start", id="quick_start.start"),
        Binding("escape,n", "later", "Not now", id="quick_start.later"),
    ]

    def __init__(self, estimate: Estimator | None = None,
                 describe: Describer | None = None) -> None:
        super().__init__()
        self._estimate = estimate
        self._describe = describe

    def compose(self) -> ComposeResult:
        with Vertical(id="quick-start-box"):
            yield Static("[b]Welcome to Mindset[/b]", id="quick-start-title")
            yield Static(
                "You have no student model yet. Press [b]enter[/b] to distil one layer of "
                "the workbench's model into a memory layer, with the loss and progress shown "
                "live in the Training pane. Afterwards the Memory pane shows a memory table "
                "of your own, and Chat talks to the student."
            )
            yield Static("", id="quick-start-result", classes="quick-start-part")
            yield Static("", id="quick-start-time", classes="quick-start-part")
            yield Static("[b]escape[/b]: not now (F9 offers it again).",
                         classes="quick-start-part")
        yield Footer()  # this offer's keys, not those of the pane behind it

    def on_mount(self) -> None:
        for part, wanted in (("#quick-start-result", self._describe),
                             ("#quick-start-time", self._estimate)):
            self.query_one(part, Static).display = wanted is not None
        if self._estimate is not None:
            self.query_one("#quick-start-time", Static).update(
                "[dim]Timing this machine to estimate how long it takes...[/dim]")
        if self._describe is not None or self._estimate is not None:
            self.measure()

    @work(exclusive=True, exit_on_error=False)
    async def measure(self) -> None:
        """The result first (from the teacher's config, at once), then the timed estimate."""
        if self._describe is not None:
            result = self.query_one("#quick-start-result", Static)
            try:
                result.update(f"[b]The result[/b]: {await self._describe()}")
            except MindsetError:
                result.display = False
        if self._estimate is not None:
            line = self.query_one("#quick-start-time", Static)
            try:
                estimate = await self._estimate()
            except MindsetError as exc:
                line.update(f"[dim]No time estimate: {exc}[/dim]")
                return
            line.update(time_text(estimate))

    def action_start(self) -> None:
        self.dismiss(True)

    def action_later(self) -> None:
        self.dismiss(False)


def time_text(estimate: WorkEstimate) -> str:
    """"About 4 min on this machine: ..." with the phases that take the time."""
    from engine.services.jobs import format_duration

    sampling = estimate.part("sampling training text")
    training = sum(seconds for name, seconds in estimate.parts
                   if name not in ("sampling training text", "loading the teacher"))
    if estimate.corpus_cached:
        how = "the training text the teacher wrote last time is reused"
    else:
        how = (f"the teacher first writes its own training text ({format_duration(sampling)}; "
               "kept for the next time)")
    return (f"[b]{format_duration(estimate.total_s).capitalize()} on this machine[/b] "
            f"(timed just now): {how}, then training and evaluation take "
            f"{format_duration(training)}.")
