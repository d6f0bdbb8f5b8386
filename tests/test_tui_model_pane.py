"""The Model pane's surgery on real tiny models: select, measure, operate, compare, save."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input, Static, Tree

from engine.facade import TEACHER, Engine
from engine.views import HeadStat, LayerStat
from mindset.protocols import SurgeryAPI
from mindset.screens.ask import AskScreen
from mindset.screens.surgery_form import SurgeryFormScreen
from mindset.widgets.commands import WorkbenchCommands
from mindset.widgets.head_bars import head_bars
from mindset.widgets.model_pane import ModelPane
from tests.test_tui_support import APP_SIZE, make_app, mounted, wait_for

# Calibration and held-out text from a file: quicker than sampling text from the model.
NOTES = " ".join(f"The river {i} runs past the old mill and a town of {7 * i} people."
                 for i in range(60))
# What each operation's preview says, pre-filled from layer 1 of tiny-llama (4 heads, 2 kv).
PREVIEWS = {
    "add-gates": "head gates on layers 1",
    "grow-heads": "layer 1: heads 4 -> 6",  # a head per key/value group
    "prune-heads": "layer 1: heads 4 -> 3",  # its least important head
    "resize": "layer 1: MLP 128 -> 64",
    "drop-layer": "dropped layer 1: 4 -> 3 layers",
    "add-layer": "inserted an identity layer at 2",
    "add-feedback": "layerwise feedback (rank 32) on layers 1",
}
OPERATIONS = ("add_gates", "grow_heads", "prune_heads", "resize", "drop_layer", "add_layer",
              "add_feedback", "heal", "save_result", "discard_result")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one torch thread beats two contended cores (many times over)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def text_of(app: Any, selector: str) -> str:
    """A Static's content as the terminal shows it."""
    widget = app.screen.query_one(selector, Static)
    return "\n".join(strip.text for strip in widget.render_lines(widget.region.reset_offset))


def errors(app: Any) -> list[str]:
    return [n.message for n in app._notifications if n.severity == "error"]


async def form_open(pilot: Any, app: Any) -> SurgeryFormScreen:
    """The operation form, once its fields are mounted."""
    await wait_for(pilot, lambda: isinstance(app.screen, SurgeryFormScreen)
                   and bool(app.screen.query("#surgery-status")))
    form: SurgeryFormScreen = app.screen
    return form


async def open_pane(pilot: Any, app: Any) -> ModelPane:
    await pilot.press("f3")
    pane = await mounted(pilot, app, ModelPane)
    tree = pane.query_one("#teacher-tree", Tree)
    await wait_for(pilot, lambda: app.engine.model(TEACHER) is not None
                   and len(tree.root.children) == 5)  # embeddings + 4 layers
    return pane


async def test_prune_a_selected_head_then_compare_heal_and_save(tmp_path: Path) -> None:
    engine = Engine("tiny-gpt2", database=tmp_path / "m.db", runs_root=tmp_path / "runs")
    notes = tmp_path / "notes.txt"
    notes.write_text(NOTES, encoding="utf-8")
    engine.surgery.set_data(str(notes))
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = await open_pane(pilot, app)
        tree = pane.query_one("#teacher-tree", Tree)
        tree.root.expand_all()
        await pilot.pause()
        layer1 = tree.root.children[2]
        attention = next(n for n in layer1.children if n.data and n.data.kind == "attention")
        head = attention.children[2]
        tree.move_cursor(head)
        # The first look measures the teacher in the background: bars per head, by importance.
        await wait_for(pilot, lambda: pane.selection is not None
                       and pane.selection.kind == "head")
        await wait_for(pilot, lambda: pane.measure_state.get("original") == "done", timeout=60)
        details = text_of(app, "#model-details")
        assert "head importance" in details and details.count("█") >= 4
        assert "▶ head  2" in details and "of the layer's 4 heads" in details
        original_total = pane.reports["original"].total

        await pilot.press("p")
        form = await form_open(pilot, app)
        assert form.query_one("#surgery-prune-heads-heads", Input).value == "1:2"
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: "parameters:" in text_of(app, "#surgery-preview"))
        preview = text_of(app, "#surgery-preview")
        assert "layer 1: heads 4 -> 3" in preview
        assert f"parameters: {original_total:,} →" in preview
        assert engine.surgery.result is None  # a preview changes nothing

        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: not isinstance(app.screen, SurgeryFormScreen))
        assert engine.surgery.result is not None and len(engine.surgery.history) == 1
        await wait_for(pilot, lambda: "result" in engine.surgery.perplexity
                       and pane.measure_state.get("result") == "done", timeout=60)
        result_total = pane.reports["result"].total
        assert result_total < original_total
        compare = text_of(app, "#model-compare")
        assert "parameters" in compare and f"{result_total - original_total:+,}" in compare
        assert "perplexity" in compare and "×" in compare and "1. prune-heads" in compare
        # The result's tree replaces the original's: layer 1 has three heads now.
        result_tree = pane.query_one("#result-tree", Tree)
        assert result_tree.display and not tree.display
        heads = [n for n in result_tree.root.children[1].children[0].children]
        assert [str(n.label).split()[:2] for n in heads] == [["head", "0"], ["head", "1"],
                                                             ["head", "2"]]

        # Heal: a short distillation from the original, then both are evaluated again.
        await pilot.press("h")
        await wait_for(pilot, lambda: isinstance(app.screen, AskScreen))
        app.screen.query_one(Input).value = "10"
        await pilot.press("enter")
        await wait_for(pilot, lambda: len(engine.surgery.history) == 2, timeout=60)
        assert engine.surgery.history[1].startswith("healed 10 steps")
        await wait_for(pilot, lambda: "result" in engine.surgery.perplexity, timeout=60)

        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: isinstance(app.screen, AskScreen))
        saved = tmp_path / "reshaped"
        app.screen.query_one(Input).value = str(saved)
        await pilot.press("enter")
        await wait_for(pilot, lambda: any("saved the result in" in n.message
                                          for n in app._notifications), timeout=60)
        assert not errors(app)

        await pilot.press("x")  # discard: the original's tree again, nothing to compare
        await wait_for(pilot, lambda: engine.surgery.result is None and tree.display)
        assert "No result yet" in text_of(app, "#model-compare")

    from engine.model.architecture.attention import attention_shape
    from engine.model.loading import load_model

    loaded = load_model(str(saved))
    assert [attention_shape(loaded.model, i).heads for i in range(4)] == [4, 3, 4, 4]
    total = sum(p.numel() for p in loaded.model.parameters())
    assert total == result_total


async def test_bad_requests_change_nothing_and_the_palette_has_every_operation(
        tmp_path: Path) -> None:
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "runs")
    notes = tmp_path / "notes.txt"
    notes.write_text(NOTES, encoding="utf-8")
    engine.surgery.set_data(str(notes))
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        pane = await open_pane(pilot, app)
        names = {name: help_text for name, help_text, _ in
                 WorkbenchCommands(app.screen)._commands()}
        for operation in OPERATIONS:
            assert any(f"id model.{operation}" in text for text in names.values()), operation
        assert "Model: Prune heads" in names and "Model: Heal result" in names

        # From the palette: the form opens pre-set to its operation.
        await app.run_section_action("Model", "operate('prune-heads')")
        form = await form_open(pilot, app)
        assert form.operation == "prune-heads"
        heads = form.query_one("#surgery-prune-heads-heads", Input)
        for bad, message in (("1:99", "head 99 is out of range"),
                             ("1:0,1:1,1:2,1:3", "pruning every head of layer 1"),
                             ("1;0", "bad head '1;0'")):
            heads.value = bad
            app.clear_notifications()
            await pilot.press("ctrl+s")  # apply
            await wait_for(pilot, lambda: bool(errors(app)), timeout=30)
            assert len(errors(app)) == 1 and message in errors(app)[0], errors(app)
            assert app.screen is form and engine.surgery.result is None  # nothing changed
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, SurgeryFormScreen))

        # With layer 1 selected, every operation's form is filled in well enough to preview.
        tree = pane.query_one("#teacher-tree", Tree)
        tree.move_cursor(tree.root.children[2])
        await wait_for(pilot, lambda: pane.selection is not None
                       and pane.selection.label == "layer 1")
        await wait_for(pilot, lambda: pane.measure_state.get("original") == "done", timeout=60)
        app.clear_notifications()
        edits = {"resize": {"mlp": "64"}}  # filled in with the width it has already
        for operation, expected in PREVIEWS.items():
            await app.run_section_action("Model", f"operate('{operation}')")
            form = await form_open(pilot, app)
            assert form.operation == operation
            for name, value in edits.get(operation, {}).items():
                form.query_one(f"#surgery-{operation}-{name}", Input).value = value
            await pilot.press("ctrl+r")
            await wait_for(pilot, lambda: "parameters:" in text_of(app, "#surgery-preview")
                           or bool(errors(app)), timeout=30)
            assert not errors(app), errors(app)
            assert expected in text_of(app, "#surgery-preview"), operation
            await pilot.press("escape")
            await wait_for(pilot, lambda: not isinstance(app.screen, SurgeryFormScreen))
        assert engine.surgery.result is None  # previews only
        app.clear_notifications()
        await pilot.press("x")  # nothing to discard: a warning, not a crash
        await wait_for(pilot, lambda: any("no result yet" in n.message
                                          for n in app._notifications))
        assert engine.surgery.result is None and engine.surgery.history == []


def test_the_engine_offers_what_the_pane_calls(tmp_path: Path) -> None:
    """The surgery service fits the pane's protocol (checked by mypy on this line)."""
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "runs")
    surgery: SurgeryAPI = engine.surgery
    assert surgery.role == TEACHER and surgery.result is None
    assert set(surgery.operations()) == set(PREVIEWS)


def test_head_bars_colour_by_importance_within_the_layer() -> None:
    layer = LayerStat(2, 3, 3, 100, 128, None, "", [
        HeadStat(2, 0, 0.9, 0.5), HeadStat(2, 1, 0.45, 0.25), HeadStat(2, 2, 0.09, None)])
    lines = head_bars(layer, selected=1)
    assert "[$success]" in lines[0] and "█" * 16 in lines[0] and "gate 0.500" in lines[0]
    assert "[$warning]" in lines[1] and lines[1].startswith("▶ head  1")
    assert "[$error]" in lines[2] and "gate" not in lines[2]
    assert lines[2].count("█") == 2  # a tenth of the best head's score
