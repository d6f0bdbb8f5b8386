"""Snapshots of each pane (pytest-textual-snapshot). Update with --snapshot-update.

Everything shown is deterministic: tiny seeded models, a fresh database, no clock, no
blinking cursor, no notifications.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input

from engine.facade import STUDENT, TEACHER, Engine
from mindset.app import PANES, MindsetApp
from mindset.widgets.memory_pane import MemoryPane
from tests.test_tui_support import APP_SIZE, make_app, make_student, wait_for


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh data directory: the Chat pane opens the newest conversation stored there."""
    path = tmp_path / "home"
    monkeypatch.setenv("MINDSET_HOME", str(path))
    return path


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_student(tmp_path_factory.mktemp("snap-student") / "student")


def snapshot_app(tmp_path: Path, student_dir: Path | None) -> MindsetApp:
    engine = Engine("tiny-llama", student_spec=str(student_dir) if student_dir else None,
                    database=tmp_path / "memory.db", runs_root=tmp_path / "runs")
    return make_app(engine)


def settle(*keys: str, student: bool = True) -> Any:
    """Wait until the models (and the memory page) are in, stop blinking, then press keys."""

    async def run_before(pilot: Any) -> None:
        app = pilot.app
        await wait_for(pilot, lambda: app.engine.model(TEACHER) is not None)
        # Every pane is built (the hidden tabs' panes follow the first frame).
        await wait_for(pilot, lambda: all(any(p.is_mounted for p in app.query(f"#{tab}-pane"))
                                          for tab in PANES))
        if student:
            pane = app.query_one(MemoryPane)
            await wait_for(pilot, lambda: app.engine.model(STUDENT) is not None
                           and len(pane.rows) == 32 and pane.rows[0].top_tokens != [])
            # The student's arrival re-reads the tables: let that finish before the picture.
            await wait_for(pilot, lambda: all(worker.is_finished for worker in app.workers
                                              if worker.node is pane))
        for widget in app.query(Input):
            widget.cursor_blink = False
        app.clear_notifications()
        for key in keys:
            await pilot.press(key)
        await pilot.pause(0.3)
        for widget in app.screen.query(Input):
            widget.cursor_blink = False
        app.clear_notifications()
        await pilot.pause(0.1)

    return run_before


def test_memory_pane(snap_compare: Any, tmp_path: Path, student_dir: Path) -> None:
    assert snap_compare(snapshot_app(tmp_path, student_dir), terminal_size=APP_SIZE,
                        run_before=settle())


def test_model_pane(snap_compare: Any, tmp_path: Path, student_dir: Path) -> None:
    assert snap_compare(snapshot_app(tmp_path, student_dir), terminal_size=APP_SIZE,
                        run_before=settle("f3", "e"))


def test_training_pane(snap_compare: Any, tmp_path: Path) -> None:
    assert snap_compare(snapshot_app(tmp_path, None), terminal_size=APP_SIZE,
                        run_before=settle("f4", student=False))


def test_chat_pane(snap_compare: Any, tmp_path: Path, student_dir: Path) -> None:
    assert snap_compare(snapshot_app(tmp_path, student_dir), terminal_size=APP_SIZE,
                        run_before=settle("f5"))


def test_help_screen(snap_compare: Any, tmp_path: Path) -> None:
    assert snap_compare(snapshot_app(tmp_path, None), terminal_size=APP_SIZE,
                        run_before=settle("f1", student=False))


async def test_closing_an_engine_finishes_its_model_load(tmp_path: Path) -> None:
    """A closed engine leaves no load running: building a model seeds and draws from the
    process-wide RNG, so a leftover load would change the next tiny model built (the student
    these snapshots show is converted from one, and its "promotes" column would differ)."""
    import torch

    from engine.model.tiny import tiny_model

    reference = tiny_model("llama").state_dict()
    before = set(threading.enumerate())
    engine = Engine("tiny-llama", database=tmp_path / "memory.db", runs_root=tmp_path / "runs")
    load = asyncio.create_task(engine.load_model(TEACHER))
    while not any(t.name.startswith("mindset-model") for t in set(threading.enumerate()) - before):
        await asyncio.sleep(0)  # until the load is running in the engine's worker thread
    await engine.close()
    assert not [t.name for t in set(threading.enumerate()) - before
                if t.name.startswith("mindset-model") and t.is_alive()]
    rebuilt = tiny_model("llama").state_dict()
    assert all(torch.equal(rebuilt[name], tensor) for name, tensor in reference.items())
    await load  # it finished rather than being abandoned
