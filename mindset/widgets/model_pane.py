"""The Model pane: change a model's shape and see what that costs.

The *original* is the teacher (or the student, after ``t``): its tree comes from the
engine's description (:class:`ModelsAPI`). Selecting a layer, head, MLP or memory shows its
parameters and, measured on calibration text by ``surgery.report`` in a worker, each head's
importance as a coloured bar (with its gate where the layer has gates) and the MLP's neuron or
the memory's slot usage. Operations run from a modal form (``o``, a key per operation, or the
command palette); each builds a new *result* from the previous one, whose tree replaces the
original's (``v`` switches back). After each change the pane evaluates held-out perplexity in
the background and shows the original and the result side by side; ``h`` heals the result by
a short distillation, ``ctrl+s`` saves it and ``x`` discards it (see
:mod:`mindset.widgets.surgery_work`). Without a surgery service (a test's fake models) the
pane just shows the trees.
"""

from __future__ import annotations

from contextlib import suppress
from typing import ClassVar

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.css.query import NoMatches
from textual.markup import escape
from textual.widgets import ContentSwitcher, Static, Tree
from textual.widgets.tree import TreeNode

from engine.errors import MindsetError
from engine.facade import STUDENT, TEACHER
from engine.views import ModelNode, ShapeReport, SurgeryView, short_spec
from mindset.protocols import ModelsAPI, SurgeryAPI
from mindset.screens.surgery_form import SurgeryFormScreen, suggested_operation
from mindset.widgets.head_bars import details, human, report_tree
from mindset.widgets.messages import ModelLoaded, ModelLoadFailed
from mindset.widgets.surgery_work import ORIGINAL, RESULT, SurgeryWork

HINT = ("o operation · p prune heads · h heal · ctrl+s save · x discard · v original/result · "
        "t teacher/student · m measure")


def fill(node: TreeNode[ModelNode], model_node: ModelNode) -> None:
    for child in model_node.children:
        label = escape(child.label)
        if child.params:
            label += f"  [dim]{human(child.params)}[/dim]"
        if child.detail:
            label += f"  [i]{escape(child.detail)}[/i]"
        if child.children:
            branch = node.add(label, data=child)
            fill(branch, child)
        else:
            node.add_leaf(label, data=child)


def show_tree(tree: Tree[ModelNode], root: ModelNode) -> None:
    """``root`` as the whole tree, keeping the cursor's line where it was."""
    line = tree.cursor_line
    tree.clear()
    tree.root.set_label(f"{escape(root.label)}  [dim]{human(root.params)} params[/dim]")
    tree.root.data = root
    fill(tree.root, root)
    tree.root.expand()
    if line >= 0:
        tree.call_after_refresh(setattr, tree, "cursor_line", line)


class ModelPane(SurgeryWork):
    """The original's (or the result's) tree, the selection's details, the comparison."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("e", "expand_all", "Expand all", id="model.expand"),
        Binding("c", "collapse_all", "Collapse all", id="model.collapse"),
        Binding("ctrl+l", "load_student", "Load student", id="model.load_student"),
        Binding("o", "operate", "Operation", id="model.operate"),
        Binding("t", "switch_role", "Teacher/student", id="model.switch_role"),
        Binding("v", "toggle_view", "Show original or result", id="model.toggle_view",
                show=False),
        Binding("m", "measure", "Measure importance", id="model.measure", show=False),
        Binding("g", "operate('add-gates')", "Add head gates", id="model.add_gates",
                show=False),
        Binding("n", "operate('grow-heads')", "Grow heads", id="model.grow_heads", show=False),
        Binding("p", "operate('prune-heads')", "Prune heads", id="model.prune_heads",
                show=False),
        Binding("r", "operate('resize')", "Resize MLP or memory", id="model.resize",
                show=False),
        Binding("d", "operate('drop-layer')", "Drop layer", id="model.drop_layer", show=False),
        Binding("a", "operate('add-layer')", "Add layer", id="model.add_layer", show=False),
        Binding("f", "operate('add-feedback')", "Add layerwise feedback",
                id="model.add_feedback", show=False),
        Binding("h", "heal", "Heal result", id="model.heal", show=False),
        Binding("ctrl+s", "save_result", "Save result", id="model.save_result", show=False),
        Binding("x", "discard_result", "Discard result", id="model.discard_result",
                show=False),
    ]

    def __init__(self, models: ModelsAPI, *, id: str | None = None,
                 surgery: SurgeryAPI | None = None) -> None:
        super().__init__(models, surgery, id=id)
        self.selection: ModelNode | None = None
        self._shown_result: ShapeReport | None = None
        self._switch_after_load = False
        self._confirm_switch = False

    def compose(self) -> ComposeResult:
        with Horizontal(id="model-top"):
            with Vertical(id="model-left", classes="model-side"):
                yield Static("", id="model-title", classes="side-title")
                with ContentSwitcher(initial=f"{self.role}-tree", id="model-trees"):
                    for role in (TEACHER, STUDENT):
                        tree: Tree[ModelNode] = Tree(f"{role}: not loaded", id=f"{role}-tree")
                        tree.show_root = True
                        yield tree
                    yield Tree[ModelNode]("result: none yet", id="result-tree")
            with VerticalScroll(id="model-details-box", classes="model-side"):
                yield Static(details(None, None, ""), id="model-details")
        yield Static("", id="model-status")
        with VerticalScroll(id="model-compare-box"):
            yield Static("", id="model-compare")
        yield Static(HINT if self.surgery is not None else "", id="model-hint", classes="hint")

    def on_mount(self) -> None:
        for role in (TEACHER, STUDENT):
            self._show(role, self.models.model_error(role))
        self.views_changed()

    # ------------------------------------------------------------------------ drawing

    def _tree(self, which: str) -> Tree[ModelNode]:
        return self.query_one(f"#{which}-tree", Tree)

    def _current_id(self) -> str:
        return "result-tree" if self.showing == RESULT else f"{self.role}-tree"

    def _show(self, role: str, error: str | None = None) -> None:
        """An original's tree, or why there is none."""
        try:
            tree = self._tree(role)
        except NoMatches:  # not composed yet: on_mount shows the state then
            return
        description = self.models.describe_model(role)
        if description is not None:
            show_tree(tree, description)
            return
        tree.clear()
        spec = self.models.spec_for(role)
        if error:
            tree.root.set_label(f"{role}: failed to load")
            tree.root.add_leaf(escape(error))
        elif spec is None:
            tree.root.set_label(f"{role}: none yet")
            tree.root.add_leaf("distil one in the Training pane (F9: quick start)")
        else:
            tree.root.set_label(f"{role}: {escape(short_spec(spec))} (loading…)")
        tree.root.expand()

    def views_changed(self) -> None:
        super().views_changed()
        with suppress(NoMatches):  # a redraw while the pane is built or closed
            report = self.reports.get(RESULT)
            if report is not self._shown_result:  # a new shape (or none): redraw its tree
                self._shown_result = report
                tree = self._tree(RESULT)
                if report is not None:
                    show_tree(tree, report_tree(report))
                else:
                    tree.clear()
                    tree.root.set_label("result: none yet" if not self.has_model(RESULT)
                                        else "result: reading its shape…")
            if self.showing == RESULT and not self.has_model(RESULT):
                self.showing = ORIGINAL
            other = STUDENT if self.role == TEACHER else TEACHER
            shown = "the result" if self.showing == RESULT else f"the {self.role} (original)"
            self.query_one("#model-title", Static).update(
                f"[b]{shown}[/b]  [dim]t: work on the {other}[/dim]")
            self.query_one("#model-trees", ContentSwitcher).current = self._current_id()
            self.query_one("#model-details", Static).update(details(
                self.selection, self.reports.get(self.showing),
                self.measure_state.get(self.showing, "")))

    @on(events.DescendantFocus)
    def _keep_focus_visible(self, event: events.DescendantFocus) -> None:
        """The app focuses the teacher's tree: while another tree is shown, that one."""
        widget = event.widget
        if isinstance(widget, Tree) and widget.id != self._current_id():
            self.call_after_refresh(self._focus_tree)

    def _focus_tree(self) -> None:
        self.query_one(f"#{self._current_id()}", Tree).focus()

    @on(Tree.NodeHighlighted)
    def _highlighted(self, event: Tree.NodeHighlighted[ModelNode]) -> None:
        if event.control.id != self._current_id():
            return
        # The root stands for the whole model (a tree highlights it when it is built).
        node = None if event.node.is_root else event.node.data
        self.selection = node
        which = self.showing
        if node is not None and node.layer is not None and self.surgery is not None and \
                self.measure_state.get(which, "") == "" and self.has_model(which):
            self.measure(which)  # the first look at one of a model's layers measures it
        self.views_changed()

    @on(ModelLoaded)
    def _loaded(self, message: ModelLoaded) -> None:
        self._show(message.role)
        if message.role == self.role:  # a new original: measured again when looked at
            self.forget(ORIGINAL)
        if message.role == STUDENT and self._switch_after_load:
            self._switch_after_load = False
            self.action_switch_role()

    @on(ModelLoadFailed)
    def _failed(self, message: ModelLoadFailed) -> None:
        self._switch_after_load = False
        self._show(message.role, message.error)

    # --------------------------------------------------------------------- operations

    def action_operate(self, operation: str = "") -> None:
        """Open the operation form, pre-set to ``operation`` (or the selection's best guess)."""
        if not self.ready() or self.surgery is None:
            return
        has_result = self.surgery.result is not None
        # Head and layer numbers of the original's tree do not name the result's parts.
        node = None if has_result and self.showing == ORIGINAL else self.selection
        count = len(self.surgery.history)
        target = (f"the result ({count} operation{'s' if count != 1 else ''} so far)"
                  if has_result else f"the {self.role}")
        screen = SurgeryFormScreen(self.surgery, operation or suggested_operation(node), node,
                                   self.reports.get(self.showing), target)
        self.app.push_screen(screen, self._applied)

    def _applied(self, view: SurgeryView | None) -> None:
        if view is None:
            return
        self.last_view = view
        self.showing = RESULT
        self.selection = None
        self.notify(f"{view.operation}: {human(view.before_total)} → {human(view.after_total)} "
                    "parameters", title="applied")
        self.result_changed()
        self._focus_tree()

    def action_toggle_view(self) -> None:
        if not self.has_model(RESULT):
            self.notify("no result yet: apply an operation first (o)", severity="warning")
            return
        self.showing = ORIGINAL if self.showing == RESULT else RESULT
        self.selection = None
        self.views_changed()
        self._focus_tree()

    def action_measure(self) -> None:
        if self.ready():
            self.measure(self.showing if self.has_model(self.showing) else ORIGINAL)

    def action_switch_role(self) -> None:
        """Work on the other model (teacher or student); any result is dropped."""
        target = STUDENT if self.role == TEACHER else TEACHER
        if target == STUDENT and self.models.describe_model(STUDENT) is None:
            if self.models.student_spec is None:
                self.notify("no student yet: distil one in the Training pane",
                            severity="warning")
                return
            self._switch_after_load = True
            self.notify("loading the student…")
            self.action_load_student()
            return
        if self.healing:
            self.notify("healing the result: wait for it to finish, or press h to stop it",
                        severity="warning")
            return
        if self.has_model(RESULT) and not self._confirm_switch:
            self._confirm_switch = True
            self.notify("switching drops the result (ctrl+s saves it): press t again to "
                        "switch", severity="warning")
            return
        self._confirm_switch = False
        if self.surgery is not None:
            try:
                self.surgery.set_role(target)
            except MindsetError as exc:
                self.notify(str(exc), severity="error")
                return
        self.role, self.showing, self.selection, self.last_view = target, ORIGINAL, None, None
        self.forget(ORIGINAL)
        self.forget(RESULT)
        self.views_changed()
        self._focus_tree()

    # ----------------------------------------------------------------- trees, student

    def action_expand_all(self) -> None:
        for which in (TEACHER, STUDENT, RESULT):
            self._tree(which).root.expand_all()

    def action_collapse_all(self) -> None:
        for which in (TEACHER, STUDENT, RESULT):
            tree = self._tree(which)
            tree.root.collapse_all()
            tree.root.expand()

    def action_load_student(self) -> None:
        if self.models.student_spec is None:
            self.notify("no student yet: distil one in the Training pane", severity="warning")
            return
        self.app.run_worker(self._load_student(), exclusive=True, group="student",
                            exit_on_error=False)

    async def _load_student(self) -> None:
        try:
            await self.models.load_model(STUDENT)
        except MindsetError as exc:
            self.post_message(ModelLoadFailed(STUDENT, str(exc)))
            self.notify(str(exc), severity="error")
        else:
            self.app.post_message(ModelLoaded(STUDENT))

