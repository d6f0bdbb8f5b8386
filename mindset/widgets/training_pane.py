"""The Training pane: launch distillation jobs, follow one live, control them.

Jobs run in their own processes (the engine's job runner) and write their events to their run
directories, so they outlive the app and reappear in the list when it opens again. The pane
talks to the job service through :class:`mindset.protocols.JobsAPI`; the selected job's typed
events arrive as :class:`TrainingPane.JobEventArrived` messages, posted by a worker that
consumes the service's event stream.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Button, DataTable, Input, Label, Log, ProgressBar, Select, Static
from textual_plotext import PlotextPlot

from engine.errors import MindsetError
from engine.services.jobs import (
    DoneEvent,
    ErrorEvent,
    EvalEvent,
    JobEvent,
    PhaseEvent,
    StateEvent,
    StepEvent,
    UnknownEvent,
    event_type,
)
from engine.views import JobOutcome, JobRequest, JobView
from mindset.protocols import JobsAPI
from mindset.widgets.form_estimate import FormEstimate
from mindset.widgets.job_summary import summary_table
from mindset.widgets.messages import JobsChanged
from mindset.widgets.training_form import option_fields, read_options, reveal_problems

# The job list is re-read this often: jobs started elsewhere (the CLI, another workbench)
# and state changes of jobs not being followed show up without a selection.
REFRESH_SECONDS = 1.0
PLOT_SECONDS = 0.5  # the loss plot is redrawn at most this often
MEMORY_KINDS = ("featural", "associative")


class TrainingPane(Horizontal):
    """A launch form on the left; the job list, loss plot, progress and log on the right."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+l", "launch", "Launch job", id="training.launch"),
        Binding("c", "control('cancel')", "Cancel job", id="training.cancel"),
        Binding("z", "control('pause')", "Pause job", id="training.pause"),
        Binding("g", "control('resume')", "Resume job", id="training.resume"),
        Binding("o", "open_student", "Open the student", id="training.open_student"),
    ]

    class JobEventArrived(Message, bubble=False):
        """One event of the followed job, from the worker that reads its stream."""

        def __init__(self, job_id: str, event: JobEvent) -> None:
            super().__init__()
            self.job_id = job_id
            self.event = event

    def __init__(self, jobs: JobsAPI, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.service = jobs
        self.jobs: list[JobView] = []
        self.selected: str | None = None
        self.points: list[tuple[int, float]] = []
        self.last_step: StepEvent | None = None
        self.last_phase = ""  # the phase before training last shown
        self._plot_stale = False
        self._rows: list[tuple[str, ...]] = []
        self._form_defaults: dict[str, str] = {}  # each form field's value as composed
        self._form_edited = False  # a user changed a setting: estimates follow the form

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="launch-form"):
            yield Static("[b]New distillation job[/b]")
            yield Label("teacher")
            yield Input(self.service.default_teacher, id="form-teacher")
            yield Static("", id="form-teacher-error", classes="field-error")
            yield Label("layers (e.g. 15, 8-10, all)")
            yield Input("middle", id="form-layers")
            yield Static("", id="form-layers-error", classes="field-error")
            yield Label("memory kind")
            yield Select([(k, k) for k in MEMORY_KINDS], value="featural", allow_blank=False,
                         id="form-memory")
            yield Static("", id="form-memory-error", classes="field-error")
            yield Label("data (file or folder; empty: sampled from the teacher)")
            yield Input("", id="form-data")
            yield Static("", id="form-data-error", classes="field-error")
            yield Label("steps")
            yield Input("200", id="form-steps", type="integer")
            yield Static("", id="form-steps-error", classes="field-error")
            yield Label("learning rate")
            yield Input("0.001", id="form-lr", type="number")
            yield Static("", id="form-lr-error", classes="field-error")
            yield from option_fields()  # augmentation, forgetful masking, label channels
            yield Static("", id="form-form-error", classes="field-error")
            yield FormEstimate(self.service, id="form-estimate")
            yield Button("Launch (ctrl+l)", variant="primary", id="form-launch")
        with Vertical(id="jobs-side"):
            yield Static("", id="jobs-missing")
            jobs: DataTable[str] = DataTable(id="jobs-table", cursor_type="row")
            yield jobs
            yield PlotextPlot(id="loss-plot")
            with Horizontal(id="job-progress-row"):
                # The job's own ETA (from its step times) is in the detail: one ETA, not two.
                yield ProgressBar(total=1, show_eta=False, id="job-progress")  # no job: 0%
                yield Static("", id="job-detail")
            yield Static("", id="job-summary")
            yield Log(id="job-log", max_lines=500)

    def on_mount(self) -> None:
        self._form_defaults = {str(field.id): str(field.value) for field in
                               self.query("#launch-form Input, #launch-form Select")
                               if isinstance(field, Input | Select)}
        self.query_one("#jobs-table", DataTable).add_columns(
            "job", "state", "step", "loss", "teacher", "layers", "memory"
        )
        plot = self.query_one(PlotextPlot)
        plot.plt.title("loss")
        plot.plt.xlabel("step")
        status = self.service.availability()
        if not status.ok:
            self.query_one("#jobs-missing", Static).update(
                f"[b]Training unavailable:[/b] {status.reason}"
            )
            return
        self.refresh_jobs()
        self.set_interval(REFRESH_SECONDS, self.refresh_jobs)
        self.set_interval(PLOT_SECONDS, self._draw_stale_plot)

    # ------------------------------------------------------------------------ job list

    @work(exclusive=True, group="jobs-list", exit_on_error=False)
    async def refresh_jobs(self) -> None:
        try:
            jobs = await self.service.list_jobs()
        except MindsetError as exc:
            self.query_one("#jobs-missing", Static).update(f"[b]Jobs:[/b] {exc}")
            return
        self.jobs = jobs
        self._show_jobs()
        running = sum(1 for job in jobs if job.state in ("starting", "running"))
        self.app.post_message(JobsChanged(running))
        if self.selected is None and jobs:
            self.select_job(jobs[0].id)

    def _job_row(self, job: JobView) -> tuple[str, ...]:
        """One job's cells; the followed job's step and loss come from its live events (the
        job list's own figures lag behind them)."""
        step, total, loss = job.step, job.total_steps, job.loss
        live = self.last_step
        if job.id == self.selected and live is not None and live.step >= step:
            step, total = live.step, live.total_steps or total
            loss = live.loss if math.isfinite(live.loss) else loss
        return (job.id, job.state, f"{step}/{total}",
                f"{loss:.4f}" if loss is not None else "", job.teacher, job.layers, job.memory)

    def _show_jobs(self) -> None:
        rows = [self._job_row(job) for job in self.jobs]
        if rows == self._rows:  # rebuilding the table every second costs the UI a repaint
            return
        self._rows = rows
        table = self.query_one("#jobs-table", DataTable)
        cursor = table.cursor_row
        table.clear()
        for row in rows:
            table.add_row(*row, key=row[0])
        if rows:
            table.move_cursor(row=max(0, min(cursor, len(rows) - 1)))

    @on(DataTable.RowHighlighted, "#jobs-table")
    def _job_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value and event.row_key.value != self.selected:
            self.select_job(event.row_key.value)

    def select_job(self, job_id: str) -> None:
        self.selected = job_id
        self.query_one("#job-summary", Static).display = False  # until this job's "done"
        self.points = []
        self.last_step = None
        self.last_phase = ""
        self.query_one(Log).clear()
        self._draw_plot()
        self.follow_job(job_id)

    # --------------------------------------------------------------------- live events

    @work(exclusive=True, group="jobs-follow", exit_on_error=False)
    async def follow_job(self, job_id: str) -> None:
        """Post the selected job's events as they are written, until its process ends."""
        try:
            async for event in self.service.follow_job(job_id):
                if job_id != self.selected:
                    return
                self.post_message(self.JobEventArrived(job_id, event))
        except MindsetError as exc:
            self.notify(str(exc), title="job events", severity="error")

    @on(JobEventArrived)
    def _job_event(self, message: JobEventArrived) -> None:
        if message.job_id == self.selected:  # not one queued before another selection
            self._on_event(message.event)

    def _on_event(self, event: JobEvent) -> None:
        log = self.query_one(Log)
        if isinstance(event, StepEvent):
            self.last_step = event
            if math.isfinite(event.loss):
                if self.points and self.points[-1][0] >= event.step:  # a resume repeats steps
                    self.points = [p for p in self.points if p[0] < event.step]
                self.points.append((event.step, event.loss))
                self._plot_stale = True  # drawn by the timer: a job logs many steps a second
            self._show_progress(event)
            self._show_jobs()  # the list's step and loss columns follow the live job
        elif isinstance(event, ErrorEvent):
            log.write_line(f"error: {event.message}")
            # A failed job shows its error where its progress was, not a stale progress line.
            self.query_one("#job-detail", Static).update(
                f"[b]failed:[/b] {escape(event.message)}")
            self.notify(event.message, title=f"job {self.selected} failed", severity="error",
                        timeout=12)
        elif isinstance(event, PhaseEvent):
            self._show_phase(event)
        elif isinstance(event, EvalEvent):
            log.write_line(f"step {event.step}: held-out perplexity {_fmt(event.heldout_ppl)}")
        elif isinstance(event, DoneEvent):
            log.write_line(f"done: ppl_teacher {_fmt(event.ppl_teacher)}, ppl_student "
                           f"{_fmt(event.ppl_student)}, gap_closed {_fmt(event.gap_closed)}, "
                           f"kl_per_token {_fmt(event.kl_per_token)}")
            bar = self.query_one(ProgressBar)
            if bar.total:
                bar.update(progress=bar.total)
            summary = self.query_one("#job-summary", Static)
            summary.display = True
            summary.update(summary_table(JobOutcome(
                event.ppl_teacher, event.ppl_student, event.ppl_zeroed, event.ppl_ratio,
                event.gap_closed, event.kl_per_token, event.top1_agreement,
                has_student=self._student_dir() is not None)))
            self._adopt_student()
        elif isinstance(event, StateEvent):
            log.write_line(f"state: {event.state} at step {event.step}")
        else:  # resumed, checkpoint, local_pairs, and types newer than this pane
            fields = (event.data if isinstance(event, UnknownEvent) else
                      {k: v for k, v in vars(event).items() if k not in ("time", "version")})
            log.write_line(f"{event_type(event)}: " + ", ".join(
                f"{k} {_fmt(v)}" for k, v in fields.items()))

    def _student_dir(self) -> str | None:
        """The selected job's saved student, if it has one."""
        job = next((j for j in self.jobs if j.id == self.selected), None)
        if job is None or not job.run_dir:
            return None
        directory = Path(job.run_dir) / "student"
        return str(directory) if directory.is_dir() else None

    def _adopt_student(self) -> bool:
        """A finished job's student becomes the workbench's student."""
        directory = self._student_dir()
        adopt = getattr(self.app, "adopt_student", None)
        if directory is None or adopt is None:
            return False
        adopt(directory)  # the app skips the student it already uses
        return True

    def action_open_student(self) -> None:
        """Load the selected job's student (if not already) and show it in Memory."""
        if not self._adopt_student():
            self.notify("the selected job has no student yet: it is saved when the job "
                        "completes", severity="warning")
            return
        show = getattr(self.app, "action_show_tab", None)
        if show is not None:
            show("memory")

    def _show_phase(self, event: PhaseEvent) -> None:
        """Work before training, with its count and ETA where it has them; a new phase also
        goes to the log."""
        parts = [event.phase]
        if event.total:
            parts.append(f"{event.done}/{event.total} {event.unit}".rstrip())
        if event.eta_s is not None and event.done:
            parts.append(f"eta {_clock(event.eta_s)}")
        self.query_one("#job-detail", Static).update(escape("  ·  ".join(parts)))
        if event.phase != self.last_phase:
            self.last_phase = event.phase
            self.query_one(Log).write_line(f"phase: {event.phase}")

    def _show_progress(self, event: StepEvent) -> None:
        if event.total_steps > 0:
            self.query_one(ProgressBar).update(total=event.total_steps, progress=event.step)
        detail = [f"loss {_fmt(event.loss)}", f"{event.tokens_per_s:.0f} tok/s",
                  f"eta {_clock(event.eta_s)}"]
        self.query_one("#job-detail", Static).update("  ".join(detail))
        if event.step <= 3 or event.step % 10 == 0:
            self.query_one(Log).write_line(f"step {event.step}: " + "  ".join(detail))

    def _draw_stale_plot(self) -> None:
        if self._plot_stale:
            self._draw_plot()

    def _draw_plot(self) -> None:
        self._plot_stale = False
        plot = self.query_one(PlotextPlot)
        plot.plt.clear_data()
        if self.points:
            steps, losses = zip(*self.points, strict=True)
            plot.plt.plot(list(steps), list(losses), marker="braille")
        plot.refresh()

    # ------------------------------------------------------------------------- actions

    @on(Input.Changed, "#launch-form Input")
    @on(Select.Changed, "#launch-form Select")
    def _form_changed(self, event: Input.Changed | Select.Changed) -> None:
        """Estimate the form's job again once a user has changed a setting."""
        if not self._form_edited and self._form_defaults.get(
                str(event.control.id)) == str(event.value):
            return  # a field announcing its composed value: nothing to estimate yet
        self._form_edited = True
        self.query_one(FormEstimate).request_estimate(self._request(show_problems=False))

    def _request(self, *, show_problems: bool = True) -> JobRequest | None:
        def value(widget_id: str) -> str:
            return self.query_one(widget_id, Input).value.strip()

        problems: dict[str, str] = {}
        steps, lr = 0, 0.0
        try:
            steps = int(value("#form-steps"))
        except ValueError:
            problems["steps"] = "give a whole number of steps"
        try:
            lr = float(value("#form-lr"))
        except ValueError:
            problems["lr"] = "give the learning rate as a number, such as 0.001"
        options, more = read_options(self)
        problems.update(more)
        if problems:
            if show_problems:
                self._show_problems(problems)
            return None
        memory = self.query_one("#form-memory", Select).value
        return JobRequest(
            teacher=value("#form-teacher") or self.service.default_teacher,
            layers=value("#form-layers") or "middle",
            memory=str(memory),
            data=value("#form-data") or None,
            steps=steps,
            lr=lr,
            options=options,
        )

    @on(Button.Pressed, "#form-launch")
    def action_launch(self) -> None:
        request = self._request()
        if request is not None:
            self.launch(request)

    def start_quick_start(self) -> None:
        """One layer of the teacher, a few minutes, followed live."""
        self.launch(self.service.quick_start_request())

    def _show_problems(self, problems: dict[str, str]) -> None:
        """Each problem beside its field (and nothing beside the others)."""
        for error in self.query(".field-error").results(Static):
            field = (error.id or "").removeprefix("form-").removesuffix("-error")
            message = problems.get(field, "")
            error.update(escape(message))
            error.display = bool(message)  # an empty one takes no line of the form
        reveal_problems(self, problems)
        if problems:
            self.notify("the job was not started: see the marked fields", severity="error")

    @work(group="jobs-launch", exit_on_error=False)
    async def launch(self, request: JobRequest) -> None:
        status = self.service.availability()
        if not status.ok:
            self.notify(status.reason, severity="error")
            return
        try:  # checked here in seconds, not by a worker that failed a minute later
            problems = await self.service.check_request(request)
        except MindsetError as exc:
            problems = {"form": str(exc)}
        self._show_problems(problems)
        if problems:
            return
        try:
            job = await self.service.launch_job(request)
        except MindsetError as exc:
            self.notify(str(exc), title="job not started", severity="error", timeout=12)
            return
        self.notify(f"job {job.id} started")
        self.select_job(job.id)
        self.refresh_jobs()
        # The job keys (pause, resume, cancel) act on the list: a letter typed in the form
        # would go into its field instead.
        self.query_one("#jobs-table", DataTable).focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """The job keys are letters: while a form field has the focus they would type into
        it, so the footer offers them only elsewhere."""
        letters = ("control", "open_student")
        return not (action in letters and isinstance(self.app.focused, Input | Select))

    @work(group="jobs-control", exit_on_error=False)
    async def action_control(self, command: str) -> None:
        if self.selected is None:
            self.notify("no job selected", severity="warning")
            return
        try:
            await self.service.control_job(self.selected, command)
        except MindsetError as exc:
            self.notify(str(exc), title=f"{command} failed", severity="error")
            return
        self.notify(f"{command}: sent to job {self.selected}")
        if command == "resume":
            self.follow_job(self.selected)
        self.refresh_jobs()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _clock(seconds: float) -> str:
    """An ETA as h:mm:ss (or m:ss); '--' while unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "--"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
