"""The run directory's files that other processes read: their names, state and control.

* ``events.jsonl``: the job's event stream, written and read by
  :mod:`engine.distill.job_events` (typed, versioned events) only.
* ``state.json``: the run's current state, rewritten atomically: ``starting``, ``running``,
  ``paused``, ``cancelled``, ``completed`` or ``failed``, with the pid, step and last error.
* ``control.json``: written by the job runner, polled by the loop every step:
  ``{"command": "run" | "pause" | "cancel", "at_step": N}`` (``at_step``: act once the run
  reaches that step).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.distill.atomic import atomic_write_text

EVENTS_NAME = "events.jsonl"
STATE_NAME = "state.json"
CONTROL_NAME = "control.json"
CONFIG_NAME = "config.json"
REPORT_NAME = "report.json"
SUMMARY_NAME = "report.txt"
TENSORBOARD_DIR = "tensorboard"

LIVE_STATES = ("starting", "running", "paused")
FINAL_STATES = ("cancelled", "completed", "failed")
CONTROL_COMMANDS = ("run", "pause", "cancel")


def clean(value: Any) -> Any:
    """JSON-safe floats: NaN and infinities become strings rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


@dataclass
class Control:
    command: str = "run"
    at_step: int | None = None


def write_control(run_dir: Path, command: str, at_step: int | None = None) -> None:
    if command not in CONTROL_COMMANDS:
        raise ValueError(f"unknown control command {command!r}")
    atomic_write_text(run_dir / CONTROL_NAME,
                      json.dumps({"command": command, "at_step": at_step}) + "\n")


class ControlReader:
    """Reads ``control.json`` only when it changed (a stat per step, a read per change)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / CONTROL_NAME
        self.stamp: tuple[int, int] | None = None
        self.current = Control()

    def read(self) -> Control:
        try:
            info = self.path.stat()
        except FileNotFoundError:
            self.current = Control()
            self.stamp = None
            return self.current
        stamp = (info.st_mtime_ns, info.st_size)
        if stamp != self.stamp:
            self.stamp = stamp
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                command = data.get("command", "run")
                at_step = data.get("at_step")
                self.current = Control(
                    command if command in CONTROL_COMMANDS else "run",
                    int(at_step) if isinstance(at_step, int) else None,
                )
            except (OSError, ValueError, AttributeError):
                pass  # mid-replace or garbage: keep the last good command
        return self.current


def write_state(run_dir: Path, state: str, **fields: Any) -> None:
    data = {"state": state, "pid": os.getpid(), "updated": time.time(), **clean(fields)}
    atomic_write_text(run_dir / STATE_NAME, json.dumps(data) + "\n")


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / STATE_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
