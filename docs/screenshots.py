"""Screenshots of every workbench pane, exported by the app itself (SVG) from a real session
on the default model, for the README.

    .venv/bin/python docs/screenshots.py            # about 2 minutes on 2 cores

The session: the default model as teacher, and an associative student of its layer 15 (the
recipe) that has read one short note; the Memory pane shows the note's entries, the Chat
pane a greedy reply of the student, as the agent gives it, with its side panel. Writes
docs/screenshots/{memory,model,training,chat}.svg.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "docs" / "screenshots"
SIZE = (130, 40)
NOTE = ("The old lighthouse of Quillmere was painted green in 1931 by Ada Voss, who kept its "
        "lamp for forty years.\n")
QUESTION = "The old lighthouse of Quillmere was painted green in 1931 by"


def make_student(work: Path) -> Path:
    from engine.model.loading import load_model
    from engine.model.reading import read_text
    from engine.model.student import save_student
    from engine.model.surgery import convert

    teacher = load_model("default")
    student = convert(teacher, [15], "associative")
    read_text(student, teacher.tokenizer, NOTE, document="notes/quillmere.md")
    return save_student(student, work / "student", teacher.tokenizer)


async def wait_for(pilot: Any, condition: Callable[[], bool], timeout: float = 300) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("the workbench did not get there in time")
        await pilot.pause(0.1)


async def shoot(work: Path, student: Path) -> None:
    from textual.widgets import Input, Select

    from engine.facade import STUDENT, Engine
    from mindset.app import MindsetApp
    from mindset.config import WorkbenchConfig
    from mindset.widgets.chat_pane import ChatPane
    from mindset.widgets.memory_pane import MemoryPane

    engine = Engine("default", student_spec=str(student), database=work / "memory.db",
                    runs_root=work / "runs")
    app = MindsetApp(engine, config=WorkbenchConfig(), offer_quick_start=False)
    OUT.mkdir(parents=True, exist_ok=True)
    async with app.run_test(size=SIZE) as pilot:
        memory = app.query_one(MemoryPane)
        await wait_for(pilot, lambda: engine.model(STUDENT) is not None
                       and memory.table_name == "layer15_associative" and bool(memory.rows))
        await pilot.pause(1.0)
        app.save_screenshot(filename="memory.svg", path=str(OUT))
        for key, name in (("f3", "model"), ("f4", "training")):
            await pilot.press(key)
            await pilot.pause(2.0)
            app.save_screenshot(filename=f"{name}.svg", path=str(OUT))
        await pilot.press("f5")
        await wait_for(pilot, lambda: any(p.is_mounted for p in app.query(ChatPane)))
        chat = app.query_one(ChatPane)
        app.engine.agent.configure(max_tokens=16, temperature=0.0)
        app.query_one("#chat-model", Select).value = STUDENT
        app.query_one("#chat-input", Input).value = QUESTION
        app.query_one("#chat-input", Input).focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: not chat.workers and len(chat.turns) == 2)
        await pilot.pause(1.0)
        app.save_screenshot(filename="chat.svg", path=str(OUT))


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        student = make_student(work)
        asyncio.run(shoot(work, student))
    for path in sorted(OUT.glob("*.svg")):
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
