"""Files and checks for the bad-input catalogue (``tests/test_bad_inputs.py``).

The assets are the broken things a user could point a command at: text files that are empty
or binary, model directories with pickled weights only or impossible configs, broken
students, run directories and an interaction log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

TEXT = "The mill by the river ground the wheat of the valley every autumn. " * 40

# --- the assets the cases point at ------------------------------------------------------------

CONFIG_EDITS: dict[str, dict[str, object]] = {
    "layers_neg": {"num_hidden_layers": -3}, "layers_zero": {"num_hidden_layers": 0},
    "layers_text": {"num_hidden_layers": "abc"}, "layers_float": {"num_hidden_layers": 2.5},
    "layers_huge": {"num_hidden_layers": 10**9}, "hidden_zero": {"hidden_size": 0},
    "heads_mismatch": {"num_attention_heads": 5}, "vocab_neg": {"vocab_size": -1},
    "bert": {"model_type": "bert"},
}


def write_config(directory: Path, edit: dict[str, object] | None = None,
                 drop: str | None = None) -> None:
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    config.update(edit or {})
    config.pop(drop or "", None)
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")


def build_assets(root: Path) -> None:
    from engine.distill.config import DistillConfig
    from engine.llm.log import Interaction, InteractionLog
    from engine.model.loading import load_model
    from engine.model.student import save_student
    from engine.model.surgery import convert

    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text(" \n\t\n", encoding="utf-8")
    (root / "binary.bin").write_bytes(b"\xff\xfe\x00\x81" * 64)
    for name in ("empty_dir", "hidden_dir", "binary_dir"):
        (root / name).mkdir()
    (root / "hidden_dir" / ".notes.txt").write_text(TEXT, encoding="utf-8")
    (root / "binary_dir" / "data.txt").write_bytes(b"\xff\xfe\x00\x81" * 64)
    teacher = load_model("tiny-llama")
    good = root / "good_model"
    teacher.model.save_pretrained(good)
    teacher.tokenizer.save_pretrained(good)
    for name, edit in CONFIG_EDITS.items():
        shutil.copytree(good, root / name)
        write_config(root / name, edit)
    shutil.copytree(good, root / "layers_missing")
    write_config(root / "layers_missing", drop="num_hidden_layers")
    shutil.copytree(good, root / "bin_only")
    (root / "bin_only" / "model.safetensors").rename(root / "bin_only" / "pytorch_model.bin")
    shutil.copytree(good, root / "no_weights")
    (root / "no_weights" / "model.safetensors").unlink()
    shutil.copytree(good, root / "corrupt_weights")
    (root / "corrupt_weights" / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{")
    for name, text in (("bad_json", "{not json"), ("list_json", "[1, 2]")):
        (root / name).mkdir()
        (root / name / "config.json").write_text(text, encoding="utf-8")
    student = save_student(convert(teacher, [1], "featural", heads=2, query_dim=16,
                                   num_subkeys=8, topk=4), root / "student", teacher.tokenizer)
    spec = json.loads((student / "mindset_student.json").read_text(encoding="utf-8"))
    for name, content in (("student_bad_json", "{oops"), ("student_list_json", "[]"),
                          ("student_bad_family", json.dumps({**spec, "family": "bert"}))):
        shutil.copytree(student, root / name)
        (root / name / "mindset_student.json").write_text(content, encoding="utf-8")
    shutil.copytree(student, root / "student_no_weights")
    (root / "student_no_weights" / "model.safetensors").unlink()
    runs = {"run_unknown_keys": {"teacher": "tiny-llama", "bogus": 1},
            "run_bad_types": {**DistillConfig().to_dict(), "steps": "abc"},
            "run_nan_lr": {**DistillConfig().to_dict(), "lr": float("nan")},
            "run_valid": DistillConfig(teacher="tiny-llama", layers="1",
                                       data=[str(root / "text.txt")]).to_dict()}
    for name, data in runs.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(data), encoding="utf-8")
    (root / "run_bad_json").mkdir()
    (root / "run_bad_json" / "config.json").write_text("{", encoding="utf-8")
    (root / "run_existing").mkdir()
    (root / "run_existing" / "checkpoint.pt").write_bytes(b"planted")
    log = InteractionLog(root / "log.db")
    log.record(Interaction(id="int-1", conversation_id="conv-1", adapter="local",
                           model="tiny-llama", kind="completion", params={}, prompt="hi",
                           response="hello"))
    if os.geteuid() != 0:  # root writes anywhere a mode allows nothing
        (root / "locked").mkdir(mode=0o500)



def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def snapshot(*roots: Path) -> dict[str, tuple[int, int] | None]:
    """Every file's (size, mtime) and every folder's existence under ``roots``."""
    state: dict[str, tuple[int, int] | None] = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            info = path.lstat()
            state[str(path)] = None if path.is_dir() else (info.st_size, info.st_mtime_ns)
    return state



def unwritable(assets: Path) -> str:
    return str(assets / "locked" / "run") if os.geteuid() != 0 else "/sys/mindset-bad-input"


def expand(argv: list[str], assets: Path, tmp: Path, busy: int) -> list[str]:
    values = {"{a}": str(assets), "{t}": str(tmp), "{busy}": str(busy),
              "{free}": str(free_port()), "{unwritable}": unwritable(assets)}
    return [re.sub(r"\{\w+\}", lambda m: values.get(m.group(0), m.group(0)), arg)
            for arg in argv]


def assert_unchanged(before: dict[str, tuple[int, int] | None],
                     after: dict[str, tuple[int, int] | None]) -> None:
    changed = sorted(path for path in before.keys() | after.keys()
                     if before.get(path, "absent") != after.get(path, "absent"))
    assert not changed, f"files created, changed or removed: {changed[:5]}"


def assert_one_line_error(status: object, err: str, out: str, expect: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, f"exit {status!r}; stderr: {err!r}"
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    assert lines[0].startswith("mindset: error:"), lines[0]
    assert "Traceback" not in err + out
    assert re.search(expect, lines[0], re.IGNORECASE), f"{expect!r} not in {lines[0]!r}"




def wait_until_serving(process: Any, url: str, timeout: float = 120.0) -> None:
    """Wait for a `mindset serve` process to answer /health at ``url``; fail if it exits."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, "the server exited before it answered"
        assert time.monotonic() < deadline, f"the server did not answer in {timeout:.0f} s"
        time.sleep(0.2)
