"""Saving and loading students; `mindset eval` on a student directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import InputError, ModelLoadError
from engine.model.loading import load_model
from engine.model.student import STUDENT_FILE, is_student_dir, load_student_model, save_student
from engine.model.surgery import convert, memory_layers, student_spec

PRODUCT: dict[str, Any] = dict(heads=2, query_dim=16, num_subkeys=8, topk=4)


def token_ids(length: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_save_and_load_round_trip_to_identical_outputs(tmp_path: Path, spec: str) -> None:
    teacher = load_model(spec)
    student: Any = convert(teacher, [0, 3], "featural", **PRODUCT)
    memories: dict[int, Any] = memory_layers(student)
    with torch.no_grad():  # make the memories non-trivial so the check means something
        for memory in memories.values():
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
    student: Any = convert(teacher, "all", "featural", **PRODUCT)
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


# --- hand-edited or damaged student files -----------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    teacher = load_model("tiny-llama")
    return save_student(convert(teacher, [1], "featural", **PRODUCT),
                        tmp_path_factory.mktemp("student") / "s", teacher.tokenizer)


def edited_copy(saved: Path, root: Path, **changes: object) -> Path:
    import shutil

    copy = root / "s"
    shutil.copytree(saved, copy)
    spec = json.loads((copy / STUDENT_FILE).read_text())
    (copy / STUDENT_FILE).write_text(json.dumps({**spec, **changes}))
    return copy


@pytest.mark.parametrize("changes, message", [
    ({"layers": "1"}, r"layers='1' has the wrong type"),
    ({"hparams": [1]}, r"hparams=\[1\] has the wrong type"),
    ({"family": "bert"}, r"family='bert' is not one of gpt2, llama"),
    ({"layers": [9]}, r"does not fit the model: layer index 9 is out of range"),
    ({"hparams": {**PRODUCT, "value_dim": 1.5}}, r"value_dim=1\.5 must be an integer"),
    ({"hparams": {**PRODUCT, "num_subkeys": 10**6}}, r"needs about .* more than this machine"),
], ids=["layers-text", "hparams-list", "family", "layer-range", "value-dim-float", "huge"])
def test_an_edited_spec_is_refused_in_one_line(saved: Path, tmp_path: Path,
                                               changes: dict[str, object], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message) as caught:
        load_model(str(edited_copy(saved, tmp_path, **changes)))
    assert "\n" not in str(caught.value)


def test_a_spec_that_is_not_an_object_is_refused(saved: Path, tmp_path: Path) -> None:
    copy = edited_copy(saved, tmp_path)
    (copy / STUDENT_FILE).write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="not a JSON object"):
        load_model(str(copy))


@pytest.mark.parametrize("header", [
    b"[1, 2]",
    b'{"model.embed_tokens.weight": {"dtype": "F32"}}',
    b'{"model.embed_tokens.weight": {"dtype": "F32", "shape": [259, 64],'
    b' "data_offsets": [10, 2]}}',
], ids=["not-a-table", "no-shape", "bad-offsets"])
def test_a_malformed_weights_header_is_refused(saved: Path, tmp_path: Path,
                                               header: bytes) -> None:
    import struct

    copy = edited_copy(saved, tmp_path)
    (copy / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ModelLoadError, match="does not load") as caught:
        load_model(str(copy))
    assert "\n" not in str(caught.value)


# --- memory-layer settings and their size, checked before allocating --------------------------


@pytest.mark.parametrize("kind, hparams, message", [
    ("featural", {"value_dim": "abc"}, "value_dim='abc' must be an integer"),
    ("featural", {"value_dim": 1.5}, r"value_dim=1\.5 must be an integer"),
    ("featural", {"sparse": 1}, "sparse=1 must be true or false"),
    ("featural", {"topk": 2000, "num_subkeys": 3000}, "at most 1024"),
    ("featural", {"num_subkeys": 1_000_000}, r"1000000\^2 = 1000000000000 slots\) needs about"),
    ("featural", {"heads": 1_000_000_000}, "more than this machine's"),
    ("associative", {"decay": "abc"}, "decay='abc' must be a finite number"),
    ("associative", {"novelty_threshold": float("nan")}, "novelty_threshold=nan"),
    ("associative", {"merge_threshold": float("inf")}, "merge_threshold=inf"),
    ("associative", {"capacity": 10**12}, r"capacity 1000000000000\) needs about"),
], ids=["text", "float", "bool", "topk", "subkeys", "heads", "decay", "nan", "inf", "capacity"])
def test_memory_settings_are_refused_before_allocating(kind: str, hparams: dict[str, Any],
                                                       message: str) -> None:
    teacher = load_model("tiny-llama")
    with pytest.raises(InputError, match=message):
        convert(teacher, [1], kind, **hparams)


@pytest.mark.parametrize("kind, hparams", [
    ("featural", PRODUCT), ("featural", {**PRODUCT, "gate": False, "value_dim": 24}),
    ("featural", {"keys": "flat", "slots": 100}), ("associative", {"capacity": 8, "topk": 4}),
])
def test_the_size_estimate_is_the_layer_s_real_size(kind: str, hparams: dict[str, Any]
                                                    ) -> None:
    from engine.model.memory_layers.budget import ENTRY_STATS_BYTES

    student = convert(load_model("tiny-llama"), [1], kind, **hparams)
    memory: Any = memory_layers(student)[1]
    actual = sum(p.numel() for p in memory.parameters()) * 4
    if kind == "associative":  # a store filled to capacity besides the projections
        actual -= sum(p.numel() for p in memory.base.parameters()) * 4  # the MLP's own size
        c = memory.config
        actual += c.capacity * ((c.key_dim + c.value_dim) * 4 + ENTRY_STATS_BYTES)
    assert memory.config.memory_bytes() == actual
