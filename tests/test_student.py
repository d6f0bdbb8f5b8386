"""Saving and loading students; `mindset eval` on a student directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.errors import InputError, ModelLoadError
from engine.model.loading import load_model
from engine.model.student import STUDENT_FILE, is_student_dir, load_student_model, save_student
from engine.model.surgery import convert, memory_layers, student_spec

PRODUCT = dict(heads=2, query_dim=16, num_subkeys=8, topk=4)


def token_ids(length: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_save_and_load_round_trip_to_identical_outputs(tmp_path: Path, spec: str) -> None:
    teacher = load_model(spec)
    student = convert(teacher, [0, 3], "featural", **PRODUCT)
    with torch.no_grad():  # make the memories non-trivial so the check means something
        for memory in memory_layers(student).values():
            memory.values.normal_()
    save_student(student, tmp_path / "student", teacher.tokenizer)
    assert is_student_dir(tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").is_file()

    loaded = load_model(str(tmp_path / "student"))
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, student(input_ids=ids).logits)
    spec_back = student_spec(loaded.model)
    assert spec_back is not None and spec_back.layers == [0, 3]
    assert spec_back.teacher == spec and loaded.family == teacher.family
    assert loaded.tokenizer("hi")["input_ids"] == teacher.tokenizer("hi")["input_ids"]
    assert sorted(memory_layers(loaded.model)) == [0, 3]


def test_a_loaded_student_generates_with_its_kv_cache(tmp_path: Path) -> None:
    teacher = load_model("tiny-llama")
    student = convert(teacher, "all", "featural", **PRODUCT)
    save_student(student, tmp_path / "s", teacher.tokenizer)
    model = load_student_model(tmp_path / "s")
    prompt = token_ids(5)[:1]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        expected = student.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, expected)


def test_saving_again_replaces_the_student(tmp_path: Path) -> None:
    teacher = load_model("tiny-gpt2")
    first = convert(teacher, [1], "featural", **PRODUCT)
    second = convert(teacher, [2], "featural", **PRODUCT)
    save_student(first, tmp_path / "s", teacher.tokenizer)
    save_student(second, tmp_path / "s", teacher.tokenizer)
    spec = json.loads((tmp_path / "s" / STUDENT_FILE).read_text())
    assert spec["layers"] == [2]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no staging leftovers


def test_refuses_to_overwrite_a_directory_that_is_not_a_student(tmp_path: Path) -> None:
    teacher = load_model("tiny-gpt2")
    student = convert(teacher, [1], "featural", **PRODUCT)
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="not empty and holds no student"):
        save_student(student, tmp_path, teacher.tokenizer)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="not a student"):
        save_student(teacher.model, tmp_path / "t")


def test_broken_student_directories_give_clear_errors(tmp_path: Path) -> None:
    teacher = load_model("tiny-gpt2")
    save_student(convert(teacher, [1], "featural", **PRODUCT), tmp_path / "s", teacher.tokenizer)
    (tmp_path / "s" / STUDENT_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_model(str(tmp_path / "s"))
    save_student(convert(teacher, [1], "featural", **PRODUCT), tmp_path / "t", teacher.tokenizer)
    (tmp_path / "t" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ModelLoadError, match="does not load"):
        load_model(str(tmp_path / "t"))


def test_mindset_eval_runs_on_a_student(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mindset.cli import run

    teacher = load_model("tiny-llama")
    save_student(convert(teacher, [1, 2], "featural", **PRODUCT), tmp_path / "s",
                 teacher.tokenizer)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    code = run(["eval", "--model", str(tmp_path / "s"), "--data", str(text), "--tokens", "300",
                "--window", "100", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 300 and result["ppl"] > 1
