"""Nothing a model or student directory holds is ever unpickled.

Each test plants a pickle whose ``__reduce__`` touches a marker file, first proving that the
planted bytes are live (unpickling them here does create a marker), then loads the directory
and checks that loading either refuses in one line or ignores the pickle, and that the marker
never appears. The last test is the CI rule: no code under ``engine/`` or ``mindset/`` calls
an unpickling loader (parsed with ``ast``, so comments and strings do not count).
"""

from __future__ import annotations

import ast
import pathlib
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import ModelLoadError
from engine.model.loading import load_model
from engine.model.student import save_student
from engine.model.surgery import convert
from mindset.cli import run
from tests.conftest import REPO_ROOT

ASSOCIATIVE: dict[str, Any] = dict(key_dim=8, topk=4, capacity=64)  # the recipe: read entries


class Exploit:
    """Unpickling this touches ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (pathlib.Path.touch, (self.marker,))


def payload(marker: Path) -> bytes:
    return pickle.dumps(Exploit(marker))


def torch_payload(path: Path, marker: Path) -> None:
    """A ``pytorch_model.bin`` in torch's own zip format whose pickle runs the exploit."""
    torch.save({"model.embed_tokens.weight": Exploit(marker)}, path)


def test_the_planted_pickles_are_live(tmp_path: Path) -> None:
    """Control: the payloads do run code when unpickled, so the tests below mean something."""
    plain, zipped = tmp_path / "plain-marker", tmp_path / "zip-marker"
    pickle.loads(payload(plain))  # deliberately unsafe: this is the control
    torch_payload(tmp_path / "pytorch_model.bin", zipped)
    torch.load(tmp_path / "pytorch_model.bin", weights_only=False)  # the unsafe call we forbid
    assert plain.exists() and zipped.exists()


def hf_directory(root: Path, spec: str = "tiny-llama") -> Path:
    directory = root / "model"
    loaded = load_model(spec)
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return directory


def test_pytorch_model_bin_alone_is_refused_in_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    directory = hf_directory(tmp_path)
    (directory / "model.safetensors").unlink()
    marker = tmp_path / "marker"
    torch_payload(directory / "pytorch_model.bin", marker)
    with pytest.raises(ModelLoadError, match=r"holds only pytorch_model\.bin; Mindset loads "
                       r"safetensors only \(never pickles\): convert it") as caught:
        load_model(str(directory))
    assert "\n" not in str(caught.value)
    text = tmp_path / "text.txt"
    text.write_text("some text to score " * 20, encoding="utf-8")
    assert run(["eval", "--model", str(directory), "--data", str(text)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pytorch_model.bin" in err
    assert not marker.exists()


def test_pytorch_model_bin_beside_safetensors_is_ignored(tmp_path: Path) -> None:
    directory = hf_directory(tmp_path)
    marker = tmp_path / "marker"
    torch_payload(directory / "pytorch_model.bin", marker)
    (directory / "training_args.bin").write_bytes(payload(marker))
    loaded = load_model(str(directory))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = load_model("tiny-llama").model(ids).logits
        assert torch.equal(loaded.model(ids).logits, expected)
    assert not marker.exists()


@pytest.fixture(scope="module")
def student_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved associative student: JSON, config, safetensors, tokenizer and memory tables."""
    teacher = load_model("tiny-llama")
    student = convert(teacher, [1], "associative", **ASSOCIATIVE)
    directory = save_student(student, tmp_path_factory.mktemp("student") / "student",
                             teacher.tokenizer)
    assert (directory / "memory" / "memory.db").is_file()
    return directory


def student_files(directory: Path) -> list[str]:
    """Every file the student loader can read (all of them, memory tables included)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def fresh_student(template: Path, root: Path) -> Path:
    copy = root / "student"
    shutil.copytree(template, copy)
    return copy


def test_every_student_file_replaced_by_a_pickle_is_refused_or_ignored(
    student_template: Path, tmp_path: Path
) -> None:
    names = student_files(student_template)
    assert {"mindset_student.json", "config.json", "model.safetensors",
            "memory/memory.db", "tokenizer.json"} <= set(names)
    refused = []
    for index, name in enumerate(names):
        directory = fresh_student(student_template, tmp_path / f"case{index}")
        marker = tmp_path / f"marker-{index}"
        (directory / name).write_bytes(payload(marker))
        try:
            load_model(str(directory))
        except ModelLoadError as exc:
            assert "\n" not in str(exc), (name, str(exc))
            refused.append(name)
        assert not marker.exists(), f"{name}: the pickle ran"
    # The files that carry the model must be refused, not silently replaced by defaults.
    assert {"mindset_student.json", "config.json", "model.safetensors",
            "memory/memory.db", "tokenizer.json"} <= set(refused)


def test_pickles_beside_a_valid_student_are_ignored(student_template: Path,
                                                    tmp_path: Path) -> None:
    directory = fresh_student(student_template, tmp_path)
    marker = tmp_path / "marker"
    torch_payload(directory / "pytorch_model.bin", marker)
    for name in ("optimizer.pt", "training_args.bin", "memory/layer1.pkl", "checkpoint.ckpt"):
        (directory / name).write_bytes(payload(marker))
    loaded = load_model(str(directory))
    reference = load_model(str(student_template))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference.model(ids).logits)
    assert not marker.exists()


# --- the CI rule ------------------------------------------------------------------------------

UNPICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> object:
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword
    return None


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    """(line, reason) for every call that can unpickle, in Python ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in UNPICKLING_MODULES:
            for alias in node.names:
                if alias.name in ("load", "loads", "Unpickler"):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        module, _, attr = name.rpartition(".")
        if _keyword(node, "weights_only") is False:
            found.append((node.lineno, "weights_only=False"))
        if module in UNPICKLING_MODULES and attr in ("load", "loads", "Unpickler"):
            found.append((node.lineno, f"{name}("))
        elif name in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is not False \
                and _keyword(node, "allow_pickle") is not None:
            found.append((node.lineno, f"{name}(allow_pickle=...)"))
        elif module == "yaml" and attr in ("load", "unsafe_load", "full_load", "load_all"):
            found.append((node.lineno, f"{name}( (use yaml.safe_load)"))
        elif name == "torch.load" and _keyword(node, "weights_only") is not True:
            found.append((node.lineno, "torch.load( without weights_only=True"))
    return found


def test_the_scanner_catches_calls_and_ignores_comments_and_strings() -> None:
    source = '''
import pickle, yaml, torch, numpy as np
from pickle import loads
# pickle.load(f) in a comment, torch.load(x) too
text = "torch.load(path, weights_only=False) and yaml.load(s)"
pickle.load(f)
pickle.loads(b)
np.load(p, allow_pickle=True)
np.load(p)
np.load(p, allow_pickle=False)
yaml.load(s)
yaml.safe_load(s)
torch.load(p)
torch.load(p, weights_only=True)
torch.load(p, map_location="cpu", weights_only=False)
'''
    lines = sorted({line for line, _ in unsafe_loads(source)})
    assert lines == [3, 6, 7, 8, 11, 13, 15]


def test_no_code_can_unpickle() -> None:
    problems = []
    for root in ("engine", "mindset"):
        for path in sorted((REPO_ROOT / root).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            for line, reason in unsafe_loads(source):
                problems.append(f"{path.relative_to(REPO_ROOT)}:{line}: {reason}")
    assert not problems, "unpickling calls (use safetensors or JSON):\n" + "\n".join(problems)
