"""The Training pane launches a real distillation process and follows it live."""

from __future__ import annotations

import json
from pathlib import Path

from textual.widgets import Input, ProgressBar

from engine.facade import Engine
from mindset.widgets.training_pane import TrainingPane
from tests.test_tui_support import APP_SIZE, make_app, mounted, wait_for

TINY_JOB = dict(block_size=32, batch_size=2, data_free_blocks=8, heldout_blocks=2)


async def test_launch_follow_finish_and_reappear(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=runs)
    engine.job_overrides = dict(TINY_JOB)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        await pilot.press("f4")
        pane = await mounted(pilot, app, TrainingPane)
        app.query_one("#form-layers", Input).value = "1"
        app.query_one("#form-steps", Input).value = "6"
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: len(pane.jobs) == 1, timeout=30)
        job_id = pane.jobs[0].id
        await wait_for(pilot, lambda: pane.jobs[0].state == "completed", timeout=150)
        await wait_for(pilot, lambda: len(pane.points) == 6)
        # The plot holds exactly the steps and losses the training process wrote...
        written = [json.loads(line) for line in
                   (runs / job_id / "events.jsonl").read_text().splitlines() if line]
        losses = [(e["step"], e["loss"]) for e in written if e["type"] == "step"]
        assert pane.points == losses
        assert [step for step, _ in pane.points] == [1, 2, 3, 4, 5, 6]
        # ...and draws them (plotext's braille line) on screen.
        app.query_one("#jobs-table").focus()
        await wait_for(pilot, lambda: any(0x2800 < ord(ch) <= 0x28FF
                                          for ch in app.export_screenshot()), timeout=10)
        bar = app.query_one(ProgressBar)
        assert bar.total == 6 and bar.progress == 6
        # The status bar polls the jobs: under load it may lag the pane by a tick.
        await wait_for(pilot, lambda: str(app.query_one("#status").render()).count(
            "0 jobs running") == 1, timeout=15)
        # The finished job's student becomes the workbench's student.
        await wait_for(pilot, lambda: engine.student_spec is not None, timeout=30)
        assert engine.student_spec == str(runs / job_id / "student")

    # A new workbench over the same runs directory lists the job again.
    engine2 = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=runs)
    app2 = make_app(engine2)
    async with app2.run_test(size=APP_SIZE) as pilot:
        pane2 = await mounted(pilot, app2, TrainingPane)
        await wait_for(pilot, lambda: [j.id for j in pane2.jobs] == [job_id], timeout=30)
        await wait_for(pilot, lambda: len(pane2.points) == 6, timeout=30)


async def test_quick_start_offer_launches_and_cancel_stops(tmp_path: Path) -> None:
    """A first run offers the quick start; one key starts it, `c` cancels the job."""
    from mindset.app import MindsetApp
    from mindset.config import WorkbenchConfig
    from mindset.screens.quick_start import QuickStartScreen

    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "runs")
    engine.job_overrides = dict(TINY_JOB)
    app = MindsetApp(engine, config=WorkbenchConfig())
    async with app.run_test(size=APP_SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, QuickStartScreen), timeout=30)
        await pilot.press("enter")
        pane = await mounted(pilot, app, TrainingPane)
        await wait_for(pilot, lambda: len(pane.jobs) == 1, timeout=30)
        assert app.query_one("#tabs").active == "training"
        assert pane.jobs[0].layers == "2"  # the middle layer of four
        await wait_for(pilot, lambda: pane.jobs[0].state == "running", timeout=90)
        app.query_one("#jobs-table").focus()
        await pilot.press("c")
        await wait_for(pilot, lambda: pane.jobs[0].state == "cancelled", timeout=90)
