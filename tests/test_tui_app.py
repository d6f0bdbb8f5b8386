"""The app shell: keymap from the config file, themes, help, palette, model tree, errors."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from textual.widgets import TabbedContent, Tree

from engine.facade import STUDENT, TEACHER, Engine
from engine.paths import config_path
from engine.views import ModelNode
from mindset.app import MindsetApp
from mindset.config import load_config, read_theme_files, save_theme
from mindset.screens.help import HelpScreen
from mindset.widgets.commands import WorkbenchCommands
from mindset.widgets.model_pane import ModelPane
from tests.test_tui_support import APP_SIZE, PaneHost, make_app, mounted, wait_for

REPO = Path(__file__).resolve().parent.parent


def engine_for(tmp_path: Path, spec: str = "tiny-llama") -> Engine:
    return Engine(spec, database=tmp_path / "m.db", runs_root=tmp_path / "runs")


async def test_keys_remapped_from_the_config_file(tmp_path: Path) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text('[keys]\n"tab.chat" = "f8"\n"tab.model" = "f6,ctrl+b"\n')
    config = load_config(config_file)
    app = MindsetApp(engine_for(tmp_path), config=config, load_models=False,
                     offer_quick_start=False)
    async with app.run_test(size=APP_SIZE) as pilot:
        tabs = app.query_one(TabbedContent)
        await pilot.press("f5")  # the old key no longer switches
        assert tabs.active == "memory"
        await pilot.press("f8")
        assert tabs.active == "chat"
        await pilot.press("f6")
        assert tabs.active == "model"
        await pilot.press("f2")
        await pilot.press("ctrl+b")
        assert tabs.active == "model"
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        help_rows = [app.screen.query_one("#help-table").get_row_at(i)  # type: ignore[attr-defined]
                     for i in range(app.screen.query_one("#help-table").row_count)]  # type: ignore[attr-defined]
        assert ["App", "f8", "Chat", "tab.chat"] in [list(r) for r in help_rows]


def test_broken_config_file_gives_a_clear_error(tmp_path: Path) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text("[keys\n")
    try:
        load_config(config_file)
    except ValueError as exc:
        assert "not valid TOML" in str(exc)
    else:
        raise AssertionError("a broken config file must be reported")


def test_theme_choice_keeps_other_settings(tmp_path: Path) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text('# mine\n[llm]\nmodel = "gpt-4o-mini"\n')
    save_theme("mindset-paper", config_file)
    text = config_file.read_text()
    assert "# mine" in text
    data = tomllib.loads(text)
    assert data["llm"]["model"] == "gpt-4o-mini"
    assert data["workbench"]["theme"] == "mindset-paper"


async def test_own_themes_registered_switchable_and_remembered(tmp_path: Path) -> None:
    names = {definition["name"] for definition in read_theme_files()}
    assert {"mindset-dusk", "mindset-paper"} <= names
    app = make_app(engine_for(tmp_path))
    async with app.run_test(size=APP_SIZE) as pilot:
        assert app.theme == "mindset-dusk"
        app.theme = "mindset-paper"
        await pilot.pause(0.2)
        await wait_for(pilot, lambda: config_path().exists()
                       and "mindset-paper" in config_path().read_text())
    assert load_config().theme == "mindset-paper"
    app2 = MindsetApp(engine_for(tmp_path), load_models=False, offer_quick_start=False)
    async with app2.run_test(size=APP_SIZE):
        assert app2.theme == "mindset-paper"


async def test_palette_offers_every_action(tmp_path: Path) -> None:
    app = make_app(engine_for(tmp_path))
    async with app.run_test(size=APP_SIZE) as pilot:
        provider = WorkbenchCommands(app.screen)
        names = [name for name, _, _ in provider._commands()]
        expected = sum(len(bindings) for _, bindings in app.binding_sections())
        assert len(names) == expected
        assert "Memory: Edit entry" in names and "Chat: Regenerate" in names
        # Running a pane's command from the palette switches to its tab.
        await pilot.pause(0.2)  # the start-up focus settles first
        await app.run_section_action("Model", "expand_all")
        await wait_for(pilot, lambda: app.query_one(TabbedContent).active == "model")


async def test_model_tree_shows_layers_heads_and_counts(tmp_path: Path) -> None:
    app = make_app(engine_for(tmp_path))
    async with app.run_test(size=APP_SIZE) as pilot:
        await pilot.press("f3")
        tree = app.query_one("#teacher-tree", Tree)
        await wait_for(pilot, lambda: len(tree.root.children) == 5)  # embeddings + 4 layers
        labels = [str(node.label) for node in tree.root.children]
        assert labels[0].startswith("embeddings") and labels[1].startswith("layer 0")
        attention = next(n for n in tree.root.children[1].children if "attn" in str(n.label))
        assert [str(h.label).split()[:2] for h in attention.children] == [
            ["head", "0"], ["head", "1"], ["head", "2"], ["head", "3"]]
        total = sum(p.numel() for p in app.engine.model().model.parameters())  # type: ignore[union-attr]
        assert tree.root.data is not None and tree.root.data.params == total


class FakeModels:
    """The Model pane's protocol: a described teacher, no student yet."""

    student_spec: str | None = None

    def __init__(self, tree: ModelNode) -> None:
        self.tree = tree
        self.loads: list[str] = []

    def spec_for(self, role: str) -> str | None:
        return "runs/abc/teacher" if role == TEACHER else None

    def model_error(self, role: str) -> str | None:
        return None

    def describe_model(self, role: str) -> ModelNode | None:
        return self.tree if role == TEACHER else None

    async def load_model(self, role: str) -> object:
        self.loads.append(role)
        return object()


async def test_model_pane_renders_a_given_tree() -> None:
    """The Model pane draws whatever ModelNode tree its protocol gives, counts made short."""
    tree = ModelNode("teacher: fake", 1_500_000, "FakeLM", [
        ModelNode("embeddings", 2048, "vocab 64"),
        ModelNode("layer 0", 12_345, children=[ModelNode("mlp", 4096, "FeaturalMemory 32 slots")]),
    ])
    models = FakeModels(tree)
    app = PaneHost(ModelPane(models, id="model-pane"))
    async with app.run_test(size=APP_SIZE) as pilot:
        teacher = app.query_one("#teacher-tree", Tree)
        await wait_for(pilot, lambda: len(teacher.root.children) == 2)
        assert str(teacher.root.label).startswith("teacher: fake  1.5M params")
        labels = [str(node.label) for node in teacher.root.children]
        assert labels == ["embeddings  2.0K  vocab 64", "layer 0  12.3K"]
        assert str(teacher.root.children[1].children[0].label) == (
            "mlp  4.1K  FeaturalMemory 32 slots")
        student = app.query_one(f"#{STUDENT}-tree", Tree)
        assert str(student.root.label) == "student: none yet"
        await pilot.press("ctrl+l")  # no student to load: a warning, no load
        assert models.loads == []


async def test_missing_model_is_a_notification_not_a_crash(tmp_path: Path) -> None:
    app = make_app(engine_for(tmp_path, spec=str(tmp_path / "no-such-model")))
    async with app.run_test(size=APP_SIZE) as pilot:
        await wait_for(pilot, lambda: any(n.severity == "error" for n in app._notifications))
        message = next(n.message for n in app._notifications if n.severity == "error")
        assert "no-such-model" in message
        await pilot.press("f3")
        pane = await mounted(pilot, app, ModelPane)  # built after the first frame
        await wait_for(pilot, lambda: "failed" in str(
            pane.query_one("#teacher-tree", Tree).root.label))
        assert "(failed)" in str(app.query_one("#status").render())


def test_first_frame_needs_no_torch() -> None:
    """The app module and everything it imports stay free of torch and transformers."""
    code = ("import sys, mindset.app, mindset.cli, engine.facade; "
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'faiss') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


async def test_a_screenshot_without_downloads_goes_to_the_data_directory(
        tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a home without ~/Downloads
    monkeypatch.setenv("MINDSET_HOME", str(tmp_path / "data"))
    app = MindsetApp(engine_for(tmp_path), load_models=False, offer_quick_start=False)
    async with app.run_test(size=APP_SIZE) as pilot:
        app.deliver_screenshot()
        shots = tmp_path / "data" / "screenshots"

        def written() -> bool:  # the file appears before Textual's writer has finished it
            return any(shot.read_text(encoding="utf-8").rstrip().endswith("</svg>")
                       for shot in shots.glob("*.svg"))

        await wait_for(pilot, written)
        shot = next(shots.glob("*.svg"))
        assert "<svg" in shot.read_text(encoding="utf-8")[:500]
        await pilot.press("f1")  # the help says how to close it and lists the palette key
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        table = app.screen.query_one("#help-table")
        rows = [list(table.get_row_at(i)) for i in range(table.row_count)]  # type: ignore[attr-defined]
        assert any(row[1] == "ctrl+p" for row in rows)
        assert "closes this help" in str(app.screen.query_one("#help-title").render())
