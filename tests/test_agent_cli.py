"""`mindset chat` in a real process: messages, slash commands, one-line errors that leave
the chat running, and a conversation continued in a second run."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

from tests.conftest import REPO_ROOT

CHAT = [sys.executable, "-m", "mindset.cli", "chat", "--model", "tiny-llama", "--no-tools",
        "--max-tokens", "4", "--temperature", "0", "--seed", "0"]


def chat(home: Path, lines: list[str], *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MINDSET_HOME": str(home)}
    return subprocess.run([*CHAT, *extra], input="\n".join(lines) + "\n", text=True,
                          capture_output=True, cwd=REPO_ROOT, env=env, timeout=300)


def test_a_terminal_chat_with_slash_commands(tmp_path: Path) -> None:
    done = chat(tmp_path, [
        "Hello there",
        "/tasks add write the report",
        "/tasks",
        "/memory add the meeting is on Friday",
        "/memory search meeting",
        "/sql SELECT count(*) AS turns FROM nodes",
        "/sql DROP TABLE nodes",
        "/emotion calm",
        "/emotion",
        "/state",
        "/branch export json",
        "/nonsense",
        "/tasks done 99",
        "/quit",
        "never read",
    ])
    assert done.returncode == 0, done.stderr
    out, err = done.stdout, done.stderr
    assert out.count("assistant> ") == 1
    assert "task #1 queued at priority" in out and "#1 [" in out and "write the report" in out
    assert "remembered #" in out and "relevance" in out and "the meeting is on Friday" in out
    assert "turns" in out and "\n2\n" in out.replace(" ", "")  # user turn and reply
    assert "feeling pinned at calm" in out and "(pinned; /emotion off)" in out
    assert "models: tiny-llama" in out
    exported = out[out.index("{"):out.index("\n}\n") + 2]
    assert json.loads(exported)["nodes"][0]["content"] == "Hello there"
    errors = [line for line in err.splitlines() if line.startswith("· error:")]
    assert len(errors) == 3
    assert "refused" in errors[0] and "unknown command /nonsense" in errors[1]
    assert "no task #99" in errors[2]
    with closing(sqlite3.connect(tmp_path / "agent" / "agent.db")) as db:  # DROP refused
        assert db.execute("SELECT count(*) FROM nodes").fetchone()[0] == 2
    assert "never read" not in out
    # Notices are shown once (prefixed) and kept in the agent's log file.
    assert not any(line.startswith("the importance rating") for line in err.splitlines())
    assert "importance rating" in (tmp_path / "agent" / "agent.log").read_text()


def test_a_conversation_continues_in_a_second_run(tmp_path: Path) -> None:
    first = chat(tmp_path, ["Remember the word lantern", "/quit"])
    assert first.returncode == 0, first.stderr
    conversation = first.stderr.split("conversation ", 1)[1].split(":", 1)[0]
    second = chat(tmp_path, ["/branch list"], "--conversation", conversation)
    assert second.returncode == 0, second.stderr
    assert "Remember the word lantern" in second.stdout


def test_an_unknown_conversation_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = chat(tmp_path, [], "--conversation", "nope")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("mindset: error: no conversation")
