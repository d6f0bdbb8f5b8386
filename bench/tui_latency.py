"""Workbench latency: cold start to the first frame, and key-press to repaint while training.

The real ``mindset`` command runs in a pseudo-terminal (120x40), exactly as a user starts it.

* first frame: from spawning the process to the moment the screen shows the footer's keys
  (median of several cold starts);
* key-press to repaint: the up and down arrows in the Memory pane's table (2,000 entries), timed
  from writing the key to the moment the newly highlighted row is written to the terminal;
  and tab switches (F3, F2), timed until the new tab's content is written. Both idle and
  while a distillation job trains in its own process, side by side in one run.

Writes ``bench/results/tui_latency.json``. Usage::

    .venv/bin/python bench/tui_latency.py [--teacher tiny-llama|default] [--presses 60]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "tui_latency.json"
COLUMNS, ROWS = 120, 40
# What each tab writes when it is shown (a word only that tab's content holds).
TABS = [("f3", b"teacher"), ("f2", b"search")]


class Terminal:
    """The workbench in a pseudo-terminal."""

    def __init__(self, model: str, home: Path) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        attributes = termios.tcgetattr(slave)
        attributes[0] &= ~termios.IXON  # let ctrl+q reach the app (no XON/XOFF)
        termios.tcsetattr(slave, termios.TCSANOW, attributes)
        env = dict(os.environ, TERM="xterm-256color", MINDSET_HOME=str(home),
                   COLUMNS=str(COLUMNS), LINES=str(ROWS))
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mindset.cli", "--model", model],
            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, start_new_session=True,
        )
        os.close(slave)
        self.screen = b""

    def read(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return b""
        try:
            data = os.read(self.master, 1 << 16)
        except OSError:
            return b""
        self.screen += data
        return data

    def wait_for(self, marker: bytes, timeout: float) -> float:
        """Seconds until ``marker`` appears in the output (from now)."""
        start = time.perf_counter()
        seen = b""
        while time.perf_counter() - start < timeout:
            seen += self.read(0.05)
            if marker in visible(seen):
                return time.perf_counter() - start
        raise TimeoutError(f"{marker!r} not shown within {timeout} s")

    def drain(self, quiet: float = 0.15) -> None:
        while self.read(quiet):
            pass

    def press(self, key_bytes: bytes, marker: bytes) -> float:
        self.drain()
        start = time.perf_counter()
        os.write(self.master, key_bytes)
        seen = b""
        while time.perf_counter() - start < 5.0:
            seen += self.read(0.5)
            if marker in visible(seen):
                return time.perf_counter() - start
        raise TimeoutError(f"no repaint with {marker!r} after the key")

    def close(self) -> None:
        """Quit with ctrl+q; stop the process group if it does not."""
        with contextlib.suppress(OSError):
            os.write(self.master, b"\x11")
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        os.close(self.master)


KEYS = {"f2": b"\x1bOQ", "f3": b"\x1bOR"}
ANSI = re.compile(rb"\x1b(\[[0-9;?<>=$]*[ -/]*[@-~]|\][^\x07]*\x07|[@-Z\\-_])")


def visible(data: bytes) -> bytes:
    """The text the terminal shows, without escape sequences."""
    return ANSI.sub(b"", data)


def first_frame(model: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as home:
            terminal = Terminal(model, Path(home))
            try:
                # The status bar's "loading" is in the first frame, under the panes.
                terminal.wait_for(b"loading", 30.0)
                times.append(time.perf_counter() - terminal.started)
            finally:
                terminal.close()
    return times


def tab_switches(terminal: Terminal, presses: int) -> list[float]:
    """F3/F2 in turn: the whole pane is restyled and redrawn (the worst case)."""
    latencies = []
    for index in range(presses):
        key, marker = TABS[index % len(TABS)]
        latencies.append(terminal.press(KEYS[key], marker) * 1000.0)
    return latencies


ROW_SWEEP = 20  # arrow presses one way before turning: well inside a 50-row page


def row_moves(terminal: Terminal, presses: int) -> list[float]:
    """Down and up arrows in the Memory pane's table, :data:`ROW_SWEEP` each way in turn:
    the rows whose highlight changes are redrawn (the common case); the repaint is the first
    output holding an entry's label. (Always down would stop at the page's last row, where
    a key repaints nothing.)"""
    keys = (b"\x1b[B", b"\x1b[A")
    return [terminal.press(keys[(index // ROW_SWEEP) % 2], b"entry-") * 1000.0
            for index in range(presses)]


def label_of(row: int) -> str:
    return f"entry-{row:05d}"


def fill_memory(home: Path, rows: int = 2000) -> None:
    """A memory table in the workbench's default database, so the Memory pane has rows."""
    import numpy as np

    from engine.memory import MemoryStore

    rng = np.random.default_rng(0)
    (home / "memory").mkdir(parents=True, exist_ok=True)
    with MemoryStore.open(home / "memory" / "memory.db") as store:
        table = store.create_table("layer2_associative", 64, 64)
        table.insert(rng.normal(size=(rows, 64)).astype(np.float32),
                     rng.normal(size=(rows, 64)).astype(np.float32),
                     labels=[label_of(i) for i in range(rows)])


def start_training(teacher: str, home: Path, steps: int) -> Any:
    os.environ["MINDSET_HOME"] = str(home)
    from engine.distill.config import DistillConfig
    from engine.distill.jobs import JobRunner

    # Text to train on: this repository's own sources (no data set needed).
    corpus = home / "corpus.txt"
    corpus.write_text("\n".join(p.read_text(encoding="utf-8")
                                for p in sorted((REPO / "engine").rglob("*.py"))),
                      encoding="utf-8")
    runner = JobRunner(home / "runs")
    config = DistillConfig(teacher=teacher, layers="1", memory="featural", steps=steps,
                           data=[str(corpus)], block_size=128, batch_size=8,
                           heldout_blocks=2, eval_every=steps, checkpoint_every=steps)
    job = runner.start(config)
    from engine.distill.job_events import latest_steps, read_events

    deadline = time.time() + 300
    while not latest_steps(read_events(job.run_dir)):
        if time.time() > deadline or runner.job(job.id).state in ("failed", "crashed"):
            raise RuntimeError(f"the training job did not start: {runner.job(job.id)}")
        time.sleep(0.5)
    return runner, job.id


def steps_done(run_dir: Path) -> int:
    from engine.distill.job_events import latest_steps, read_events

    return max(latest_steps(read_events(run_dir)), default=0)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(values), 2),
            "p95_ms": round(percentile(values, 0.95), 2),
            "max_ms": round(max(values), 2), "n": len(values)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default="tiny-llama",
                        help="teacher of the background job and the workbench's model")
    parser.add_argument("--presses", type=int, default=60)
    parser.add_argument("--cold-starts", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="the results file (default: bench/results/tui_latency.json)")
    args = parser.parse_args(argv)

    frames = first_frame(args.teacher, args.cold_starts)
    print(f"first frame: median {statistics.median(frames):.3f} s over {len(frames)} starts")

    with tempfile.TemporaryDirectory() as home_name:
        home = Path(home_name)
        fill_memory(home)
        terminal = Terminal(args.teacher, home)
        runner = job_id = None
        try:
            terminal.wait_for(b"Welcome to Mindset", 60.0)
            os.write(terminal.master, b"\x1b")  # decline the quick start
            terminal.wait_for(f"model: {args.teacher} ".encode(), 120.0)  # loaded
            # The table's rows, drawn in full once: only then does a key repaint one row (a
            # slow machine may still be drawing the first page when the model is loaded).
            terminal.wait_for(label_of(0).encode(), 120.0)
            time.sleep(1.0)
            idle = row_moves(terminal, args.presses)
            idle_tabs = tab_switches(terminal, args.presses // 2)
            runner, job_id = start_training(args.teacher, home, steps=100000)
            time.sleep(2.0)
            steps_before = steps_done(runner.run_dir(job_id))
            busy = row_moves(terminal, args.presses)
            busy_tabs = tab_switches(terminal, args.presses // 2)
            steps_during = steps_done(runner.run_dir(job_id)) - steps_before
        finally:
            terminal.close()
            if runner is not None and job_id is not None:
                with contextlib.suppress(Exception):
                    runner.cancel(job_id)
                final = runner.wait(job_id, timeout=60)
                if final.alive and final.pid:
                    os.kill(final.pid, signal.SIGKILL)

    idle_stats, busy_stats = summary(idle), summary(busy)
    idle_tab_stats, busy_tab_stats = summary(idle_tabs), summary(busy_tabs)
    result = {
        "first_frame_s": round(statistics.median(frames), 3),
        "first_frame_runs_s": [round(t, 3) for t in frames],
        "keypress_p95_ms_under_training": busy_stats["p95_ms"],
        "keypress_p50_ms_under_training": busy_stats["p50_ms"],
        "keypress_idle": idle_stats,
        "keypress_under_training": busy_stats,
        "p95_ratio_training_vs_idle": round(busy_stats["p95_ms"] / idle_stats["p95_ms"], 2),
        "key": "down arrow in the Memory pane's table (tab switches reported separately)",
        "tab_switch_idle": idle_tab_stats,
        "tab_switch_under_training": busy_tab_stats,
        "training_job_steps_during_measurement": steps_during,
        "teacher": args.teacher,
        "cpu_count": os.cpu_count(),
        "targets": {"first_frame_s": 1.0, "keypress_p95_ms_under_training": 50.0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"key-press to repaint, idle:           p50 {idle_stats['p50_ms']} ms, "
          f"p95 {idle_stats['p95_ms']} ms")
    print(f"key-press to repaint, under training: p50 {busy_stats['p50_ms']} ms, "
          f"p95 {busy_stats['p95_ms']} ms (ratio {result['p95_ratio_training_vs_idle']}x)")
    print(f"tab switch, idle p95 {idle_tab_stats['p95_ms']} ms, under training p95 "
          f"{busy_tab_stats['p95_ms']} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
