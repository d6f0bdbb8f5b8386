"""Typed messages that carry engine results from workers back to the widgets."""

from __future__ import annotations

from textual.message import Message


class ModelLoaded(Message):
    """A model finished loading in the background."""

    bubble = False

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role


class ModelLoadFailed(Message):
    """A model could not be loaded; ``error`` says why and what to do."""

    bubble = False

    def __init__(self, role: str, error: str) -> None:
        super().__init__()
        self.role = role
        self.error = error


class JobsChanged(Message):
    """The number of running jobs changed (posted to the app)."""

    bubble = False

    def __init__(self, running: int) -> None:
        super().__init__()
        self.running = running
