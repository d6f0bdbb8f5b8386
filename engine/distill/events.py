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
from typing import TYPE_CHECKING, Any

from engine.atomic import atomic_write_text, read_json

if TYPE_CHECKING:
    from engine.distill.config import DistillConfig

EVENTS_NAME = "events.jsonl"
STATE_NAME = "state.json"
CONTROL_NAME = "control.json"
CONFIG_NAME = "config.json"
REPORT_NAME = "report.json"
SUMMARY_NAME = "report.txt"
TENSORBOARD_DIR = "tensorboard"
STUDENT_DIR = "student"  # the trained student, saved by engine.distill.loop

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
                data = read_json(self.path)
            except (OSError, ValueError):
                return self.current  # mid-replace or garbage: keep the last good command
            if not isinstance(data, dict):
                return self.current
            command, at_step = data.get("command"), data.get("at_step")
            valid_step = at_step is None or (isinstance(at_step, int)
                                             and not isinstance(at_step, bool))
            # Any field of the wrong kind keeps the last good command: a damaged file must
            # not turn a pause into a run.
            if isinstance(command, str) and command in CONTROL_COMMANDS and valid_step:
                self.current = Control(command, at_step)
        return self.current


def write_state(run_dir: Path, state: str, **fields: Any) -> None:
    data = {"state": state, "pid": os.getpid(), "updated": time.time(), **clean(fields)}
    atomic_write_text(run_dir / STATE_NAME, json.dumps(data) + "\n")


def read_state(run_dir: Path) -> dict[str, Any]:
    """The run's ``state.json``; {} when it is missing or unreadable (garbage, a pipe, too
    large). Its fields are as written: check their types before use."""
    try:
        data = read_json(run_dir / STATE_NAME)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_report(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``report.json`` (None before the run completes); a damaged one is an
    :class:`~engine.errors.InputError`."""
    from engine.errors import InputError

    path = run_dir / REPORT_NAME
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is unreadable ({exc}); the run's report is lost, but its "
                         "student directory and events remain") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} does not hold a run report (a JSON object)")
    return data


def load_run_config(run_dir: Path) -> DistillConfig:
    """The run's ``config.json`` as settings (validated), or a one-line
    :class:`~engine.errors.InputError`: missing, not a file, garbage, wrong settings."""
    from engine.distill.config import DistillConfig
    from engine.errors import InputError

    path = run_dir / CONFIG_NAME
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a directory; give a run directory")
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise InputError(f"{path} does not exist; is this a run directory?") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is unreadable ({exc}); is this a run directory?") from None
    try:
        config = DistillConfig.from_dict(data)
        config.validate()
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None
    return config
