"""The Model pane's state and background work: measuring, evaluating, healing, saving.

:class:`SurgeryWork` is the base of :class:`mindset.widgets.model_pane.ModelPane`. It holds
what the pane knows about the original and the result (their shape reports, whether their
importance is measured, the last operation) and runs every slow engine call in a worker, so
the UI stays responsive: a status line says what is running. A change of model under a
running worker (a new result, another original) bumps an epoch, and the worker's late answer
is dropped. After each work step :meth:`views_changed` redraws; the pane extends it to redraw
its trees and details too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from contextlib import suppress
from pathlib import Path

from textual.containers import Vertical
from textual.css.query import NoMatches
from textual.markup import escape
from textual.widgets import Static

from engine.errors import MindsetError
from engine.facade import TEACHER
from engine.views import ShapeReport, SurgeryView
from mindset.protocols import ModelsAPI, SurgeryAPI
from mindset.screens.ask import AskScreen
from mindset.widgets.head_bars import comparison

ORIGINAL, RESULT = "original", "result"
HEAL_STEPS = "40"


class SurgeryWork(Vertical):
    """State and workers behind the Model pane (see the module docstring)."""

    def __init__(self, models: ModelsAPI, surgery: SurgeryAPI | None, *,
                 id: str | None = None) -> None:
        super().__init__(id=id)
        self.models = models
        self.surgery = surgery
        self.role = surgery.role if surgery is not None else TEACHER
        self.showing = ORIGINAL  # whose tree is shown: the original's or the result's
        self.reports: dict[str, ShapeReport] = {}
        self.measure_state: dict[str, str] = {}  # "", "measuring", "done" or an error line
        self.last_view: SurgeryView | None = None
        self.busy: dict[str, str] = {}  # running work -> its status line
        self.healing = False
        self._stop_heal = False
        self._epoch = {ORIGINAL: 0, RESULT: 0}

    def on_unmount(self) -> None:
        self._stop_heal = True  # a heal in the model threads stops at its next step

    # ---------------------------------------------------------------------- drawing

    def views_changed(self) -> None:
        """Redraw what depends on the state (the pane adds its trees and details)."""
        if self.surgery is None:
            return
        counts = self.last_view.counts if self.last_view is not None else []
        with suppress(NoMatches):
            self.query_one("#model-compare", Static).update(comparison(
                self.reports.get(ORIGINAL), self.reports.get(RESULT), self.surgery.perplexity,
                self.surgery.history, counts, self.role, "evaluate" in self.busy))

    def _set_busy(self, key: str, text: str | None) -> None:
        if text is None:
            self.busy.pop(key, None)
        else:
            self.busy[key] = text
        with suppress(NoMatches):
            self.query_one("#model-status", Static).update(
                "  ·  ".join(escape(line) for line in self.busy.values()))

    # -------------------------------------------------------------------- conditions

    def has_model(self, which: str) -> bool:
        if which == RESULT:
            return self.surgery is not None and self.surgery.result is not None
        return self.models.describe_model(self.role) is not None

    def ready(self, *, result: bool = False) -> bool:
        """Whether surgery can run now (else a warning says why)."""
        problem = ""
        if self.surgery is None:
            problem = "model surgery is not available in this workbench"
        elif not self.has_model(ORIGINAL):
            problem = f"the {self.role} is not loaded yet"
        elif self.healing:
            problem = "healing the result: wait for it to finish, or press h to stop it"
        elif result and self.surgery.result is None:
            problem = "no result yet: apply an operation first (o)"
        if problem:
            self.notify(problem, severity="warning")
        return not problem

    def forget(self, which: str) -> None:
        """``which`` changed: drop what was measured on it, and late answers about it."""
        self._epoch[which] += 1
        self.reports.pop(which, None)
        self.measure_state.pop(which, None)

    # ---------------------------------------------------------------------- workers

    def _run(self, work: Awaitable[None], group: str) -> None:
        self.run_worker(work, group=group, exclusive=True, exit_on_error=False)

    def measure(self, which: str) -> None:
        """Measure importance and usage of the original or the result in a worker."""
        self.measure_state[which] = "measuring"
        self._run(self._measure(which), f"model-measure-{which}")

    async def _measure(self, which: str) -> None:
        assert self.surgery is not None
        epoch = self._epoch[which]
        self._set_busy(f"measure-{which}", f"measuring the {which}'s importance and usage…")
        self.views_changed()
        try:
            report = await self.surgery.report(which)
        except MindsetError as exc:
            if epoch == self._epoch[which]:
                self.measure_state[which] = str(exc)
                self.notify(str(exc), title="measuring failed", severity="error")
        else:
            if epoch == self._epoch[which]:
                self.reports[which] = report
                self.measure_state[which] = "done"
        finally:
            self._set_busy(f"measure-{which}", None)
        self.views_changed()

    def result_changed(self) -> None:
        """A new result (applied or healed): its shape, both perplexities, its importance."""
        self.forget(RESULT)
        self.measure_state[RESULT] = "measuring"  # once evaluated (_after_change)
        self.views_changed()
        self._run(self._after_change(), "model-evaluate")

    async def _after_change(self) -> None:
        assert self.surgery is not None
        epoch = self._epoch[RESULT]
        try:
            self._set_busy("evaluate", "reading the result's shape…")
            shape = await self.surgery.report(RESULT, importance=False)
            if ORIGINAL not in self.reports:
                original = await self.surgery.report(ORIGINAL, importance=False)
                self.reports.setdefault(ORIGINAL, original)  # unless measured meanwhile
            if epoch != self._epoch[RESULT]:
                return
            self.reports[RESULT] = shape
            self.views_changed()
            if ORIGINAL not in self.surgery.perplexity:
                self._set_busy("evaluate", f"evaluating the {self.role}'s perplexity…")
                await self.surgery.evaluate(ORIGINAL)
                self.views_changed()
            self._set_busy("evaluate", "evaluating the result's perplexity…")
            await self.surgery.evaluate(RESULT)
        except MindsetError as exc:
            self.notify(str(exc), title="evaluation failed", severity="error")
        finally:
            self._set_busy("evaluate", None)
            self.views_changed()
        if epoch == self._epoch[RESULT]:
            self.measure(RESULT)

    # ------------------------------------------------------------ heal, save, discard

    def action_heal(self) -> None:
        if self.healing:
            self._stop_heal = True
            self.notify("stopping the heal after this step")
            return
        if self.ready(result=True):
            self.app.push_screen(AskScreen("heal the result: steps of distillation from the "
                                           "original", HEAL_STEPS), self._heal_answer)

    def _heal_answer(self, answer: str | None) -> None:
        if not answer:
            return
        try:
            steps = int(answer)
        except ValueError:
            self.notify(f"steps={answer!r}: give a whole number of steps", severity="error")
            return
        if self.ready(result=True):
            self.healing, self._stop_heal = True, False
            self._run(self._heal(steps), "model-heal")

    async def _heal(self, steps: int) -> None:
        assert self.surgery is not None
        loop = asyncio.get_running_loop()

        def progress(step: int, total: int, loss: float) -> None:  # in a model thread
            with suppress(RuntimeError):  # the loop has closed: nobody to tell
                loop.call_soon_threadsafe(self._set_busy, "heal",
                                          f"healing: step {step}/{total}, loss {loss:.3f} "
                                          "(h: stop)")

        self._set_busy("heal", f"healing: {steps} steps…")
        try:
            line = await self.surgery.heal(steps=steps, on_progress=progress,
                                           should_stop=lambda: self._stop_heal)
        except MindsetError as exc:
            self.notify(str(exc), title="healing failed", severity="error")
            return
        finally:
            self.healing = False
            self._set_busy("heal", None)
        self.notify(line, title="healed")
        self.result_changed()

    def action_save_result(self) -> None:
        if self.ready(result=True):
            default = str(Path.cwd() / f"{self.role}-reshaped")
            self.app.push_screen(AskScreen("save the result in (a new directory)", default),
                                 self._save_answer)

    def _save_answer(self, answer: str | None) -> None:
        if answer:
            self._run(self._save(answer), "model-save")

    async def _save(self, directory: str) -> None:
        assert self.surgery is not None
        self._set_busy("save", f"saving the result in {directory}…")
        try:
            path = await self.surgery.save(directory)
        except MindsetError as exc:
            self.notify(str(exc), title="not saved", severity="error", timeout=10)
        else:
            self.notify(f"saved the result in {path}", title="saved")
        finally:
            self._set_busy("save", None)

    def action_discard_result(self) -> None:
        if not self.ready(result=True) or self.surgery is None:
            return
        self.surgery.discard()
        self.last_view = None
        self.forget(RESULT)
        self.showing = ORIGINAL
        self.views_changed()
        self.notify("result discarded: the next operation starts from the original")
