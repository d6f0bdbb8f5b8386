"""The Model pane: teacher and student side by side, as trees with parameter counts."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.widgets import Static, Tree
from textual.widgets.tree import TreeNode

from engine.errors import MindsetError
from engine.facade import STUDENT, TEACHER
from engine.views import ModelNode, short_spec
from mindset.protocols import ModelsAPI
from mindset.widgets.messages import ModelLoaded, ModelLoadFailed


def human(count: int) -> str:
    """A parameter count as 135.5M / 98.3K / 512."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def fill(node: TreeNode[ModelNode], model_node: ModelNode) -> None:
    for child in model_node.children:
        label = f"{child.label}  [dim]{human(child.params)}[/dim]"
        if child.detail:
            label += f"  [i]{child.detail}[/i]"
        if child.children:
            branch = node.add(label, data=child)
            fill(branch, child)
        else:
            node.add_leaf(label, data=child)


class ModelPane(Vertical):
    """Two trees: the teacher on the left, the student (if any) on the right."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("e", "expand_all", "Expand all", id="model.expand"),
        Binding("c", "collapse_all", "Collapse all", id="model.collapse"),
        Binding("ctrl+l", "load_student", "Load student", id="model.load_student"),
    ]

    def __init__(self, models: ModelsAPI, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.models = models

    def compose(self) -> ComposeResult:
        with Horizontal():
            for role in (TEACHER, STUDENT):
                with Vertical(classes="model-side"):
                    yield Static(f"[b]{role}[/b]", classes="side-title")
                    tree: Tree[ModelNode] = Tree(f"{role}: not loaded", id=f"{role}-tree")
                    tree.show_root = True
                    yield tree
        yield Static("", id="model-hint", classes="hint")

    def on_mount(self) -> None:
        for role in (TEACHER, STUDENT):
            self._show(role, self.models.model_error(role))

    def _tree(self, role: str) -> Tree[ModelNode]:
        return self.query_one(f"#{role}-tree", Tree)

    def _show(self, role: str, error: str | None = None) -> None:
        try:
            tree = self._tree(role)
        except NoMatches:  # not composed yet: on_mount shows the state then
            return
        description = self.models.describe_model(role)
        tree.clear()
        if description is None:
            spec = self.models.spec_for(role)
            if error:
                tree.root.set_label(f"{role}: failed to load")
                tree.root.add_leaf(error)
            elif spec is None:
                tree.root.set_label(f"{role}: none yet")
                tree.root.add_leaf("distil one in the Training pane (F9: quick start)")
            else:
                tree.root.set_label(f"{role}: {short_spec(spec)} (loading…)")
            tree.root.expand()
            return
        tree.root.set_label(f"{description.label}  [dim]{human(description.params)} params[/dim]")
        tree.root.data = description
        fill(tree.root, description)
        tree.root.expand()

    @on(ModelLoaded)
    def _loaded(self, message: ModelLoaded) -> None:
        self._show(message.role)

    @on(ModelLoadFailed)
    def _failed(self, message: ModelLoadFailed) -> None:
        self._show(message.role, message.error)

    def action_expand_all(self) -> None:
        for role in (TEACHER, STUDENT):
            self._tree(role).root.expand_all()

    def action_collapse_all(self) -> None:
        for role in (TEACHER, STUDENT):
            tree = self._tree(role)
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
