"""Shared pieces of the workbench tests: tiny students, an app factory, waiting helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from textual.app import App, ComposeResult
from textual.widget import Widget

from engine.facade import Engine
from mindset.app import MindsetApp
from mindset.config import WorkbenchConfig

APP_SIZE = (120, 40)
T = TypeVar("T", bound=Widget)


def make_student(directory: Path) -> Path:
    """A tiny-llama student with a featural memory in layer 1 (flat keys, 32 slots)."""
    import torch

    from engine.model.loading import load_model
    from engine.model.student import save_student
    from engine.model.surgery import convert

    teacher = load_model("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same slots on every run (snapshots compare them)
        student = convert(teacher, [1], "featural", init="random", keys="flat", slots=32,
                          topk=8)
    return save_student(student, directory, teacher.tokenizer)


def make_routed_student(directory: Path, layers: tuple[int, ...] = (1,)) -> Path:
    """A tiny-llama student with routed featural memories (groups of 8, half of them read):
    the kind a fact can be inserted into."""
    import torch

    from engine.model.loading import load_model
    from engine.model.student import save_student
    from engine.model.surgery import convert

    teacher = load_model("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = convert(teacher, list(layers), "featural", keys="routed", group_size=8,
                          read_share=0.5, calibration=torch.randint(0, 256, (4, 32)))
    return save_student(student, directory, teacher.tokenizer)


def student_engine(student_dir: Path, database: Path, tmp_path: Path) -> Engine:
    """An engine on tiny-llama with the student in ``student_dir`` and a fresh database."""
    return Engine("tiny-llama", student_spec=str(student_dir), database=database,
                  runs_root=tmp_path / "runs")


def make_app(engine: Engine, *, keymap: dict[str, str] | None = None,
             theme: str | None = None) -> MindsetApp:
    return MindsetApp(engine, config=WorkbenchConfig(theme=theme, keymap=keymap or {}),
                      offer_quick_start=False)


async def wait_for(pilot: Any, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Let the app run until ``condition()`` holds; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await pilot.pause(0.05)


async def mounted(pilot: Any, app: MindsetApp, pane_type: type[T]) -> T:
    """A pane once it is mounted (the hidden tabs' panes are built after the first frame)."""
    await wait_for(pilot, lambda: any(p.is_mounted for p in app.query(pane_type)))
    return app.query_one(pane_type)


class PaneHost(App[None]):
    """A bare app showing one pane, for tests that drive a pane against a fake of its
    protocol (mindset.protocols) rather than a real engine."""

    def __init__(self, pane: Widget) -> None:
        super().__init__()
        self.pane = pane

    def compose(self) -> ComposeResult:
        yield self.pane
