"""Background distillation jobs: start, list, watch, pause, resume and cancel.

Each job is a run directory under the runs root (``runs_dir()`` by default) and a separate
process (``python -m engine.distill.worker RUN_DIR``, or ``torchrun`` for several processes)
in its own session, so it keeps training when the workbench closes. Everything the runner
knows it reads back from the run directories, so jobs reappear after a restart; a job whose
process died without finishing (a crash, ``kill -9``, a reboot) shows as ``crashed`` and
:meth:`JobRunner.resume` restarts it from its last checkpoint.

Control goes through ``control.json`` in the run directory, which the training loop polls
every step: pause, resume, cancel (checkpoint, then exit).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.atomic import atomic_write_text, read_json
from engine.distill import events as ev
from engine.distill.checkpoints import has_checkpoint
from engine.distill.config import DistillConfig
from engine.distill.job_events import EventTail, JobEvent
from engine.errors import InputError
from engine.processes import pid_exists

JOB_NAME = "job.json"
LOG_NAME = "worker.log"
WORKER_MODULE = "engine.distill.worker"
# Jobs run this much nicer than the process that starts them, so that training on every
# core leaves the workbench (and the rest of the machine) responsive; 0 turns it off.
DEFAULT_NICENESS = 10
NICENESS_ENV = "MINDSET_JOB_NICENESS"  # overrides the default for every runner
WORKER_NICENESS_ENV = "MINDSET_WORKER_NICENESS"  # absolute niceness a worker applies
MAX_NICENESS = 19
LOG_TAIL_BYTES = 64 * 1024


@dataclass
class JobInfo:
    """A job as read from its run directory."""

    id: str
    run_dir: Path
    state: str  # starting | running | paused | cancelled | completed | failed | crashed
    step: int
    total_steps: int
    pid: int | None
    alive: bool
    error: str | None
    teacher: str
    memory: str
    layers: str
    created: float
    updated: float

    @property
    def resumable(self) -> bool:
        return not self.alive and self.state in ("cancelled", "failed", "crashed", "starting")

    @property
    def finished(self) -> bool:
        return not self.alive and self.state in (*ev.FINAL_STATES, "crashed")

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["run_dir"] = str(self.run_dir)
        return data


def process_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live (not zombie) distillation worker."""
    if not pid or pid <= 0 or not pid_exists(pid):
        return False
    proc = Path(f"/proc/{pid}")
    if proc.exists():  # Linux: rule out zombies and recycled pids
        try:
            if ") Z" in (proc / "stat").read_text():
                return False
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
        return WORKER_MODULE in command or "torch.distributed.run" in command
    return True


def job_niceness() -> int:
    """The niceness increment for job processes (``MINDSET_JOB_NICENESS``, default 10)."""
    raw = os.environ.get(NICENESS_ENV, "").strip()
    if not raw:
        return DEFAULT_NICENESS
    try:
        return max(0, int(raw))
    except ValueError as exc:
        raise InputError(f"{NICENESS_ENV} must be a whole number (got {raw!r})") from exc


def lower_priority(pid: int, niceness: int) -> None:
    """Raise ``pid``'s niceness to ``niceness`` (never lowers it; best effort).

    A job runs in its own session, and Linux with autogroups shares the CPU between
    sessions first: a process's niceness then only counts within its session, so the
    session's group gets the niceness too."""
    try:
        if os.getpriority(os.PRIO_PROCESS, pid) < niceness:
            os.setpriority(os.PRIO_PROCESS, pid, niceness)
    except OSError:  # already gone, or not allowed: it only costs responsiveness
        pass
    autogroup = Path(f"/proc/{pid}/autogroup")
    try:
        current = int(autogroup.read_text().rsplit("nice", 1)[1])
        if current < niceness:
            autogroup.write_text(str(niceness))
    except (OSError, ValueError, IndexError):  # no autogroups here, or not allowed
        pass


def log_tail_lines(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of a job's log, read from at most its last LOG_TAIL_BYTES;
    [] when it is missing or no regular file (a planted FIFO must not hang the reader)."""
    if lines <= 0:
        return []
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        handle = os.open(path, flags)
    except (OSError, ValueError):
        return []
    try:
        with os.fdopen(handle, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                return []
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - LOG_TAIL_BYTES))
            tail = file.read(LOG_TAIL_BYTES).decode("utf-8", errors="replace")
    except (OSError, ValueError):
        return []
    return tail.strip().splitlines()[-lines:]


def last_log_line(path: Path) -> str | None:
    """The last line a dead worker printed (its error, when it died before reporting one)."""
    lines = log_tail_lines(path, 1)
    return lines[-1][-500:] if lines else None


def _int(value: Any, default: int = 0) -> int:
    """A whole number read from a run file, or ``default`` when it holds something else."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _float(value: Any, default: float = 0.0) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            return default
    return default


def job_name(config: DistillConfig) -> str:
    layers = re.sub(r"[^0-9a-z]+", "_", config.layers.lower()).strip("_") or "layers"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{config.memory}-{layers}"


class JobRunner:
    """Starts distillation processes and reads their state back from the run directories."""

    def __init__(self, root: Path | None = None, *, python: str | None = None,
                 niceness: int | None = None) -> None:
        """``niceness``: how much lower the jobs' CPU priority is than this process's
        (default ``MINDSET_JOB_NICENESS`` or 10; 0 keeps the same priority)."""
        if root is None:
            from engine.paths import runs_dir

            root = runs_dir()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.python = python or sys.executable
        self.niceness = job_niceness() if niceness is None else niceness
        if self.niceness < 0:
            raise InputError(f"job niceness must be 0 or more (got {self.niceness})")
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # -- starting -------------------------------------------------------------------------
    def start(self, config: DistillConfig, *, name: str | None = None,
              processes: int = 1) -> JobInfo:
        """Write the run directory and launch its training process; returns at once."""
        config.validate()
        if processes < 1:
            raise InputError(f"processes must be at least 1 (got {processes})")
        base = name or job_name(config)
        if not re.fullmatch(r"[A-Za-z0-9._-]+", base):
            raise InputError(f"job name {base!r} may hold only letters, digits, '.', '_', '-'")
        job_id, suffix = base, 1
        while (self.root / job_id).exists():
            suffix += 1
            job_id = f"{base}-{suffix}"
        run_dir = self.root / job_id
        run_dir.mkdir(parents=True)
        config.save(run_dir / ev.CONFIG_NAME)
        atomic_write_text(run_dir / JOB_NAME, json.dumps(
            {"created": time.time(), "processes": processes, "pid": None}) + "\n")
        self._launch(job_id)
        return self.job(job_id)

    def _launch(self, job_id: str) -> None:
        run_dir = self.run_dir(job_id)
        job = self._job_file(run_dir)
        processes = max(1, _int(job.get("processes"), 1))
        ev.write_control(run_dir, "run")
        if processes > 1:
            command = [self.python, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={processes}", "-m", WORKER_MODULE, str(run_dir)]
        else:
            command = [self.python, "-m", WORKER_MODULE, str(run_dir)]
        env = dict(os.environ)
        source_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
        target = min(MAX_NICENESS, os.getpriority(os.PRIO_PROCESS, 0) + self.niceness)
        env[WORKER_NICENESS_ENV] = str(target)
        with (run_dir / LOG_NAME).open("ab") as log:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,  # survives the workbench closing
            )
        # At once, before the child starts its threads (they inherit it; torchrun's
        # workers inherit it from the launcher); the worker applies it too, in case.
        lower_priority(process.pid, target)
        self._children[job_id] = process
        job.update({"pid": process.pid, "launched": time.time()})
        atomic_write_text(run_dir / JOB_NAME, json.dumps(job) + "\n")

    # -- reading --------------------------------------------------------------------------
    def run_dir(self, job_id: str) -> Path:
        run_dir = self.root / job_id
        if ("/" in job_id or "\0" in job_id or job_id in ("", ".", "..")
                or not (run_dir / ev.CONFIG_NAME).exists()):
            raise InputError(f"no job {job_id!r} in {self.root}")
        return run_dir

    @staticmethod
    def _job_file(run_dir: Path) -> dict[str, Any]:
        try:
            data = read_json(run_dir / JOB_NAME)
        except (OSError, ValueError):  # missing, garbage, a pipe: a job that tells nothing
            return {}
        return data if isinstance(data, dict) else {}

    def _alive(self, job_id: str, pid: int | None) -> bool:
        child = self._children.get(job_id)
        if child is not None and child.pid == pid:
            return child.poll() is None  # reaps our own finished children
        return process_alive(pid)

    def job(self, job_id: str) -> JobInfo:
        run_dir = self.run_dir(job_id)
        job = self._job_file(run_dir)
        state = ev.read_state(run_dir)
        pid = _int(job.get("pid")) or None
        alive = self._alive(job_id, pid)
        name = state.get("state")
        if not isinstance(name, str) or name not in (*ev.LIVE_STATES, *ev.FINAL_STATES):
            name = "starting"
        if _float(job.get("launched")) > _float(state.get("updated")):
            name = "starting"  # relaunched; the process has not reported yet
        if not alive and name in ev.LIVE_STATES:
            name = "crashed"
        try:
            config = ev.load_run_config(run_dir)
            teacher, memory, layers, total = (config.teacher, config.memory, config.layers,
                                              config.total_steps)
        except InputError:
            teacher, memory, layers, total = "?", "?", "?", 0
        error = state.get("error")
        error = error[:2000] if isinstance(error, str) else None
        if name == "crashed" and not error:
            error = last_log_line(run_dir / LOG_NAME)
        return JobInfo(
            id=job_id, run_dir=run_dir, state=name, step=_int(state.get("step")),
            total_steps=_int(state.get("total_steps"), total), pid=pid, alive=alive,
            error=error, teacher=teacher, memory=memory, layers=layers,
            created=_float(job.get("created")), updated=_float(state.get("updated")),
        )

    def jobs(self) -> list[JobInfo]:
        """Every job under the runs root, newest first."""
        found = [self.job(path.name) for path in self.root.iterdir()
                 if (path / ev.CONFIG_NAME).exists() and (path / JOB_NAME).exists()]
        return sorted(found, key=lambda job: job.created, reverse=True)

    def report(self, job_id: str) -> dict[str, Any] | None:
        """The run report of a completed job (None before it completes; a damaged one is an
        InputError)."""
        return ev.read_report(self.run_dir(job_id))

    # -- control --------------------------------------------------------------------------
    def pause(self, job_id: str, *, at_step: int | None = None) -> None:
        """Pause a live job (at once, or when it reaches ``at_step``)."""
        job = self.job(job_id)
        if not job.alive:
            raise InputError(f"job {job_id} is {job.state}, not running; nothing to pause")
        ev.write_control(job.run_dir, "pause", at_step)

    def resume(self, job_id: str) -> JobInfo:
        """Unpause a paused job, or restart a stopped one from its last checkpoint."""
        job = self.job(job_id)
        if job.alive:
            ev.write_control(job.run_dir, "run")
            return self.job(job_id)
        if job.state == "completed":
            raise InputError(f"job {job_id} has completed; start a new job to train further")
        self._launch(job_id)
        return self.job(job_id)

    def cancel(self, job_id: str) -> None:
        """Ask a live job to checkpoint and exit (it does so within one training step)."""
        job = self.job(job_id)
        if not job.alive:
            raise InputError(f"job {job_id} is {job.state}, not running; nothing to cancel")
        ev.write_control(job.run_dir, "cancel")

    def has_checkpoint(self, job_id: str) -> bool:
        return has_checkpoint(self.run_dir(job_id))

    # -- waiting and watching -------------------------------------------------------------
    def wait(self, job_id: str, timeout: float | None = None, *, poll: float = 0.2) -> JobInfo:
        """Block until the job's process has exited (or ``timeout`` seconds passed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if not job.alive or (deadline is not None and time.monotonic() >= deadline):
                return job
            time.sleep(poll)

    async def wait_async(self, job_id: str, timeout: float | None = None, *,
                         poll: float = 0.25) -> JobInfo:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if not job.alive or (deadline is not None and time.monotonic() >= deadline):
                return job
            await asyncio.sleep(poll)

    async def events(self, job_id: str, *, from_start: bool = True, follow: bool = True,
                     poll: float = 0.25) -> AsyncIterator[JobEvent]:
        """The job's typed events as they are written; ends when the job's process has exited
        (after what it wrote just before exiting).

        ``from_start=False`` skips what was written before the call; ``follow=False`` yields
        what is there now and stops. Every read of the run directory happens in a worker
        thread, so the caller's event loop (a UI's) never waits on the disk.
        """
        def open_tail() -> EventTail:
            path = self.run_dir(job_id) / ev.EVENTS_NAME
            offset = 0 if from_start or not path.exists() else path.stat().st_size
            return EventTail(path.parent, offset)

        def read(tail: EventTail) -> tuple[bool, list[JobEvent]]:
            alive = self.job(job_id).alive  # before the read: nothing written is missed
            return alive, tail.poll()

        tail = await asyncio.to_thread(open_tail)
        while True:
            alive, batch = await asyncio.to_thread(read, tail)
            last = not follow or not alive
            if last:  # anything written just before the exit
                batch += await asyncio.to_thread(tail.poll)
            for event in batch:
                yield event
            if last:
                return
            await asyncio.sleep(poll)
