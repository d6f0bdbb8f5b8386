"""The Model pane's operation form: pick an operation, fill its parameters, preview, apply.

The fields of every operation (see ``engine.model.architecture.operations``) are built once
and only the chosen operation's are shown, each pre-filled from the pane's selection (a
selected head names itself for prune-heads, a selected layer its index everywhere). Preview
and apply run in workers, so the form stays responsive while the engine copies a model; a bad
request leaves the form open with the engine's one-line error as a notification, and nothing
changed. A successful apply dismisses the form with the operation's
:class:`engine.views.SurgeryView`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.console import Group
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.markup import escape
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from engine.errors import MindsetError
from engine.views import ModelNode, ShapeReport, SurgeryView
from mindset.protocols import SurgeryAPI


@dataclass(frozen=True)
class Field:
    """One parameter of an operation: ``kind`` is int, float, text, choice or flag."""

    name: str
    label: str
    kind: str = "int"
    default: str = ""
    choices: tuple[str, ...] = ()


FIELDS: dict[str, tuple[Field, ...]] = {
    "add-gates": (
        Field("layers", "layers (all, an index, a list or range: 0,2 or 1-3)", "text", "all"),
        Field("init", "initial gate logit (gates start at its sigmoid; output unchanged)",
              "float", "0"),
    ),
    "grow-heads": (
        Field("layer", "layer"),
        Field("count", "heads to add", default="1"),
        Field("new_kv", "give the new heads their own key/value heads", "flag"),
    ),
    "prune-heads": (
        Field("heads", "heads as layer:head pairs (3:0,3:5); empty: prune a fraction", "text"),
        Field("fraction", "fraction of all heads to prune (when no heads are named)", "float"),
        Field("by", "order for a fraction", "choice", "importance",
              ("importance", "random", "gates")),
    ),
    "resize": (
        Field("layer", "layer"),
        Field("mlp", "new MLP width in neurons, for a dense layer (filled in: its width now)"),
        Field("memory", "new memory size in slots (a memory layer)"),
    ),
    "drop-layer": (Field("layer", "layer to remove"),),
    "add-layer": (Field("position", "position of the new layer (it copies the one before)"),),
    "add-feedback": (
        Field("rank", "rank of the feedback projection", default="32"),
        Field("layers", "layers (all, an index, a list or range)", "text", "all"),
    ),
}


def suggested_operation(node: ModelNode | None) -> str:
    """The operation the selection most likely asks for."""
    kind = node.kind if node is not None else ""
    return {"head": "prune-heads", "attention": "prune-heads", "mlp": "resize",
            "memory": "resize", "layer": "drop-layer"}.get(kind, "add-gates")


def prefill(node: ModelNode | None, report: ShapeReport | None) -> dict[str, dict[str, str]]:
    """Each operation's field values for the selection (defaults where it says nothing)."""
    values = {op: {f.name: f.default for f in fields} for op, fields in FIELDS.items()}
    layer = node.layer if node is not None else None
    if layer is None:
        count = len(report.layers) if report is not None else None
        values["add-layer"]["position"] = "" if count is None else str(count)
        values["prune-heads"]["fraction"] = "0.1"
        return values
    for op in ("grow-heads", "resize", "drop-layer"):
        values[op]["layer"] = str(layer)
    values["add-gates"]["layers"] = str(layer)
    values["add-feedback"]["layers"] = str(layer)
    values["add-layer"]["position"] = str(layer + 1)  # after the selection, copying it
    stat = next((x for x in report.layers if x.layer == layer), None) if report else None
    if stat is not None and stat.kv_heads < stat.heads:  # grouped: one head per group
        values["grow-heads"]["count"] = str(stat.kv_heads)
    head = node.head if node is not None else None
    if head is None and stat is not None:  # a layer: its least important head, if measured
        scored = [h for h in stat.head_stats if h.importance is not None]
        if scored:
            head = min(scored, key=lambda h: h.importance or 0.0).head
    if head is not None:
        values["prune-heads"]["heads"] = f"{layer}:{head}"
    else:
        values["prune-heads"]["fraction"] = "0.1"
    if node is not None and node.kind == "memory":
        slots = re.search(r"(\d+) slots", node.detail)  # "FeaturalMemory 32 slots"
        values["resize"]["memory"] = slots.group(1) if slots else ""
    elif stat is not None and stat.mlp is not None:
        values["resize"]["mlp"] = str(stat.mlp)
    return values


def _number(text: str, kind: str) -> Any:
    """A typed value where the text is one; otherwise the text, for the engine to refuse."""
    try:
        return int(text) if kind == "int" else float(text)
    except ValueError:
        return text


class SurgeryFormScreen(ModalScreen[SurgeryView | None]):
    """One operation's parameters, a preview of its changes, and Apply."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel", id="surgery.cancel"),
        Binding("ctrl+r", "preview", "Preview", id="surgery.preview"),
        Binding("ctrl+s", "apply", "Apply", id="surgery.apply"),
    ]

    def __init__(self, surgery: SurgeryAPI, operation: str, node: ModelNode | None,
                 report: ShapeReport | None, target: str) -> None:
        super().__init__()
        self.surgery = surgery
        self.descriptions = surgery.operations()
        self.operation = operation if operation in FIELDS else "add-gates"
        self.values = prefill(node, report)
        self.target = target
        self.busy = ""
        self.last_preview: SurgeryView | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="surgery-box"):
            yield Static(f"[b]Reshape[/b] {escape(self.target)}  [dim](the original is never "
                         "changed)[/dim]", id="surgery-title")
            yield Select([(op, op) for op in FIELDS], value=self.operation, allow_blank=False,
                         id="surgery-op", compact=True)
            yield Static("", id="surgery-about")
            for op, fields in FIELDS.items():
                with Vertical(id=f"surgery-fields-{op}", classes="surgery-fields"):
                    for spec in fields:
                        yield from self._field(op, spec)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Preview (ctrl+r)", id="surgery-preview-button", compact=True)
                yield Button("Apply (ctrl+s)", variant="primary", id="surgery-apply-button",
                             compact=True)
                yield Button("Cancel (esc)", id="surgery-cancel-button", compact=True)
            yield Static("", id="surgery-status")
            yield Static("", id="surgery-preview")

    def _field(self, op: str, spec: Field) -> ComposeResult:
        widget_id = f"surgery-{op}-{spec.name}"
        value = self.values[op].get(spec.name, spec.default)
        if spec.kind == "flag":
            yield Checkbox(spec.label, value=value == "true", id=widget_id, compact=True)
            return
        yield Label(spec.label)
        if spec.kind == "choice":
            yield Select([(c, c) for c in spec.choices], value=value or spec.choices[0],
                         allow_blank=False, id=widget_id, compact=True)
        else:
            yield Input(value, id=widget_id, compact=True)

    def on_mount(self) -> None:
        self._show_operation()

    def _show_operation(self) -> None:
        for op in FIELDS:
            self.query_one(f"#surgery-fields-{op}").display = op == self.operation
        about = self.descriptions.get(self.operation, "")
        self.query_one("#surgery-about", Static).update(f"[i]{escape(about)}[/i]")
        self.query_one("#surgery-preview", Static).update("")
        self.last_preview = None
        first = self.query(f"#surgery-fields-{self.operation} Input")
        if first:
            first.first().focus()

    @on(Select.Changed, "#surgery-op")
    def _operation_changed(self, event: Select.Changed) -> None:
        if event.value != self.operation and isinstance(event.value, str):
            self.operation = event.value
            self._show_operation()

    def request(self) -> tuple[str, dict[str, Any]]:
        """The chosen operation and its given parameters (empty fields left out)."""
        params: dict[str, Any] = {}
        for spec in FIELDS[self.operation]:
            widget_id = f"#surgery-{self.operation}-{spec.name}"
            if spec.kind == "flag":
                params[spec.name] = self.query_one(widget_id, Checkbox).value
            elif spec.kind == "choice":
                params[spec.name] = str(self.query_one(widget_id, Select).value)
            else:
                text = self.query_one(widget_id, Input).value.strip()
                if text:
                    params[spec.name] = text if spec.kind == "text" else \
                        _number(text, spec.kind)
        if self.operation == "prune-heads" and params.get("heads"):
            params.pop("fraction", None)  # named heads win: the preview shows what is used
            params.pop("by", None)
        return self.operation, params

    # ------------------------------------------------------------------------- running

    def _status(self, text: str) -> None:
        self.query_one("#surgery-status", Static).update(text)

    def _start(self, what: str) -> bool:
        if self.busy:
            self.notify(f"wait: {self.busy}", severity="warning")
            return False
        self.busy = what
        self._status(f"[dim]{escape(what)}…[/dim]")
        return True

    def _failed(self, name: str, exc: MindsetError) -> None:
        self.notify(str(exc), title=f"{name}: nothing changed", severity="error", timeout=10)
        self._status(f"[$error]{escape(str(exc))}[/]")

    @on(Button.Pressed, "#surgery-preview-button")
    @on(Input.Submitted)
    def action_preview(self) -> None:
        name, params = self.request()
        if self._start(f"previewing {name}"):
            self.run_preview(name, params)

    @work(group="surgery-form", exit_on_error=False)
    async def run_preview(self, name: str, params: dict[str, Any]) -> None:
        try:
            view = await self.surgery.preview(name, params)
        except MindsetError as exc:
            self._failed(name, exc)
            return
        finally:
            self.busy = ""
        self.last_preview = view
        self._status(f"preview of [b]{escape(name)}[/b]: press Apply (ctrl+s) to make it")
        self.query_one("#surgery-preview", Static).update(preview_text(view))

    @on(Button.Pressed, "#surgery-apply-button")
    def action_apply(self) -> None:
        name, params = self.request()
        if self._start(f"applying {name}"):
            self.run_apply(name, params)

    @work(group="surgery-form", exit_on_error=False)
    async def run_apply(self, name: str, params: dict[str, Any]) -> None:
        try:
            view = await self.surgery.apply(name, params)
        except MindsetError as exc:
            self._failed(name, exc)
            return
        finally:
            self.busy = ""
        self.dismiss(view)

    @on(Button.Pressed, "#surgery-cancel-button")
    def action_cancel(self) -> None:
        self.dismiss(None)  # a running apply is cancelled with the form: nothing changes


def preview_text(view: SurgeryView) -> Group:
    """An operation's changes, then its parameter counts before → after (aligned columns)."""
    change = view.after_total - view.before_total
    share = f", {100 * change / view.before_total:+.1f}%" if view.before_total else ""
    lines = [Text(line) for line in view.changes]
    lines.append(Text(f"parameters: {view.before_total:,} → {view.after_total:,}  "
                      f"({change:+,}{share})", style="bold"))
    lines.extend(Text(line, no_wrap=True, overflow="ellipsis")
                 for line in changed_counts(view.counts))
    return Group(*lines)


def changed_counts(counts: list[str]) -> list[str]:
    """The count lines of parts that changed, and the total."""
    return [line for line in counts
            if not line.endswith("(no change)") or line.startswith("total")]
