"""`mindset complete`: a streamed reply from any adapter spec, logged, with clean errors."""

from __future__ import annotations

import pytest

from engine.llm.log import InteractionLog
from mindset.cli import run


def test_complete_streams_a_chat_reply_and_logs_it(capsys: pytest.CaptureFixture[str]) -> None:
    before = InteractionLog().count()
    assert run(["complete", "--model", "tiny-llama", "--chat", "--max-tokens", "4",
                "--temperature", "0", "hi"]) == 0
    assert capsys.readouterr().out == "\n" * 5  # four newline tokens, then the final newline
    log = InteractionLog()
    assert log.count() == before + 1
    assert log.recent(1)[0].messages == [{"role": "user", "content": "hi"}]


def test_complete_rejects_bad_parameters_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["complete", "--model", "tiny-llama", "--temperature", "9", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mindset: error: temperature must be between 0 and 2")
    assert len(err.splitlines()) == 1
