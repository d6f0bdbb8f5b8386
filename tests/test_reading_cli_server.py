"""Learning by reading as users reach it: `mindset memory read`, `mindset eval --learn`, and
the server's reading mode through the real openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from engine.llm.local import LocalAdapter
from engine.llm.server import BackgroundServer, create_app
from engine.memory import MemoryStore
from engine.model.loading import load_model, load_student
from engine.model.reading import reading_layers
from engine.model.student import save_student
from engine.model.surgery import convert
from tests.test_cli import mindset

NOTES = {
    "paris.md": "The old lighthouse of Quillmere was painted green in 1931 by Ada Voss, "
                "who kept its lamp for forty years.\n",
    "deep/recipes.txt": "To make Voss bread, fold the dough eleven times and bake it on a "
                        "hot slate until the crust sings.\n",
}


def make_student(directory: Path, **hparams: Any) -> Path:
    teacher = load_model("tiny-llama")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        student = convert(teacher, [1], "associative", **hparams)
    return save_student(student, directory, teacher.tokenizer)


@pytest.fixture()
def notes(tmp_path: Path) -> Path:
    folder = tmp_path / "notes"
    for name, text in NOTES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    (folder / ".hidden.md").write_text("not read", encoding="utf-8")
    (folder / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return folder


def test_memory_read_keeps_each_documents_entries_in_the_students_store(
        tmp_path: Path, notes: Path) -> None:
    student = make_student(tmp_path / "student")
    result = mindset("memory", "read", str(student), str(notes), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["documents"] == 2 and report["entries_added"] > 150
    assert report["tables"]["1"]["entries"] == report["entries_added"]
    with MemoryStore.open(student / "memory" / "memory.db") as store:
        table = store.table("layer1")
        assert len(table) == report["entries_added"]
        rows = table.page(0, 500)
        documents = {row.meta["document"] for row in rows}
        assert documents == {"paris.md", "deep/recipes.txt"}
        assert all(row.label and " → " in row.label for row in rows)
    # The student loads with them, and a second read of the same notes adds nothing.
    loaded = load_student(student)
    assert len(reading_layers(loaded.model)[1].cache) == report["entries_added"]
    again = json.loads(mindset("memory", "read", str(student), str(notes), "--json").stdout)
    assert again["entries_added"] == 0


def test_memory_read_refuses_what_it_cannot_read_before_any_work(tmp_path: Path,
                                                                 notes: Path) -> None:
    student = make_student(tmp_path / "student")
    featural = tmp_path / "featural"
    teacher = load_model("tiny-llama")
    save_student(convert(teacher, [1], "featural", keys="flat"), featural, teacher.tokenizer)
    (tmp_path / "empty").mkdir()
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    cases = [
        ((str(student), str(tmp_path / "missing")), "no such file or folder"),
        ((str(student), str(tmp_path / "binary.txt")), "is not UTF-8 text"),
        ((str(student), str(tmp_path / "empty")), "holds no text files"),
        ((str(student), str(notes), "--chunk", "2"), "--chunk 2 is too small"),
        ((str(featural), str(notes)), "no associative memory that learns by reading"),
        ((str(tmp_path), str(notes)), "is not a student directory"),
    ]
    for args, message in cases:
        result = mindset("memory", "read", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    store_file = student / "memory" / "memory.db"
    if store_file.exists():  # nothing was read into it
        with MemoryStore.open(store_file) as store:
            assert len(store.table("layer1")) == 0
    context = mindset("memory", "read", str(student), str(notes), "--chunk", "100000")
    assert context.returncode == 2 and "exceeds the model's context" in context.stderr


def test_eval_learn_says_how_many_entries_it_added(tmp_path: Path, notes: Path) -> None:
    student = make_student(tmp_path / "student")
    data = notes / "paris.md"
    plain = json.loads(mindset("eval", "--model", str(student), "--data", str(data),
                               "--window", "32", "--json").stdout)
    learned = json.loads(mindset("eval", "--model", str(student), "--data", str(data),
                                 "--window", "32", "--learn", "--json").stdout)
    assert plain["entries_added"] is None and learned["entries_added"] > 50
    # The first read scores each window before reading it: the same perplexity.
    assert learned["ppl"] == pytest.approx(plain["ppl"], rel=1e-4)
    teacher = mindset("eval", "--model", "tiny-llama", "--data", str(data), "--learn")
    assert teacher.returncode == 2 and "no associative memory" in teacher.stderr


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[BackgroundServer, Path]]:
    student = make_student(tmp_path / "student")
    app = create_app({"student": LocalAdapter.from_spec(str(student)),
                      "teacher": LocalAdapter.from_spec("tiny-llama")})
    with BackgroundServer(app) as server:
        yield server, student


async def test_the_server_reads_a_prompt_when_asked(served: tuple[BackgroundServer, Path]
                                                   ) -> None:
    server, student = served
    messages: Any = [{"role": "user", "content": NOTES["paris.md"]}]
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="none",
                                  max_retries=0) as client:
        plain = await client.chat.completions.create(model="student", messages=messages,
                                                     max_tokens=4, temperature=0)
        assert plain.model_extra is not None and plain.model_extra.get("memory") is None
        learned = await client.chat.completions.create(
            model="student", messages=messages, max_tokens=4, temperature=0,
            extra_body={"learn": True})
        assert learned.model_extra is not None
        added = learned.model_extra["memory"]["entries_added"]
        assert added > 50
        again = await client.completions.create(model="student", prompt="Ada Voss kept",
                                                max_tokens=2, extra_body={"learn": True})
        assert again.model_extra is not None and again.model_extra["memory"] is not None
        stream = await client.chat.completions.create(
            model="student", messages=messages, max_tokens=2, stream=True,
            extra_body={"learn": True})
        extras = [chunk.model_extra for chunk in [c async for c in stream]]
        assert {"entries_added": 0} in [extra.get("memory") for extra in extras if extra]
        with pytest.raises(openai.BadRequestError, match="no associative memory"):
            await client.chat.completions.create(model="teacher", messages=messages,
                                                 max_tokens=2, extra_body={"learn": True})
    with MemoryStore.open(student / "memory" / "memory.db") as store:  # committed
        assert len(store.table("layer1")) >= added
