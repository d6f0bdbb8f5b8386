"""The launch form's time estimate: how long its settings take on this machine.

After the form's settings change (and settle for a moment), the job service estimates the
request (:meth:`engine.services.jobs.JobService.estimate_request`: the teacher is timed once,
then it is arithmetic) and this line shows the result under the form, as a warning, with the
phase that takes the time, when it comes to an hour or more.
"""

from __future__ import annotations

from textual import work
from textual.timer import Timer
from textual.widgets import Static

from engine.errors import MindsetError
from engine.views import JobRequest
from mindset.protocols import JobsAPI

SETTLE_SECONDS = 0.6  # typing pauses this long before the form is estimated again
HOURS_WARNING_S = 3600.0


class FormEstimate(Static):
    """One line: the estimated time of the form's job, or nothing while it is unknown."""

    def __init__(self, jobs: JobsAPI, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.jobs = jobs
        self._pending: JobRequest | None = None
        self._timer: Timer | None = None

    def request_estimate(self, request: JobRequest | None) -> None:
        """Estimate ``request`` once the form settles (None: the form has a problem)."""
        self._pending = request
        if self._timer is not None:
            self._timer.stop()
        if request is None:
            self._show("", warn=False)
            return
        self._timer = self.set_timer(SETTLE_SECONDS, self._estimate_pending)

    def _estimate_pending(self) -> None:
        if self._pending is not None:
            self.update("[dim]estimating the time on this machine...[/dim]")
            self.estimate(self._pending)

    @work(exclusive=True, group="form-estimate", exit_on_error=False)
    async def estimate(self, request: JobRequest) -> None:
        from engine.services.jobs import format_duration

        try:
            estimate = await self.jobs.estimate_request(request)
        except MindsetError:  # the launch marks a wrong field; no estimate until it is fixed
            self._show("", warn=False)
            return
        if request is not self._pending:  # the form changed while this one ran
            return
        total = estimate.total_s
        if total < HOURS_WARNING_S:
            self._show(f"estimated time on this machine: {format_duration(total)}", warn=False)
            return
        name, seconds = max(estimate.parts, key=lambda part: part[1])
        self._show(f"[b]This job would take {format_duration(total)} on this machine[/b], "
                   f"{format_duration(seconds)} of it {name}. Fewer steps, a smaller batch "
                   "or block, or a data file instead of sampled text shorten it.", warn=True)

    def _show(self, text: str, *, warn: bool) -> None:
        self.update(text)
        self.set_class(warn, "estimate-warning")
        self.display = bool(text)
