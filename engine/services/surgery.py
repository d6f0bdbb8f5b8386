"""The surgery service: change a loaded model's shape and see what it costs.

The Model pane works on one *original* (the teacher, or the student when one is loaded) and
at most one *result*: each applied operation (see
:mod:`engine.model.architecture.operations`) builds a new result from the current one (or
from the original), so operations chain; the original is never modified. A preview runs the
operation and throws the model away, keeping only the changes and parameter counts.

Importance and usage are measured on calibration text, and held-out perplexity on other text:
both come from ``data_path`` when it is set (its first part calibrates, its last tenth is
held out), otherwise from text sampled from the original model with fixed seeds, so a fresh
install needs no file. Everything that touches torch runs in the runtime's model threads.

Importing this module is cheap: torch and the model code load on first use.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import InputError, MindsetError, one_line
from engine.runtime import STUDENT, TEACHER, Runtime
from engine.views import HeadStat, LayerStat, ShapeReport, SurgeryView

if TYPE_CHECKING:
    import torch

    from engine.model.loading import LoadedModel

ORIGINAL, RESULT = "original", "result"
CALIBRATION_BLOCKS, HELDOUT_BLOCKS, BLOCK = 8, 8, 96
HEAL_STEPS = 40


class SurgeryService:
    """Operations, previews, importance, evaluation, healing and saving for the Model pane."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.role = TEACHER
        self.result: LoadedModel | None = None
        self.history: list[str] = []  # one line per applied operation
        self.perplexity: dict[str, float] = {}
        self.data_path: str | None = None
        self._blocks: dict[tuple[str, str], torch.Tensor] = {}

    @staticmethod
    def operations() -> dict[str, str]:
        from engine.model.architecture.operations import OPERATIONS

        return dict(OPERATIONS)

    # ------------------------------------------------------------------------------ models

    async def original(self) -> LoadedModel:
        return await self.runtime.load_model(self.role)

    def set_role(self, role: str) -> None:
        """Work on the teacher or the student from now on (drops any result)."""
        if role not in (TEACHER, STUDENT):
            raise InputError(f"role {role!r}: operate on the {TEACHER} or the {STUDENT}")
        if role != self.role:
            self.role = role
            self.discard()
            self.perplexity.clear()

    def discard(self) -> None:
        self.result = None
        self.history.clear()
        self.perplexity.pop(RESULT, None)

    async def _model(self, which: str) -> LoadedModel:
        if which == RESULT:
            if self.result is None:
                raise InputError("no result yet: apply an operation first")
            return self.result
        return await self.original()

    def set_data(self, path: str | None) -> None:
        """Measure on this text file from now on (None: text sampled from the model)."""
        if path:
            from engine.textdata import read_text_file

            read_text_file(path)  # a clear error now, not inside a worker
        self.data_path = path or None
        self._blocks.clear()
        self.perplexity.clear()

    # ------------------------------------------------------------------------------- text

    def _text_blocks(self, loaded: LoadedModel, part: str) -> torch.Tensor:
        """Calibration or held-out token blocks [n, BLOCK] (cached per source)."""
        key = (self.data_path or f"sampled:{loaded.spec}", part)
        if key in self._blocks:
            return self._blocks[key]
        if self.data_path:
            from engine.distill.heal import heal_blocks

            blocks = heal_blocks(loaded.tokenizer, [self.data_path], BLOCK)
            held = max(1, len(blocks) // 10)
            chosen = blocks[-held:] if part == "heldout" else blocks[:-held] if \
                len(blocks) > 1 else blocks
        else:
            from engine.distill.data import sample_corpus

            seed = 11 if part == "heldout" else 0
            count = HELDOUT_BLOCKS if part == "heldout" else CALIBRATION_BLOCKS
            chosen = sample_corpus(loaded.model, loaded.tokenizer, blocks=count,
                                   block_size=BLOCK, seed=seed)
        self._blocks[key] = chosen
        return chosen

    def _source(self) -> str:
        return self.data_path or f"text sampled from the {self.role}"

    # ------------------------------------------------------------------------ operations

    async def _run(self, name: str, params: dict[str, Any], base: LoadedModel
                   ) -> tuple[Any, SurgeryView]:
        original = await self.original()

        def work() -> tuple[Any, SurgeryView]:
            from engine.model.architecture.counts import format_counts
            from engine.model.architecture.operations import run_operation

            needs = name == "resize" or (name == "prune-heads" and not params.get("heads")
                                         and params.get("by", "importance") == "importance")
            ids = self._text_blocks(original, "calibration") if needs else None
            outcome = run_operation(base.model, name, params, calibration_ids=ids)
            view = SurgeryView(name, dict(params), outcome.changes,
                               format_counts(outcome.before, outcome.after),
                               outcome.before.total, outcome.after.total)
            return outcome.model, view

        return await self._guarded(work, f"{name} failed")

    async def _guarded(self, work: Callable[[], Any], what: str) -> Any:
        try:
            return await self.runtime.in_models(work)
        except MindsetError:
            raise
        except Exception as exc:  # an unexpected failure still reaches the user as one line
            raise MindsetError(f"{what}: {one_line(exc)}") from exc

    async def _base(self) -> LoadedModel:
        return self.result if self.result is not None else await self.original()

    async def preview(self, name: str, params: dict[str, Any]) -> SurgeryView:
        """What ``name`` would change, applied to the current result (or the original)."""
        _model, view = await self._run(name, params, await self._base())
        return view

    async def apply(self, name: str, params: dict[str, Any]) -> SurgeryView:
        """Apply ``name``; its model becomes the result (operations chain)."""
        from engine.model.loading import LoadedModel

        base = await self._base()
        model, view = await self._run(name, params, base)
        self.result = LoadedModel(model, base.tokenizer, f"{base.spec} (reshaped)",
                                  base.family, source=None)
        self.history.append(f"{name}: " + "; ".join(view.changes[:2]))
        self.perplexity.pop(RESULT, None)
        return view

    # ------------------------------------------------------------------ measuring, healing

    async def report(self, which: str = ORIGINAL, *, importance: bool = True) -> ShapeReport:
        """Per layer: heads (importance, gates), MLP or memory, usage on calibration text."""
        loaded = await self._model(which)
        original = await self.original()

        def work() -> ShapeReport:
            return shape_report(loaded, self._text_blocks(original, "calibration")
                                if importance else None, f"{which}: {loaded.spec}",
                                self._source())

        result: ShapeReport = await self._guarded(work, "measuring importance failed")
        return result

    async def evaluate(self, which: str = ORIGINAL) -> float:
        """Held-out perplexity of the original or the result (kept in ``perplexity``)."""
        loaded = await self._model(which)
        original = await self.original()

        def work() -> float:
            from engine.distill.heal import held_out_perplexity

            return held_out_perplexity(loaded.model, self._text_blocks(original, "heldout"))

        value: float = await self._guarded(work, "evaluation failed")
        self.perplexity[which] = value
        return value

    async def heal(self, *, steps: int = HEAL_STEPS, train: str = "all", lr: float | None = None,
                   gate_sparsity: float = 0.0,
                   on_progress: Callable[[int, int, float], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> str:
        """A short distillation from the original into the result (in place)."""
        result = await self._model(RESULT)
        original = await self.original()

        def work() -> str:
            from engine.distill.heal import HealConfig, heal

            config = HealConfig(steps=steps, train=train, gate_sparsity=gate_sparsity,
                                block_size=BLOCK, warmup=min(10, steps // 5))
            if lr is not None:
                config.lr = lr
            config.validate()
            blocks = self._text_blocks(original, "calibration")
            model = copy.deepcopy(result.model)  # a failed heal leaves the result as it was

            def progress(update: Any) -> None:
                if on_progress is not None:
                    on_progress(int(update.step), int(update.total), float(update.loss))

            report = heal(model, original.model, blocks, config, progress=progress,
                          should_stop=should_stop)
            result.model = model
            first, last = report.first_loss, report.last_loss
            losses = "" if first is None or last is None else \
                f": loss {first:.3f} -> {last:.3f}"
            return f"healed {report.steps} steps ({train}){losses}"

        line: str = await self._guarded(work, "healing failed")
        self.history.append(line)
        self.perplexity.pop(RESULT, None)
        return line

    async def save(self, directory: str) -> str:
        """Write the result as a new model directory; returns its path."""
        result = await self._model(RESULT)
        if not directory.strip():
            raise InputError("give a directory to save the result in")

        def work() -> str:
            from engine.model.shaped_files import save_model

            return str(save_model(result.model, Path(directory), result.tokenizer))

        saved: str = await self._guarded(work, "saving failed")
        return saved


def shape_report(loaded: LoadedModel, calibration: torch.Tensor | None, title: str,
                 source: str) -> ShapeReport:
    """The Model pane's per-layer view of ``loaded`` (importance when calibration is given)."""
    from engine.model.architecture.counts import parameter_counts
    from engine.model.architecture.importance import head_importance, memory_usage, mlp_usage
    from engine.model.architecture.summary import layer_table

    model = loaded.model
    counts = parameter_counts(model)
    importance = head_importance(model, calibration) if calibration is not None else None
    from engine.model.anatomy import decoder_layers, mlp_of
    from engine.model.architecture.record import is_dense_mlp
    from engine.model.surgery import memory_layers

    dense = any(is_dense_mlp(mlp_of(model, i)) for i in range(len(decoder_layers(model))))
    neurons = mlp_usage(model, calibration) if calibration is not None and dense else {}
    slots = memory_usage(model, calibration) if calibration is not None and \
        memory_layers(model) else {}
    layers = []
    for row in layer_table(model, importance):
        index = row["layer"]
        scores = row.get("importance") or [None] * row["heads"]
        gates = row.get("gates") or [None] * row["heads"]
        usage = ""
        if index in neurons:
            summary = neurons[index].summary()
            usage = f"mlp: {summary['mean_active_share']:.0%} of neurons active on average"
        elif index in slots:
            usage = f"memory: {slots[index].never_read_share():.0%} of slots never read"
        layers.append(LayerStat(index, row["heads"], row["kv_heads"], counts.layers[index].total,
                                row.get("mlp"), row.get("memory"), usage,
                                [HeadStat(index, h, scores[h], gates[h])
                                 for h in range(row["heads"])]))
    return ShapeReport(title, counts.total, layers, source if calibration is not None else "")
