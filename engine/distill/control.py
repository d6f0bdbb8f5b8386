"""What the run is asked to do between steps: go on, pause or cancel.

Requests come from ``control.json`` (the job runner writes it; see :mod:`engine.distill.events`)
and from SIGTERM/SIGINT (a clean cancel: checkpoint, then exit). Under ``torchrun`` rank 0
decides and every rank follows, so all of them stop at the same step.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from engine.distill.distributed import DistContext, broadcast_choice
from engine.distill.events import ControlReader

Action = Literal["run", "pause", "cancel"]
ACTIONS: tuple[Action, ...] = ("run", "pause", "cancel")
PAUSE_POLL_SECONDS = 0.2


class StopSignals:
    """SIGTERM (and SIGINT in the foreground) ask for a clean cancel: checkpoint, then exit."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            self.previous[number] = signal.signal(number, self.handle)

    def handle(self, _number: int, _frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous.clear()


class RunControl:
    """Reads the requests; a stat of ``control.json`` per step, a read per change."""

    def __init__(self, run_dir: Path, ctx: DistContext, signals: StopSignals) -> None:
        self.reader = ControlReader(run_dir)
        self.ctx = ctx
        self.signals = signals

    def requested(self, step: int) -> Action:
        """The action for the run at ``step``, agreed by every rank."""
        action: Action = "cancel" if self.signals.requested else "run"
        if action == "run":
            control = self.reader.read()
            if control.command != "run" and (control.at_step is None
                                             or step >= control.at_step):
                action = "pause" if control.command == "pause" else "cancel"
        return broadcast_choice(action, ACTIONS, self.ctx)

    def wait_while_paused(self, step: int, set_state: Callable[[str], None]) -> Action:
        """Sleep until the run is resumed ("run") or cancelled; ``set_state`` reports both
        the pause and the resume."""
        set_state("paused")
        while True:
            time.sleep(PAUSE_POLL_SECONDS)
            action = self.requested(step)
            if action != "pause":
                if action == "run":
                    set_state("running")
                return action
