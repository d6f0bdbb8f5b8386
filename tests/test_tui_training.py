"""The Training pane launches a real distillation process and follows it live."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, Log, ProgressBar, Static

from engine.errors import MindsetError
from engine.facade import Engine
from engine.services.jobs import (
    DoneEvent,
    ErrorEvent,
    JobEvent,
    ResumedEvent,
    StateEvent,
    StepEvent,
    UnknownEvent,
)
from engine.views import Availability, JobRequest, JobView
from mindset.widgets.training_pane import TrainingPane
from tests.test_tui_support import APP_SIZE, PaneHost, make_app, mounted, wait_for

TINY_JOB = dict(block_size=32, batch_size=2, data_free_blocks=8, heldout_blocks=2)


async def test_launch_follow_finish_and_reappear(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=runs)
    engine.jobs.job_overrides = dict(TINY_JOB)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        await pilot.press("f4")
        pane = await mounted(pilot, app, TrainingPane)
        app.query_one("#form-layers", Input).value = "1"
        app.query_one("#form-steps", Input).value = "6"
        app.query_one("#form-steps", Input).focus()

        def offered() -> set[str]:
            return {binding.action for _, binding, enabled, _ in
                    app.screen.active_bindings.values() if enabled}

        await pilot.pause()
        assert "control('pause')" not in offered()  # a letter here would type into the field
        await pilot.press("ctrl+l")
        await wait_for(pilot, lambda: len(pane.jobs) == 1, timeout=30)
        job_id = pane.jobs[0].id
        await wait_for(pilot, lambda: app.focused is app.query_one("#jobs-table"))
        await pilot.pause()
        assert "control('pause')" in offered()  # the job keys act on the list now
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


def first_run(tmp_path: Path) -> tuple[Engine, Any]:
    """A workbench on a tiny model with no student yet: it offers the quick start."""
    from mindset.app import MindsetApp
    from mindset.config import WorkbenchConfig

    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "runs")
    engine.jobs.job_overrides = dict(TINY_JOB)
    return engine, MindsetApp(engine, config=WorkbenchConfig())


async def accept_quick_start(pilot: Any, app: Any) -> TrainingPane:
    """Wait for the offer, accept it, and return the Training pane once its job is listed."""
    from mindset.screens.quick_start import QuickStartScreen

    await wait_for(pilot, lambda: isinstance(app.screen, QuickStartScreen), timeout=30)
    await pilot.press("enter")
    pane = await mounted(pilot, app, TrainingPane)
    await wait_for(pilot, lambda: len(pane.jobs) == 1, timeout=30)
    return pane


async def test_the_offer_says_what_it_makes_and_how_long_it_takes_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The welcome screen describes the student from the teacher's config and shows a time
    estimate from timing this machine; escape leaves without starting anything."""
    from mindset.screens.quick_start import QuickStartScreen

    monkeypatch.setenv("MINDSET_HOME", str(tmp_path / "home"))  # no cached corpus yet

    engine, app = first_run(tmp_path)
    async with app.run_test(size=APP_SIZE) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, QuickStartScreen)
                       and bool(app.screen.query("#quick-start-time")), timeout=30)
        result = app.screen.query_one("#quick-start-result", Static)
        estimate = app.screen.query_one("#quick-start-time", Static)
        await wait_for(pilot, lambda: "on this machine" in rendered(app, estimate), timeout=60)
        assert "writes its own training text" in rendered(app, estimate)
        text = " ".join(rendered(app, result).split())
        assert "layer 2 MLP" in text and "128 neurons" in text  # tiny-llama's, not a constant
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, QuickStartScreen)
        assert not engine.jobs._job_runner().jobs()


async def test_quick_start_offer_launches_and_cancel_stops(tmp_path: Path) -> None:
    """A first run offers the quick start; one key starts it, `c` cancels the job."""
    engine, app = first_run(tmp_path)
    # Tiny-llama finishes the quick start's 20 steps in a second: a long layer-local stage
    # keeps the job running until the cancel arrives.
    engine.jobs.job_overrides.update(local_steps=100_000, local_tokens=64, local_batch_tokens=8)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = await accept_quick_start(pilot, app)
        assert app.query_one("#tabs").active == "training"
        assert pane.jobs[0].layers == "2"  # the middle layer of four
        await wait_for(pilot, lambda: pane.jobs[0].state == "running", timeout=90)
        app.query_one("#jobs-table").focus()
        await pilot.press("c")
        await wait_for(pilot, lambda: pane.jobs[0].state == "cancelled", timeout=90)


def step(n: int, loss: float) -> StepEvent:
    return StepEvent(step=n, total_steps=4, stage="e2e", loss=loss, grad_norm=0.5, lr=1e-3,
                     tokens_per_s=100.0, eta_s=1.0, tokens_seen=64 * n, cpu_seconds=1.0,
                     batch_hash=n, kl=loss)


class FakeJobs:
    """The job service as the pane sees it (mindset.protocols.JobsAPI): one job whose
    events are released by the test, to check how the pane shows them."""

    default_teacher = "tiny-llama"

    def __init__(self) -> None:
        self.events: asyncio.Queue[JobEvent | None] = asyncio.Queue()
        self.followed: list[str] = []

    def availability(self) -> Availability:
        return Availability(True)

    def quick_start_request(self) -> JobRequest:
        return JobRequest()

    async def list_jobs(self) -> list[JobView]:
        return [JobView(id="job-1", state="running", step=0, total_steps=4,
                        teacher="tiny-llama", layers="1", memory="featural")]

    async def check_request(self, request: JobRequest) -> dict[str, str]:
        return {}

    async def launch_job(self, request: JobRequest) -> JobView:
        raise AssertionError("not launched in this test")

    async def estimate_request(self, request: JobRequest) -> Any:
        raise MindsetError("no estimates in this test")

    async def follow_job(self, job_id: str) -> AsyncIterator[JobEvent]:
        self.followed.append(job_id)
        while (event := await self.events.get()) is not None:
            yield event

    async def control_job(self, job_id: str, command: str) -> None:
        raise AssertionError("not controlled in this test")


async def test_the_followed_jobs_events_arrive_as_messages() -> None:
    jobs = FakeJobs()
    pane = TrainingPane(jobs, id="training-pane")
    app = PaneHost(pane)

    def log() -> str:
        return "\n".join(str(line) for line in app.query_one(Log).lines)

    async with app.run_test(size=APP_SIZE) as pilot:
        await wait_for(pilot, lambda: jobs.followed == ["job-1"], timeout=10)
        for event in (StateEvent(state="running", step=0), step(1, 3.0), step(2, 2.5),
                      ResumedEvent(from_step=1), step(2, 2.25), step(3, 2.0),
                      UnknownEvent(type="weather", data={"sky": "clear"})):
            await jobs.events.put(event)
        await wait_for(pilot, lambda: "weather" in log(), timeout=10)  # the last one
        # A resume repeats steps: the plot keeps the later loss.
        assert pane.points == [(1, 3.0), (2, 2.25), (3, 2.0)]
        bar = app.query_one(ProgressBar)
        assert (bar.total, bar.progress) == (4, 3)
        # The job list's own figures say step 0: its step and loss follow the live job.
        row = app.query_one("#jobs-table").get_row("job-1")  # type: ignore[attr-defined]
        assert row[2:4] == ["3/4", "2.0000"]
        assert "state: running at step 0" in log() and "resumed: from_step 1" in log()
        assert "weather: sky clear" in log()  # a newer worker's event type, shown as it is
        await jobs.events.put(DoneEvent(
            state="completed", teacher="tiny-llama", memory="featural", layers=[1],
            steps_done=4, total_steps=4, tokens_seen=256, cpu_seconds=1.0, wall_seconds=2.0,
            world_size=1, data="sampled", trainable_parameters=10, ppl_teacher=10.0,
            ppl_student=11.0, ppl_zeroed=40.0, ppl_ratio=1.1, gap_closed=0.97,
            kl_per_token=0.05, top1_agreement=0.9, heldout_tokens=62))
        await wait_for(pilot, lambda: "done:" in log(), timeout=10)
        assert bar.progress == 4
        assert "done: ppl_teacher 10, ppl_student 11, gap_closed 0.97" in log()
        detail = app.query_one("#job-detail")
        assert "eta 0:01" in str(detail.render()) and "eta" not in str(bar.render())  # one ETA
        summary = app.query_one("#job-summary", Static)
        await wait_for(pilot, lambda: "gap closed" in rendered(app, summary), timeout=10)
        text = rendered(app, summary)
        for figure in ("1.1000", "0.970", "0.0500", "90.0%", "10% worse than the teacher"):
            assert figure in text, figure
        await jobs.events.put(ErrorEvent(message="the teacher ran out of memory", step=3))
        await wait_for(pilot, lambda: "failed: the teacher ran out of memory"
                       in str(detail.render()), timeout=10)  # the error, not a progress line
        await jobs.events.put(None)


def rendered(app: Any, widget: Static) -> str:
    """A widget's content as the terminal shows it (Rich renderables included)."""
    from rich.console import Console

    console = Console(width=120, record=True, file=io.StringIO())
    console.print(widget.content)
    return console.export_text()


async def test_the_form_refuses_bad_fields_beside_them_without_starting_a_job(
        tmp_path: Path) -> None:
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "runs")
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        await pilot.press("f4")
        pane = await mounted(pilot, app, TrainingPane)
        app.query_one("#form-layers", Input).value = "99"
        app.query_one("#form-data", Input).value = str(tmp_path / "missing.txt")
        app.query_one("#form-lr", Input).value = "-1"
        await pilot.press("ctrl+l")
        layers_error = app.query_one("#form-layers-error", Static)
        await wait_for(pilot, lambda: "layer 99" in str(layers_error.render()))
        assert "4 layers" in str(layers_error.render())  # the teacher's own count
        assert "no such file" in str(app.query_one("#form-data-error", Static).render())
        assert "positive" in str(app.query_one("#form-lr-error", Static).render())
        assert not app.query_one("#form-steps-error", Static).display  # a good field: silent
        assert await engine.jobs.list_jobs() == [] and pane.jobs == []  # nothing started
        with pytest.raises(MindsetError, match="layers"):  # the engine refuses it as well
            await engine.jobs.launch_job(JobRequest(teacher="tiny-llama", layers="99"))


class FinishedJobs(FakeJobs):
    """One completed job whose run directory holds a saved student."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir

    async def list_jobs(self) -> list[JobView]:
        return [JobView(id="job-1", state="completed", step=4, total_steps=4,
                        teacher="tiny-llama", layers="1", memory="featural",
                        run_dir=str(self.run_dir))]


class StudentHost(PaneHost):
    """Records what the pane asks of the app: the student to adopt, the tab to show."""

    def __init__(self, pane: TrainingPane) -> None:
        super().__init__(pane)
        self.adopted: list[str] = []
        self.tabs: list[str] = []

    def adopt_student(self, directory: str) -> None:
        self.adopted.append(directory)

    def action_show_tab(self, tab_id: str) -> None:
        self.tabs.append(tab_id)


async def test_o_opens_a_finished_jobs_student_in_memory(tmp_path: Path) -> None:
    jobs = FinishedJobs(tmp_path / "run")
    pane = TrainingPane(jobs, id="training-pane")
    app = StudentHost(pane)
    async with app.run_test(size=APP_SIZE) as pilot:
        await wait_for(pilot, lambda: jobs.followed == ["job-1"], timeout=10)
        app.query_one("#jobs-table").focus()
        await pilot.press("o")  # no student saved yet: a warning, nothing adopted
        await wait_for(pilot, lambda: any("no student yet" in str(n.message)
                                          for n in app._notifications), timeout=10)
        assert app.adopted == [] and app.tabs == []
        (tmp_path / "run" / "student").mkdir(parents=True)
        await pilot.press("o")
        await wait_for(pilot, lambda: app.tabs == ["memory"], timeout=10)
        assert app.adopted == [str(tmp_path / "run" / "student")]
        await jobs.events.put(None)


async def test_a_starting_job_shows_its_phase_with_count_and_eta() -> None:
    from engine.services.jobs import PhaseEvent

    jobs = FakeJobs()
    pane = TrainingPane(jobs, id="training-pane")
    app = PaneHost(pane)
    async with app.run_test(size=APP_SIZE) as pilot:
        await wait_for(pilot, lambda: jobs.followed == ["job-1"], timeout=10)
        await jobs.events.put(StateEvent(state="starting", step=0))
        await jobs.events.put(PhaseEvent(phase="loading the teacher"))
        await jobs.events.put(PhaseEvent(phase="sampling training text from the teacher",
                                         done=3, total=18, unit="blocks", eta_s=75.0))
        detail = app.query_one("#job-detail", Static)
        await wait_for(pilot, lambda: "3/18 blocks" in str(detail.render()), timeout=10)
        assert "sampling training text from the teacher" in str(detail.render())
        assert "eta 1:15" in str(detail.render())
        lines = [str(line) for line in app.query_one(Log).lines]
        assert "phase: loading the teacher" in lines
        assert lines.count("phase: sampling training text from the teacher") == 1
        await jobs.events.put(None)


async def test_the_quick_start_runs_to_the_end_and_its_table_opens(tmp_path: Path) -> None:
    """The first-run flow on a tiny model: the offer, the job to completion with its summary,
    then the student's memory table in the Memory pane."""
    from mindset.widgets.memory_pane import MemoryPane

    engine, app = first_run(tmp_path)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = await accept_quick_start(pilot, app)
        await wait_for(pilot, lambda: pane.jobs[0].state == "completed", timeout=300)
        summary = app.query_one("#job-summary", Static)
        await wait_for(pilot, lambda: "gap closed" in rendered(app, summary), timeout=30)
        await wait_for(pilot, lambda: engine.student_spec is not None, timeout=60)
        app.query_one("#jobs-table").focus()
        await pilot.press("o")
        memory = app.query_one(MemoryPane)
        await wait_for(pilot, lambda: memory.table_name == "layer2_featural"
                       and len(memory.rows) > 0, timeout=60)
        assert app.query_one("#tabs").active == "memory"
