"""The interaction log: storage, search, export, key redaction and `mindset logs`."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from engine.errors import InputError, MindsetError
from engine.llm import log_schema
from engine.llm.log import Interaction, InteractionLog
from engine.llm.log_schema import SCHEMA_VERSION
from engine.llm.secrets import register_secret
from engine.llm.server import free_port
from mindset.cli import run
from tests.bad_input_assets import wait_until_serving
from tests.conftest import REPO_ROOT


def interaction(ident: str, conversation: str, parent: str | None, user: str,
                reply: str, **extra: object) -> Interaction:
    return Interaction(id=ident, conversation_id=conversation, parent_id=parent,
                       adapter="local", model="tiny-llama", kind="chat",
                       params={"max_tokens": 8}, messages=[{"role": "user", "content": user}],
                       response=reply, prompt_tokens=3, completion_tokens=4, latency_s=0.1,
                       finish_reason="stop", **extra)  # type: ignore[arg-type]


@pytest.fixture
def log(tmp_path: Path) -> InteractionLog:
    log = InteractionLog(tmp_path / "log.sqlite")
    log.record(interaction("aaa111", "conv1", None, "Where do otters sleep?", "In rafts."))
    log.record(interaction("aaa222", "conv1", "aaa111", "And beavers?", "In lodges."))
    log.record(interaction("bbb333", "conv1", "aaa111", "And cats?", "Anywhere warm."))
    log.record(interaction("ccc444", "conv2", None, "Say hello", "", error="boom: it broke"))
    return log


def test_search_finds_words_in_messages_responses_and_errors(log: InteractionLog) -> None:
    assert [i.id for i in log.search("otters")] == ["aaa111"]
    assert [i.id for i in log.search("lodges")] == ["aaa222"]
    assert [i.id for i in log.search("broke")] == ["ccc444"]
    assert log.search("otters lodges") == []
    # FTS syntax in user text is taken literally, never an SQL error.
    assert log.search('"NEAR( AND OR*') == []
    assert log.has_fts


def test_conversations_keep_their_branches(log: InteractionLog) -> None:
    items = log.conversation("conv1")
    assert [(i.id, i.parent_id) for i in items] == [
        ("aaa111", None), ("aaa222", "aaa111"), ("bbb333", "aaa111")]
    assert log.conversation_of("bbb333") == "conv1"
    assert log.get("bbb").response == "Anywhere warm."
    with pytest.raises(InputError, match="matches 2 interactions"):
        log.get("aaa")
    with pytest.raises(InputError, match="no conversation"):
        log.conversation("zzz")


OPENAI_SHAPED = "sk-proj-Xy7Qp2Lm9Rt4Vb8Nc1Zd6Hf3Jk5Ws0Ae"


def test_registered_secrets_and_key_shapes_are_redacted(tmp_path: Path) -> None:
    log = InteractionLog(tmp_path / "log.sqlite")
    configured = "hunter2-secret-0b5e1"
    register_secret(configured)
    log.record(interaction("k1", "c", None, f"use {configured} and sk-abcdefghijklmnop1234",
                           f"ok {configured}", error=f"failed with {configured}"))
    log.record(interaction("k2", "c", None, "Authorization: Bearer 9f8e7d6c5b4a39281706f5e4",
                           "hf_AbCdEfGh1234IjKlMnOp5678QrStUvWx"))
    stored = log.get("k1")
    assert stored.messages == [{"role": "user", "content": "use [redacted] and [redacted]"}]
    assert stored.response == "ok [redacted]" and stored.error == "failed with [redacted]"
    other = log.get("k2")
    assert other.messages == [{"role": "user", "content": "Authorization: Bearer [redacted]"}]
    assert other.response == "[redacted]"
    for path in tmp_path.iterdir():
        data = path.read_bytes()
        assert configured.encode() not in data and b"sk-abcdefghijklmnop1234" not in data
        assert b"9f8e7d6c5b4a39281706f5e4" not in data


@pytest.mark.parametrize("text", [
    "tell me a secret recipe",
    "none of the keys are here, and none is redacted",
    "the sk-learn-style-pipeline-for-beginners guide",  # key-shaped, but plain words
    "the bearer of exceptionallylongwords brings news",
    "my password is short",
    "sk-123",
])
def test_plain_words_are_stored_verbatim(tmp_path: Path, text: str) -> None:
    # "none" is the placeholder key of a keyless remote server: it must not become a secret.
    from engine.llm.openai_adapter import OpenAIAdapter

    OpenAIAdapter("m", base_url="http://127.0.0.1:9/v1", api_key=None)
    log = InteractionLog(tmp_path / "log.sqlite")
    log.record(interaction("p1", "c", None, text, text))
    stored = log.get("p1")
    assert stored.messages == [{"role": "user", "content": text}] and stored.response == text


def test_a_pasted_key_is_redacted_in_the_db_and_in_mindset_logs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = InteractionLog(tmp_path / "log.sqlite")
    log.record(interaction("s1", "c", None, f"my key is {OPENAI_SHAPED} ok", "noted"))
    for path in tmp_path.iterdir():
        assert OPENAI_SHAPED.encode() not in path.read_bytes()
    db = str(log.path)
    for command in (["logs", "--db", db, "show", "s1"], ["logs", "--db", db, "--json"],
                    ["logs", "--db", db, "--search", "key"], ["logs", "--db", db, "export", "c"]):
        assert run(command) == 0
        out = capsys.readouterr().out
        assert OPENAI_SHAPED not in out
    assert run(["logs", "--db", db, "show", "s1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["messages"][0]["content"] == "my key is [redacted] ok"


@pytest.mark.parametrize("key", ["", "abc", "fifteen-chars-x"])
def test_short_keys_are_refused_when_configured(key: str, tmp_path: Path) -> None:
    from engine.llm.config import read_llm_config
    from engine.llm.openai_adapter import OpenAIAdapter

    if key:
        with pytest.raises(InputError, match="at least 16"):
            register_secret(key)
        with pytest.raises(InputError, match="at least 16"):
            OpenAIAdapter("m", api_key=key, base_url="http://127.0.0.1:9/v1")
    else:
        register_secret(key)  # no key at all is not a key to refuse
    config = tmp_path / "config.toml"
    config.write_text(f'[llm]\nadapter = "openai"\napi_key = "{key}"\n')
    with pytest.raises(InputError, match=r"llm\.api_key is .* at least 16") as caught:
        read_llm_config(config)
    assert len(str(caught.value).splitlines()) == 1


def test_logs_on_a_missing_db_says_so_and_creates_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "such" / "log.sqlite"
    for command in (["logs", "--db", str(missing)], ["logs", "--db", str(missing), "show", "x"],
                    ["logs", "--db", str(missing), "export", "x"]):
        assert run(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("mindset: error: no interaction log at") and str(missing) in err
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "no").exists()
    assert run(["logs", "--db", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_logs_with_no_log_yet_lists_nothing_and_creates_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("MINDSET_HOME", str(home))
    assert run(["logs"]) == 0
    assert capsys.readouterr().out.startswith("no interactions yet")
    assert run(["logs", "--json"]) == 0
    assert capsys.readouterr().out == ""
    assert run(["logs", "show", "abc"]) == 2
    assert not (home / "interactions.sqlite").exists()


def test_cli_lists_searches_shows_and_exports(log: InteractionLog, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    db = str(log.path)
    assert run(["logs", "--db", db]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 4 and listing[0].startswith("ccc444")
    assert run(["logs", "--db", db, "list", "--search", "beavers", "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["id"] == "aaa222"
    assert run(["logs", "--db", db, "show", "bbb"]) == 0
    assert json.loads(capsys.readouterr().out)["response"] == "Anywhere warm."

    assert run(["logs", "--db", db, "export", "conv1"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("# Conversation conv1")
    assert markdown.index("Where do otters sleep?") < markdown.index("In rafts.")
    assert "reply to `aaa111`" in markdown and "Anywhere warm." in markdown

    target = tmp_path / "conv.json"
    assert run(["logs", "--db", db, "export", "conv", "--format", "json", "-o",
                str(target)]) == 2  # "conv" matches two conversations
    assert "matches 2 conversations" in capsys.readouterr().err
    assert run(["logs", "--db", db, "export", "conv1", "--format", "json", "-o",
                str(target)]) == 0
    exported = json.loads(target.read_text())
    assert [i["id"] for i in exported] == ["aaa111", "aaa222", "bbb333"]


def test_cli_on_a_corrupt_log_is_one_line(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not a database" * 100)
    assert run(["logs", "--db", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mindset: error:") and "unreadable" in err and len(err.splitlines()) == 1


# The DDL of the log before it was versioned, verbatim: files like this exist on users' disks.
UNVERSIONED_DDL = """
CREATE TABLE IF NOT EXISTS interactions (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    parent_id TEXT,
    created_at TEXT NOT NULL,
    adapter TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    messages TEXT,
    prompt TEXT,
    params TEXT NOT NULL,
    response TEXT NOT NULL,
    finish_reason TEXT,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    latency_s REAL,
    ttft_s REAL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS interactions_conversation
    ON interactions (conversation_id, created_at);
CREATE INDEX IF NOT EXISTS interactions_created ON interactions (created_at);
CREATE VIRTUAL TABLE IF NOT EXISTS interactions_fts USING fts5(id UNINDEXED, body);
"""


def test_an_unversioned_log_is_migrated_without_losing_rows(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript(UNVERSIONED_DDL)
        for n in range(3):
            db.execute(
                "INSERT INTO interactions (id, conversation_id, parent_id, created_at, adapter, "
                "model, kind, messages, params, response, prompt_tokens, completion_tokens) "
                "VALUES (?, 'conv-old', ?, ?, 'local', 'tiny-llama', 'chat', ?, ?, ?, 2, 3)",
                (f"old{n}", f"old{n - 1}" if n else None, f"2024-01-01T00:00:0{n}+00:00",
                 json.dumps([{"role": "user", "content": f"question {n}"}]),
                 json.dumps({"max_tokens": 8}), f"answer {n}"))
            db.execute("INSERT INTO interactions_fts (id, body) VALUES (?, ?)",
                       (f"old{n}", f"question {n}\nanswer {n}"))
        assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    log = InteractionLog(path)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
    assert log.count() == 3
    assert [(i.id, i.parent_id, i.response) for i in log.conversation("conv-old")] == [
        ("old0", None, "answer 0"), ("old1", "old0", "answer 1"), ("old2", "old1", "answer 2")]
    assert [i.id for i in log.search("question 1")] == ["old1"]
    log.record(interaction("new1", "conv-old", "old2", "One more?", "Yes."))
    assert InteractionLog(path).count() == 4  # a second open finds it current


def test_later_steps_apply_in_order_and_all_or_nothing(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "log.sqlite"
    InteractionLog(path).record(interaction("r1", "conv", None, "hi", "hello"))
    step = ("ALTER TABLE interactions ADD COLUMN tag TEXT",)
    monkeypatch.setattr(log_schema, "SCHEMA_VERSION", 2)
    monkeypatch.setattr(log_schema, "MIGRATIONS", (*log_schema.MIGRATIONS,
                                                   (*step, "SELECT no_such_function()")))
    with pytest.raises(MindsetError):
        InteractionLog(path)
    with closing(sqlite3.connect(path)) as db:  # the failed step left nothing behind
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        assert "tag" not in [c[1] for c in db.execute("PRAGMA table_info(interactions)")]
    monkeypatch.setattr(log_schema, "MIGRATIONS", (*log_schema.MIGRATIONS[:1], step))
    assert InteractionLog(path).count() == 1
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert "tag" in [c[1] for c in db.execute("PRAGMA table_info(interactions)")]


def test_a_log_from_a_newer_mindset_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "future.sqlite"
    InteractionLog(path).record(interaction("f1", "conv", None, "hi", "hello"))
    with closing(sqlite3.connect(path)) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(MindsetError, match=r"newer version of Mindset.*upgrade Mindset"):
        InteractionLog(path)
    assert run(["logs", "--db", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mindset: error: the interaction log") and len(err.splitlines()) == 1
    with closing(sqlite3.connect(path)) as db:  # left as it was
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert db.execute("SELECT count(*) FROM interactions").fetchone()[0] == 1


def test_serve_command_logs_calls_and_never_prints_the_key(tmp_path: Path) -> None:
    key = "serve-cli-key-5512"
    port = free_port()
    env = {**os.environ, "MINDSET_HOME": str(tmp_path), "MINDSET_API_KEY": key}
    process = subprocess.Popen(
        [sys.executable, "-m", "mindset.cli", "serve", "--model", "tiny-llama", "--port",
         str(port)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(process, url, 90)
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "ping"}],
                "max_tokens": 3}
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert reply.status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=5).status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert "serving 'tiny-llama' at http://127.0.0.1:" in output
    assert "API key required" in output
    assert key not in output
    [entry] = InteractionLog(tmp_path / "interactions.sqlite").recent()
    assert entry.messages == [{"role": "user", "content": "ping"}]
    assert entry.completion_tokens == 3
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes()


def test_serve_refuses_a_busy_port(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert run(["serve", "--model", "tiny-llama", "--port", str(port)]) == 2
    assert "pick another --port" in capsys.readouterr().err
