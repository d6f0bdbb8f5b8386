"""A newcomer's first ten minutes, timed: the workbench on an empty data directory, the
quick start, the Memory pane, then a question to the student in Chat.

The real workbench (``MindsetApp`` on the real engine) runs headless, driven by Textual's
pilot the way a person drives it with keys, in a fresh data directory, so the default
model's conversion and the quick start's sampling are included. Each step's time is taken
from the previous step's end:

1. start: the app opens on an empty data directory and offers the quick start, with its
   time estimate on the screen;
2. quick start: ``enter``, then the job to completion (its student loaded in the workbench);
3. memory: F2 shows the student's memory table with its rows;
4. chat: F5, the student chosen, one question, the reply in full.

Set-up (``git clone`` and ``make run``'s install) happens before this script can run; time it
with ``time make setup`` on a fresh clone and add it (``--setup-seconds``).

Writes ``bench/results/first_ten_minutes.json`` (``--out`` elsewhere; ``--quick`` on a tiny
model writes to a temp file unless ``--out`` is given, so it never touches committed results).

    .venv/bin/python bench/first_ten_minutes.py [--setup-seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "first_ten_minutes.json"
QUESTION = "What is the capital of France?"
APP_SIZE = (140, 44)


async def wait_until(pilot: Any, condition: Any, timeout: float, what: str) -> None:
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what}: not done within {timeout:.0f} s")
        await pilot.pause(0.1)


def screen_text(widget: Any) -> str:
    """A widget's content as the terminal shows it (Rich renderables included)."""
    import io

    from rich.console import Console

    console = Console(width=120, record=True, file=io.StringIO())
    console.print(widget.content)
    return console.export_text()


def job_phases(events_file: Path) -> dict[str, float]:
    """Seconds the job spent in each phase before training, in training and after it, from
    the times of its own events."""
    events = [json.loads(line) for line in events_file.read_text().splitlines() if line]
    marks: list[tuple[str, float]] = []
    for event in events:
        if event["type"] == "phase" and (not marks or marks[-1][0] != event["phase"]):
            marks.append((event["phase"], event["time"]))
        elif event["type"] == "state" and event["state"] == "running":
            marks.append(("training and evaluation", event["time"]))
        elif event["type"] == "done":
            marks.append(("saving and the summary", event["time"]))
    ends = [time for _, time in marks[1:]] + [events[-1]["time"]]
    return {name: round(end - start, 1) for (name, start), end in zip(marks, ends, strict=True)}


async def flow(model: str, job_overrides: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Drive the four steps (see the module docstring) and return their times and results."""
    from textual.widgets import Input, Select, Static
    from textual.widgets.select import InvalidSelectValueError

    from engine.facade import STUDENT, Engine
    from mindset.app import MindsetApp
    from mindset.config import WorkbenchConfig
    from mindset.screens.quick_start import QuickStartScreen
    from mindset.widgets.chat_pane import ChatPane
    from mindset.widgets.memory_pane import MemoryPane
    from mindset.widgets.training_pane import TrainingPane

    engine = Engine(model)
    engine.job_overrides = job_overrides
    app = MindsetApp(engine, config=WorkbenchConfig())
    from mindset.commands.progress import progress

    steps: dict[str, float] = {}
    out: dict[str, Any] = {}
    bar = progress(4, "first ten minutes", "step")  # on a terminal only
    started = mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        steps[name] = round(now - mark, 1)
        mark = now
        bar.write(f"{name}: {steps[name]:.1f} s")
        bar.update()

    async with app.run_test(size=APP_SIZE) as pilot:
        await wait_until(pilot, lambda: isinstance(app.screen, QuickStartScreen)
                         and bool(app.screen.query("#quick-start-time")), timeout,
                         "the quick-start offer")
        line = app.screen.query_one("#quick-start-time", Static)
        await wait_until(pilot, lambda: "on this machine" in screen_text(line)
                         or "No time estimate" in screen_text(line), timeout, "the estimate")
        out["welcome_estimate"] = screen_text(line)
        out["welcome_result"] = screen_text(app.screen.query_one("#quick-start-result", Static))
        lap("start_to_offer_with_estimate")

        await pilot.press("enter")
        pane = app.query_one(TrainingPane)
        await wait_until(pilot, lambda: len(pane.jobs) == 1, timeout, "the job listed")
        await wait_until(pilot, lambda: pane.jobs[0].state in ("completed", "failed"),
                         timeout, "the quick start")
        if pane.jobs[0].state != "completed":
            raise RuntimeError(f"the quick start failed: {pane.jobs[0].error}")
        await wait_until(pilot, lambda: engine.student_spec is not None, timeout,
                         "the student loaded")
        summary = app.query_one("#job-summary", Static)
        await wait_until(pilot, lambda: "gap closed" in screen_text(summary), timeout,
                         "the summary")
        out["summary"] = screen_text(summary)
        run_dir = Path(pane.jobs[0].run_dir)
        report = json.loads((run_dir / "report.json").read_text())
        out["job_phases_s"] = job_phases(run_dir / "events.jsonl")
        out["report"] = {key: report.get(key) for key in (
            "ppl_teacher", "ppl_student", "ppl_ratio", "gap_closed", "kl", "top1_agreement")}
        lap("quick_start")

        await pilot.press("f2")
        memory = app.query_one(MemoryPane)
        await wait_until(pilot, lambda: memory.table_name is not None and len(memory.rows) > 0,
                         timeout, "the memory table")
        out["memory_table"] = memory.table_name
        lap("memory_pane")

        await pilot.press("f5")
        chat = app.query_one(ChatPane)
        select = app.query_one("#chat-model", Select)

        def student_chosen() -> bool:
            """Choose the student once the Chat pane offers it."""
            try:
                select.value = STUDENT
            except InvalidSelectValueError:
                return False
            return True

        await wait_until(pilot, student_chosen, timeout, "the student in Chat")
        await pilot.pause()
        box = app.query_one("#chat-input", Input)
        box.focus()
        box.value = QUESTION
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(chat.turns) >= 2 and not chat.workers, timeout,
                         "the student's reply")
        out["reply"] = chat.turns[-1].node.content
        lap("chat_reply")
    bar.close()
    await engine.close()
    out["steps_s"] = steps
    out["total_s"] = round(time.perf_counter() - started, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and tiny job: checks the flow, not the time")
    parser.add_argument("--setup-seconds", type=float, default=None,
                        help="the measured `make setup` time on a fresh clone, to add")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    model = "tiny-llama" if args.quick else args.model
    overrides: dict[str, Any] = (dict(block_size=32, batch_size=2, data_free_blocks=8,
                                      heldout_blocks=2) if args.quick else {})
    out_path = args.out or (Path(tempfile.mkdtemp()) / "first_ten_minutes.json"
                            if args.quick else RESULTS)
    with tempfile.TemporaryDirectory(prefix="mindset-first-run-") as home:
        os.environ["MINDSET_HOME"] = home  # an empty data directory, as on a fresh machine
        result = asyncio.run(flow(model, overrides, args.timeout))
    from engine.services.jobs import QUICK_START_LR, QUICK_START_OPTIONS, QUICK_START_STEPS

    settings = {"steps": QUICK_START_STEPS, "lr": QUICK_START_LR, **QUICK_START_OPTIONS}
    result = {"model": model, "question": QUESTION, "cpu_count": os.cpu_count(),
              "quick_start_settings": settings, **result}
    if args.setup_seconds is not None:
        result["setup_s"] = args.setup_seconds
        result["total_with_setup_s"] = round(result["total_s"] + args.setup_seconds, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("steps_s", "total_s")}, indent=2))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
