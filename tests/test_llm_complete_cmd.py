"""`mindset complete`: a streamed reply from any adapter spec, logged, with clean errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.llm.log import InteractionLog
from mindset.cli import run
from tests.conftest import REPO_ROOT


def exit_status(argv: list[str]) -> int:
    """`run`'s status, including argparse's own one-line errors (which exit)."""
    try:
        return run(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("mindset: error: ") and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_complete_streams_a_chat_reply_and_logs_it(capsys: pytest.CaptureFixture[str]) -> None:
    before = InteractionLog().count()
    assert run(["complete", "--model", "tiny-llama", "--chat", "--max-tokens", "4",
                "--temperature", "0", "hi"]) == 0
    assert capsys.readouterr().out == "\n" * 5  # four newline tokens, then the final newline
    log = InteractionLog()
    assert log.count() == before + 1
    assert log.recent(1)[0].messages == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("option", "value"), [
    ("--temperature", "9"), ("--temperature", "1e-45"), ("--temperature", "nan"),
    ("--temperature", "inf"), ("--temperature", "-1"), ("--top-p", "nan"), ("--top-p", "0"),
    ("--top-p", "-inf"), ("--repetition-penalty", "1e-40"), ("--repetition-penalty", "inf"),
    ("--repetition-penalty", "-2"), ("--top-k", "-1"),
])
def test_complete_rejects_absurd_sampling_values_in_one_line(
        capsys: pytest.CaptureFixture[str], option: str, value: str) -> None:
    assert exit_status(["complete", "--model", "tiny-llama", f"{option}={value}", "hi"]) == 2
    err = one_line_error(capsys)
    assert option.removeprefix("--").replace("-", "_") in err


def test_complete_rejects_an_empty_model_spec(capsys: pytest.CaptureFixture[str]) -> None:
    # An empty spec would otherwise quietly mean the config's (or the default) model.
    assert exit_status(["complete", "--model", "", "hi"]) == 2
    err = capsys.readouterr().err
    assert "argument --model: is empty" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv", [
    [b"caf\xff"], [b"--stop", b"\xfe", b"hi"],
], ids=["prompt", "stop"])
def test_complete_rejects_bytes_that_are_not_utf8(argv: list[bytes]) -> None:
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONUTF8": "1"}
    result = subprocess.run(
        [os.fsencode(sys.executable), b"-m", b"mindset.cli", b"complete", b"--model",
         b"tiny-llama", *argv], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert "is not valid UTF-8 (byte 0x" in err
