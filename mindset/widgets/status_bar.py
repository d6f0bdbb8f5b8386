"""The status line: loaded model, database and running jobs."""

from __future__ import annotations

from textual.reactive import reactive
from textual.widgets import Static


class StatusBar(Static):
    """One line at the bottom of the screen; the app sets its reactives."""

    model_text: reactive[str] = reactive("model: starting")
    database: reactive[str] = reactive("")
    running_jobs: reactive[int] = reactive(0)

    def render(self) -> str:
        jobs = f"{self.running_jobs} job{'s' if self.running_jobs != 1 else ''} running"
        return f" {self.model_text}  │  db: {self.database}  │  {jobs}"
