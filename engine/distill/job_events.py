"""A job's event stream, ``events.jsonl``: the typed events, and the one writer and reader.

Each line is one JSON object: ``{"type": ..., "version": 1, "time": ..., **fields}``, appended
(and flushed) by the training process (rank 0). Lines written before events carried a version
have the same fields; they read back with ``version`` 0. Readers tolerate a torn last line (a
process killed mid-write), repeated steps after a resume (the later line wins, for whoever
keeps the latest value per step), extra fields (dropped) and event types they do not know
(:class:`UnknownEvent`), so that a newer worker's file never crashes an older reader.

Importing this module is cheap (no torch): front ends name these types.
"""

from __future__ import annotations

import json
import os
import stat
import time
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeAlias

from engine.distill.events import EVENTS_NAME, clean
from engine.errors import MindsetError

MAX_LINE_BYTES = 1 << 20  # an event is a few hundred bytes; longer lines are skipped
READ_CHUNK = 8 << 20  # what one poll reads at most
EVENT_VERSION = 1  # the schema version written now
LEGACY_VERSION = 0  # what a line without a version reads as


@dataclass(frozen=True, kw_only=True)
class Event:
    """What every event carries; ``kind`` names the line's ``type``."""

    kind: ClassVar[str] = ""
    time: float = field(default_factory=time.time)
    version: int = EVENT_VERSION


@dataclass(frozen=True, kw_only=True)
class StateEvent(Event):
    """The run moved to ``state`` (starting, running, paused, cancelled, completed, failed)."""

    kind: ClassVar[str] = "state"
    state: str
    step: int
    error: str | None = None
    last_checkpoint: int | None = None


@dataclass(frozen=True, kw_only=True)
class ResumedEvent(Event):
    kind: ClassVar[str] = "resumed"
    from_step: int


@dataclass(frozen=True, kw_only=True)
class LocalPairsEvent(Event):
    """The replaced MLPs' inputs/outputs were captured for the layer-local stage."""

    kind: ClassVar[str] = "local_pairs"
    tokens: int
    bytes: int


@dataclass(frozen=True, kw_only=True)
class PhaseEvent(Event):
    """Work before training: loading the teacher, sampling or reading text, capturing
    pairs, building the student; ``done`` of ``total`` units (0 of 0: not counted)."""

    kind: ClassVar[str] = "phase"
    phase: str
    done: int = 0
    total: int = 0
    unit: str = ""
    eta_s: float | None = None


@dataclass(frozen=True, kw_only=True)
class StepEvent(Event):
    """One logged training step (``step`` counts from 1; ``kl``/``ce``/``local`` as trained)."""

    kind: ClassVar[str] = "step"
    step: int
    total_steps: int
    stage: Literal["router", "local", "e2e"]
    loss: float
    grad_norm: float
    lr: float
    tokens_per_s: float
    eta_s: float
    tokens_seen: int
    cpu_seconds: float
    batch_hash: int
    kl: float | None = None
    ce: float | None = None
    local: float | None = None
    router_recall: float | None = None  # routed memories' recall of the oracle's top-k mass


@dataclass(frozen=True, kw_only=True)
class EvalEvent(Event):
    kind: ClassVar[str] = "eval"
    step: int
    heldout_ppl: float


@dataclass(frozen=True, kw_only=True)
class CheckpointEvent(Event):
    kind: ClassVar[str] = "checkpoint"
    step: int


@dataclass(frozen=True, kw_only=True)
class ErrorEvent(Event):
    kind: ClassVar[str] = "error"
    message: str
    step: int


@dataclass(frozen=True, kw_only=True)
class DoneEvent(Event):
    """The run completed: its report (``report.json``) without the memory's settings."""

    kind: ClassVar[str] = "done"
    state: str
    teacher: str
    memory: str
    layers: list[int]
    steps_done: int
    total_steps: int
    tokens_seen: int
    cpu_seconds: float
    wall_seconds: float
    world_size: int
    data: str
    trainable_parameters: int
    ppl_teacher: float
    ppl_student: float
    ppl_zeroed: float
    ppl_ratio: float
    gap_closed: float
    kl_per_token: float
    top1_agreement: float
    heldout_tokens: int


@dataclass(frozen=True, kw_only=True)
class UnknownEvent(Event):
    """A line of a type this reader does not know (or whose fields it cannot read)."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)  # its fields, as read


JobEvent: TypeAlias = (StateEvent | ResumedEvent | LocalPairsEvent | PhaseEvent | StepEvent
                       | EvalEvent | CheckpointEvent | ErrorEvent | DoneEvent | UnknownEvent)
EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls for cls in (StateEvent, ResumedEvent, LocalPairsEvent, PhaseEvent, StepEvent,
                              EvalEvent, CheckpointEvent, ErrorEvent, DoneEvent)
}


def event_type(event: JobEvent) -> str:
    """The ``type`` the event's line carries (an unknown event's own)."""
    return event.type if isinstance(event, UnknownEvent) else event.kind


# -- encoding -------------------------------------------------------------------------------

def encode(event: JobEvent) -> str:
    """The event's line (without the newline). Unset optional fields are left out."""
    if isinstance(event, UnknownEvent):
        body = {"type": event.type, "version": event.version, "time": event.time,
                **event.data}
    else:
        data = asdict(event)
        body = {"type": event.kind, "version": data.pop("version"), "time": data.pop("time"),
                **{k: v for k, v in data.items() if v is not None}}
    return json.dumps(clean(body))


def from_fields(cls: type[Event], data: dict[str, Any]) -> Any:
    """An event of ``cls`` from a dict with its fields (extra keys are ignored).

    Raises ValueError when a field the type needs is missing or of the wrong type."""
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for item in fields(cls):
        if not item.init:
            continue
        if item.name in data:
            values[item.name] = _coerce(data[item.name], hints[item.name], item.name)
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise ValueError(str(exc)) from None


def decode(data: dict[str, Any]) -> JobEvent:
    """The typed event of one parsed line; never raises."""
    kind, raw_version, raw_time = data.get("type"), data.get("version"), data.get("time")
    version = (raw_version if isinstance(raw_version, int) and not isinstance(raw_version, bool)
               else LEGACY_VERSION)
    try:
        stamp = float(raw_time) if isinstance(raw_time, int | float) else 0.0
    except OverflowError:  # an integer too large for a float
        stamp = 0.0
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is not None:
        try:
            event: JobEvent = from_fields(cls, {**data, "version": version, "time": stamp})
            return event
        except (ValueError, OverflowError):
            pass  # fields this reader cannot read: keep the line as it is
    rest = {k: v for k, v in data.items() if k not in ("type", "version", "time")}
    return UnknownEvent(type=str(kind), data=rest, version=version, time=stamp)


def _hints(cls: type[Event]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


_HINTS: dict[type[Event], dict[str, Any]] = {}


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{name}: {value!r} is not one of {args}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{name}: expected a list")
        return [_coerce(v, args[0], name) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected an object")
        return dict(value)
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # non-finite floats are written as "nan", "inf"
            return float(value)  # ValueError for other text
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Any:
        return value
    raise ValueError(f"{name}: {value!r} is not a {hint}")


# -- writing and reading --------------------------------------------------------------------

class EventWriter:
    """Appends events to ``events.jsonl``, one flushed line each."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / EVENTS_NAME
        flags = (os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            handle = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise MindsetError(f"cannot write {self.path} ({exc.strerror}); remove it if it "
                               "is not the run's event file") from None
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            os.close(handle)
            raise MindsetError(f"{self.path} is not a regular file; remove it and resume")
        # A process killed mid-line leaves a torn last line: start on a fresh one.
        torn = info.st_size > 0 and os.pread(handle, 1, info.st_size - 1) != b"\n"
        self.file = os.fdopen(handle, "a", encoding="utf-8")
        if torn:
            self.file.write("\n")

    def write(self, event: JobEvent) -> None:
        self.file.write(encode(event) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def parse_lines(chunk: str) -> list[JobEvent]:
    """The events of complete lines; torn, non-JSON (a pickle, binary garbage), too deeply
    nested and over-long lines are skipped."""
    events: list[JobEvent] = []
    for line in chunk.splitlines():
        line = line.strip()
        if not line or len(line) > MAX_LINE_BYTES:
            continue
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a torn line from a killed process, or not an event at all
        if isinstance(data, dict):
            events.append(decode(data))
    return events


def read_events(run_dir: Path) -> list[JobEvent]:
    """Every event written so far (a job's live stream: :meth:`JobRunner.events`)."""
    tail = EventTail(run_dir)
    events: list[JobEvent] = []
    while True:
        before = tail.offset
        events += tail.poll()
        if tail.offset == before:
            return events


class EventTail:
    """Reads the complete lines appended to ``events.jsonl`` since the last call.

    Reads at most :data:`READ_CHUNK` bytes a call; a line longer than :data:`MAX_LINE_BYTES`
    is skipped without being held in memory, and anything but a regular file (a planted
    FIFO or device) reads as no events."""

    def __init__(self, run_dir: Path, offset: int = 0) -> None:
        self.path = run_dir / EVENTS_NAME
        self.offset = offset
        self.skipping = False  # inside an over-long line: drop it up to its newline

    def poll(self) -> list[JobEvent]:
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            handle = os.open(self.path, flags)
        except OSError:  # missing, or not openable: nothing to read (yet)
            return []
        with os.fdopen(handle, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                return []
            file.seek(self.offset)
            data = file.read(READ_CHUNK)
        end = data.rfind(b"\n")
        if end < 0:
            if self.skipping or len(data) > MAX_LINE_BYTES:
                self.offset += len(data)  # an over-long line: skip what is there of it
                self.skipping = True
            return []
        start = 0
        if self.skipping:
            start = data.find(b"\n") + 1
            self.skipping = False
        self.offset += end + 1
        rest = len(data) - (end + 1)
        if rest > MAX_LINE_BYTES:  # the unfinished last line is already too long: skip it
            self.offset += rest
            self.skipping = True
        return parse_lines(data[start: end + 1].decode("utf-8", errors="replace"))


def latest_steps(events: list[JobEvent]) -> dict[int, StepEvent]:
    """The last logged event of each step (a resumed run logs some steps twice)."""
    return {event.step: event for event in events if isinstance(event, StepEvent)}
