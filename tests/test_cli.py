"""The `mindset` CLI as a user runs it: a real subprocess, real files, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mindset.cli import run
from tests.conftest import REPO_ROOT


def mindset(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mindset.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    file = tmp_path / "text.txt"
    file.write_text("Mindset turns feed-forward layers into memory. " * 30, encoding="utf-8")
    return file


def test_help_lists_the_subcommands() -> None:
    result = mindset("--help")
    assert result.returncode == 0
    assert "eval" in result.stdout
    assert "opens the workbench" in result.stdout


def test_version() -> None:
    result = mindset("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("mindset ")


def test_eval_json_on_a_tiny_model(text_file: Path) -> None:
    result = mindset(
        "eval",
        "--model",
        "tiny-llama",
        "--data",
        str(text_file),
        "--tokens",
        "600",
        "--window",
        "128",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["tokens"] == 600
    assert report["windows"] == 5
    assert report["ppl"] > 1
    assert report["tok_per_s"] > 0


def test_eval_plain_output(text_file: Path) -> None:
    result = mindset("eval", "--model", "tiny-gpt2", "--data", str(text_file), "--window", "64")
    assert result.returncode == 0, result.stderr
    assert "perplexity" in result.stdout


def write_bytes(tmp_path: Path, name: str, data: bytes) -> Path:
    file = tmp_path / name
    file.write_bytes(data)
    return file


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d, t: ["--model", "nope", "--data", str(t)], "unknown model 'nope'"),
        (lambda d, t: ["--model", str(d / "missing-dir"), "--data", str(t)], "no such path"),
        (lambda d, t: ["--model", "tiny-gpt2", "--data", str(d / "none.txt")], "no such file"),
        (
            lambda d, t: ["--model", "tiny-gpt2", "--data", str(write_bytes(d, "e.txt", b""))],
            "is empty",
        ),
        (
            lambda d, t: [
                "--model",
                "tiny-gpt2",
                "--data",
                str(write_bytes(d, "b.txt", b"\xff\xfe\x00")),
            ],
            "not UTF-8",
        ),
        (lambda d, t: ["--model", "tiny-gpt2", "--data", str(d)], "is a directory"),
        (lambda d, t: ["--model", "tiny-gpt2", "--data", str(t), "--window", "1"], "too small"),
        (
            lambda d, t: ["--model", "tiny-gpt2", "--data", str(t), "--window", "0"],
            "must be positive",
        ),
        (
            lambda d, t: ["--model", "tiny-gpt2", "--data", str(t), "--window", "99999"],
            "exceeds the model's context",
        ),
        (
            lambda d, t: ["--model", "tiny-gpt2", "--data", str(t), "--tokens", "-5"],
            "must be positive",
        ),
        (
            lambda d, t: ["--model", "tiny-gpt2", "--data", str(t), "--tokens", "lots"],
            "not a whole number",
        ),
    ],
    ids=[
        "unknown-spec",
        "missing-dir",
        "missing-file",
        "empty-file",
        "non-utf8",
        "directory",
        "window-1",
        "window-0",
        "window-too-big",
        "tokens-negative",
        "tokens-text",
    ],
)
def test_eval_bad_input_is_one_line_with_status_2(
    make_args,
    message,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    text_file: Path,
    capsys,
) -> None:
    # In-process for speed: the same entry point the console script calls.
    try:
        status = run(["eval", *make_args(tmp_path, text_file)])
    except SystemExit as exit_:  # argparse's own errors
        status = exit_.code
    captured = capsys.readouterr()
    assert status == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mindset: error:")
    assert message in lines[0]


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    result = mindset("eval", "--model", "tiny-gpt2", "--data", str(tmp_path / "none.txt"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_corrupt_model_directory_is_reported(tmp_path: Path, text_file: Path) -> None:
    (tmp_path / "config.json").write_text("{not json", encoding="utf-8")
    result = mindset("eval", "--model", str(tmp_path), "--data", str(text_file))
    assert result.returncode == 2
    assert "not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_workbench_refuses_a_student_that_is_not_one(tmp_path: Path) -> None:
    result = mindset("--student", str(tmp_path))
    assert result.returncode == 2
    assert "is not a student directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
