"""Typed messages that carry engine results from workers back to the widgets."""

from __future__ import annotations

from textual.message import Message


class ModelLoaded(Message, bubble=False):
    """A model finished loading in the background."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role


class ModelLoadFailed(Message, bubble=False):
    """A model could not be loaded; ``error`` says why and what to do."""

    def __init__(self, role: str, error: str) -> None:
        super().__init__()
        self.role = role
        self.error = error


class JobsChanged(Message, bubble=False):
    """The number of running jobs changed (posted to the app)."""

    def __init__(self, running: int) -> None:
        super().__init__()
        self.running = running

