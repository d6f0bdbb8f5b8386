"""The persisted dialog tree: branches, selection, write-once labels, sharing and crashes.

Everything runs on real SQLite files in ``tmp_path``; the sharing and crash tests use real
child processes.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from engine.agent.dialog import SCHEMA_VERSION, DialogNode, DialogStore
from engine.errors import InputError, MindsetError

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "dialog.sqlite"


@pytest.fixture
def store(db_path: Path) -> Any:
    with DialogStore(db_path) as opened:
        yield opened


def contents(nodes: list[DialogNode]) -> list[str]:
    return [n.content for n in nodes]


def dump(path: Path) -> list[str]:
    """Every row of every table, as SQL: equal dumps mean nothing was written."""
    db = sqlite3.connect(path)
    try:
        return list(db.iterdump())
    finally:
        db.close()


def run_script(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


# Branches and the visible path -----------------------------------------------------------------


def test_appending_builds_the_visible_path(store: DialogStore) -> None:
    cid = store.new_conversation("greetings")
    system = store.append(cid, "system", "Be kind.")
    user = store.append(cid, "user", "hello")
    reply = store.append(cid, "assistant", "hi there", model="smol", interaction_id="abc")
    assert contents(store.path(cid)) == ["Be kind.", "hello", "hi there"]
    assert system.parent_id is None and user.parent_id == system.id
    assert reply.parent_id == user.id and reply.conversation_id == cid
    assert (reply.model, reply.interaction_id, user.model, user.interaction_id) == (
        "smol", "abc", None, None)
    assert len(reply.id) == 32 and int(reply.id, 16) >= 0
    assert store.node(reply.id) == reply
    assert [n.id for n in store.path_to(reply.id)] == [system.id, user.id, reply.id]
    assert store.children(None, cid) == [system]
    assert store.children(user.id, cid) == [reply]


def test_edit_makes_a_sibling_branch_and_the_path_follows_it(store: DialogStore) -> None:
    cid = store.new_conversation()
    question = store.append(cid, "user", "what is 2+2?")
    store.append(cid, "assistant", "4")
    edited = store.edit(question.id, "what is 3+3?")
    assert (edited.parent_id, edited.role) == (question.parent_id, "user")
    assert edited.meta == {"edited_from": question.id}
    assert contents(store.path(cid)) == ["what is 3+3?"]
    store.append(cid, "assistant", "6")
    assert contents(store.path(cid)) == ["what is 3+3?", "6"]
    assert [n.id for n in store.siblings(question.id)] == [question.id, edited.id]
    assert contents(store.leaves(cid)) == ["4", "6"]
    assert store.node(question.id).content == "what is 2+2?"  # the original is untouched


def test_switch_moves_between_branches_and_back(store: DialogStore) -> None:
    cid = store.new_conversation()
    first = store.append(cid, "user", "a")
    store.append(cid, "assistant", "a-reply")
    second = store.edit(first.id, "b")
    third = store.edit(first.id, "c")
    assert [store.position(n.id) for n in (first, second, third)] == [(1, 3), (2, 3), (3, 3)]
    assert contents(store.path(cid)) == ["c"]
    assert store.switch(third.id, 1) == first  # wraps around
    assert contents(store.path(cid)) == ["a", "a-reply"]
    assert store.switch(first.id, -1) == third
    assert store.switch(third.id, -2) == first
    assert contents(store.path(cid)) == ["a", "a-reply"]
    store.select(second.id)
    assert contents(store.path(cid)) == ["b"]


def test_selecting_a_deep_node_makes_its_whole_branch_visible(store: DialogStore) -> None:
    cid = store.new_conversation()
    root = store.append(cid, "user", "q")
    old_reply = store.append(cid, "assistant", "r1")
    old_tail = store.append(cid, "user", "more")
    store.regenerate(old_reply.id, "r2")
    assert contents(store.path(cid)) == ["q", "r2"]
    store.select(old_tail.id)
    assert [n.id for n in store.path(cid)] == [root.id, old_reply.id, old_tail.id]


def test_regenerate_makes_a_sibling_of_an_assistant_node(store: DialogStore) -> None:
    cid = store.new_conversation()
    user = store.append(cid, "user", "tell me a joke")
    reply = store.append(cid, "assistant", "joke one", model="m1", interaction_id="i1")
    again = store.regenerate(reply.id, "joke two", model="m2", interaction_id="i2",
                             meta={"seed": 7})
    assert (again.parent_id, again.role, again.model, again.interaction_id) == (
        user.id, "assistant", "m2", "i2")
    assert again.meta == {"seed": 7, "regenerated_from": reply.id}
    assert store.position(again.id) == (2, 2)
    assert contents(store.path(cid)) == ["tell me a joke", "joke two"]
    with pytest.raises(InputError, match="only an assistant reply"):
        store.regenerate(user.id, "other")


# Immutability ----------------------------------------------------------------------------------


def test_annotate_writes_each_label_once(store: DialogStore) -> None:
    cid = store.new_conversation()
    reply = store.append(cid, "assistant", "sure", model="m", meta={"memories": [1, 2]})
    rated = store.annotate(reply.id, importance=7, emotion="calm, positive")
    assert (rated.importance, rated.emotion, rated.arousal) == (7, "calm, positive", None)
    with pytest.raises(InputError, match="already has importance 7"):
        store.annotate(reply.id, importance=3)
    with pytest.raises(InputError, match="already has meta 'memories'"):
        store.annotate(reply.id, meta={"memories": [3]})
    assert store.annotate(reply.id, importance=7) == rated  # the same value is no change
    later = store.annotate(reply.id, arousal=-0.25, valence=0.5, meta={"tool": "calc"})
    assert (later.importance, later.arousal, later.valence) == (7, -0.25, 0.5)
    assert later.meta == {"memories": [1, 2], "tool": "calc"}
    for name in ("id", "parent_id", "role", "content", "created", "model", "interaction_id"):
        assert getattr(later, name) == getattr(reply, name)
    assert store.node(reply.id) == later


def test_the_file_itself_refuses_to_change_a_message(store: DialogStore, db_path: Path) -> None:
    cid = store.new_conversation()
    node = store.append(cid, "user", "original")
    store.annotate(node.id, importance=2)
    db = sqlite3.connect(db_path)
    try:
        for statement in ("UPDATE nodes SET content = 'rewritten'",
                          "UPDATE nodes SET importance = 9"):
            with pytest.raises(sqlite3.DatabaseError, match="immutable"):
                db.execute(statement)
        db.execute("UPDATE nodes SET emotion = 'fine'")  # an empty label may be filled
        db.commit()
    finally:
        db.close()
    assert (store.node(node.id).content, store.node(node.id).emotion) == ("original", "fine")


# Persistence, sharing and crashes --------------------------------------------------------------


def test_branches_and_selection_survive_reopening(db_path: Path) -> None:
    with DialogStore(db_path) as store:
        cid = store.new_conversation("kept")
        first = store.append(cid, "user", "one")
        store.append(cid, "assistant", "reply")
        store.edit(first.id, "two")
        store.switch(first.id, 0)  # select the original branch again
        expected = store.path(cid)
    with DialogStore(db_path) as store:
        assert store.path(cid) == expected
        assert contents(expected) == ["one", "reply"]
        assert store.position(first.id) == (1, 2)
        assert [(c.id, c.title, c.messages) for c in store.conversations()] == [(cid, "kept", 3)]
        db = sqlite3.connect(db_path)
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        db.close()


def test_two_open_stores_see_each_others_writes(db_path: Path) -> None:
    with DialogStore(db_path) as chat, DialogStore(db_path) as bench:
        cid = chat.new_conversation()
        question = chat.append(cid, "user", "q")
        assert contents(bench.path(cid)) == ["q"]
        bench.append(cid, "assistant", "a")
        other = chat.edit(question.id, "q2")
        assert contents(bench.path(cid)) == ["q2"]
        bench.select(question.id)
        assert contents(chat.path(cid)) == ["q", "a"]
        assert chat.position(other.id) == (2, 2)


def test_a_separate_process_reads_the_same_branches(db_path: Path) -> None:
    with DialogStore(db_path) as store:
        cid = store.new_conversation()
        first = store.append(cid, "user", "hello")
        store.append(cid, "assistant", "hi")
        store.edit(first.id, "hey")
    script = """
        import json, sys
        from engine.agent.dialog import DialogStore
        with DialogStore(sys.argv[1]) as store:
            print(json.dumps([n.content for n in store.path(sys.argv[2])]))
            node = store.path(sys.argv[2])[0]
            store.switch(node.id, 1)
    """
    child = run_script(script, str(db_path), cid)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert json.loads(out) == ["hey"]
    with DialogStore(db_path) as store:  # the child's switch is seen here
        assert contents(store.path(cid)) == ["hello", "hi"]


def test_two_processes_appending_at_once_build_one_chain(db_path: Path) -> None:
    # append reads the end of the path and writes under one lock, so concurrent writers
    # never both attach to the same message.
    with DialogStore(db_path) as store:
        cid = store.new_conversation()
    script = """
        import sys
        from engine.agent.dialog import DialogStore
        with DialogStore(sys.argv[1]) as store:
            for i in range(15):
                store.append(sys.argv[2], "user", f"{sys.argv[3]}{i}")
    """
    children = [run_script(script, str(db_path), cid, name) for name in "ab"]
    for child in children:
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
    with DialogStore(db_path) as store:
        path = store.path(cid)
        assert len(path) == 30 and len(store.leaves(cid)) == 1
        assert all(n.parent_id == p.id for p, n in itertools.pairwise(path))
        for name in "ab":  # each writer's turns keep their order
            assert [n.content for n in path if n.content[0] == name] == [
                f"{name}{i}" for i in range(15)]


def test_a_kill_mid_write_loses_nothing_committed(db_path: Path) -> None:
    # The child adds messages, reporting each as soon as add returns, then opens a write it
    # never commits and waits to be killed.
    script = """
        import sqlite3, sys, time
        from engine.agent.dialog import DialogStore
        store = DialogStore(sys.argv[1])
        cid = store.new_conversation("crash")
        print(cid, flush=True)
        for i in range(5):
            node = store.append(cid, "user" if i % 2 == 0 else "assistant", f"turn {i}")
            print(node.id, flush=True)
        raw = sqlite3.connect(sys.argv[1], isolation_level=None)
        raw.execute("BEGIN IMMEDIATE")
        raw.execute("INSERT INTO conversations VALUES ('lost', 'never committed', 0, 0)")
        print("mid-write", flush=True)
        time.sleep(60)
    """
    child = run_script(script, str(db_path))
    assert child.stdout is not None
    lines = []
    while (line := child.stdout.readline().strip()) != "mid-write":
        assert line, child.stderr.read() if child.stderr else "the child stopped"
        lines.append(line)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    cid, *ids = lines
    with DialogStore(db_path) as store:
        assert [n.id for n in store.path(cid)] == ids
        assert contents(store.path(cid)) == [f"turn {i}" for i in range(5)]
        assert [c.id for c in store.conversations()] == [cid]
        store.append(cid, "user", "after the crash")  # the dead writer's lock is gone
        assert len(store.path(cid)) == 6
    db = sqlite3.connect(db_path)
    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    db.close()


# Export ----------------------------------------------------------------------------------------


def _branched(store: DialogStore) -> tuple[str, DialogNode]:
    cid = store.new_conversation("Trip plans")
    store.append(cid, "user", "Where should I go?", created=0.0)
    store.append(cid, "inner", "They sound tired.", model="m", created=1.0)
    old = store.append(cid, "assistant", "Lisbon.", model="m", interaction_id="i1",
                       arousal=0.2, valence=0.6, emotion="calm, positive", importance=4,
                       created=2.0)
    store.regenerate(old.id, "Kyoto.", model="m", interaction_id="i2", created=3.0)
    return cid, old


def test_export_markdown_of_the_visible_branch_and_of_another_leaf(store: DialogStore) -> None:
    cid, old = _branched(store)
    visible = store.export(cid)
    assert visible.splitlines()[0] == "# Trip plans"
    assert "## user · 1970-01-01 00:00:00 UTC\n\nWhere should I go?\n" in visible
    assert "## assistant · m · 1970-01-01 00:00:03 UTC\n\nKyoto.\n" in visible
    assert "Lisbon" not in visible and "tired" not in visible
    hidden = store.export(cid, "markdown", leaf_id=old.id, include_inner=True)
    assert ("## assistant · m · 1970-01-01 00:00:02 UTC · calm, positive "
            "(arousal +0.20, valence +0.60) · importance 4\n\nLisbon.\n") in hidden
    assert "## inner · m · 1970-01-01 00:00:01 UTC\n\nThey sound tired." in hidden
    assert "Kyoto" not in hidden


def test_export_json_round_trips_with_every_field(store: DialogStore) -> None:
    cid, old = _branched(store)
    data = json.loads(store.export(cid, "json"))
    assert (data["id"], data["title"]) == (cid, "Trip plans")
    assert [n["content"] for n in data["nodes"]] == ["Where should I go?", "Kyoto."]
    data = json.loads(store.export(cid, "json", leaf_id=old.id, include_inner=True))
    assert [n["role"] for n in data["nodes"]] == ["user", "inner", "assistant"]
    last = data["nodes"][-1]
    assert set(last) == set(DialogNode.__dataclass_fields__)
    assert DialogNode(**last) == store.node(old.id)
    with pytest.raises(InputError, match="choose one of markdown, json"):
        store.export(cid, "html")
    other = store.new_conversation()
    with pytest.raises(InputError, match="not in conversation"):
        store.export(other, leaf_id=old.id)


# Conversations and search ----------------------------------------------------------------------


def test_conversations_are_listed_newest_first_renamed_and_deleted(store: DialogStore) -> None:
    first = store.new_conversation("first")
    second = store.new_conversation("second")
    assert [c.id for c in store.conversations()] == [second, first]
    node = store.append(first, "user", "bump")
    assert [c.id for c in store.conversations()] == [first, second]
    store.rename(second, "renamed")
    assert [(c.title, c.messages) for c in store.conversations()] == [("renamed", 0),
                                                                      ("first", 1)]
    store.delete_conversation(first)
    assert [c.id for c in store.conversations()] == [second]
    with pytest.raises(InputError, match="no message with id"):
        store.node(node.id)
    with pytest.raises(InputError, match="no conversation with id"):
        store.path(first)


def test_search_finds_messages_by_their_words(store: DialogStore) -> None:
    cid = store.new_conversation()
    store.append(cid, "user", "I love green tea")
    store.append(cid, "inner", "tea again")
    store.append(cid, "assistant", "Green TEA_with lemon is 100% good")
    assert contents(store.search("tea green")) == ["Green TEA_with lemon is 100% good",
                                                   "I love green tea"]
    assert contents(store.search("tea", include_inner=True, limit=2)) == [
        "Green TEA_with lemon is 100% good", "tea again"]
    assert contents(store.search("100%")) == ["Green TEA_with lemon is 100% good"]
    assert store.search("10_%") == []  # LIKE wildcards in the text are literal
    assert store.search("tea", conversation_id=store.new_conversation()) == []


# Bad input -------------------------------------------------------------------------------------


def test_a_closed_or_foreign_file_is_refused_in_one_line(tmp_path: Path) -> None:
    store = DialogStore(tmp_path / "d.sqlite")
    store.close()
    with pytest.raises(MindsetError, match="is closed"):
        store.conversations()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(MindsetError, match="unreadable"):
        DialogStore(junk)
    newer = tmp_path / "newer.sqlite"
    sqlite3.connect(newer).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}").close()
    with pytest.raises(MindsetError, match="newer Mindset"):
        DialogStore(newer)


BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown conversation", {"conversation": "nope"}, "no conversation with id 'nope'"),
    ("unknown parent", {"parent": "nope"}, "no message with id 'nope'"),
    ("foreign parent", {"parent": "foreign"}, "is in conversation .*, not in conversation"),
    ("bad role", {"role": "narrator"}, "role 'narrator' is not one of"),
    ("content not str", {"content": b"bytes"}, "content must be text"),
    ("content None", {"content": None}, "content must be text"),
    ("arousal high", {"arousal": 1.5}, "arousal must be a number from -1 to 1"),
    ("valence low", {"valence": -1.01}, "valence must be a number from -1 to 1"),
    ("arousal nan", {"arousal": math.nan}, "arousal must be"),
    ("valence inf", {"valence": math.inf}, "valence must be"),
    ("valence text", {"valence": "0.5"}, "valence must be"),
    ("importance 0", {"importance": 0}, "importance must be a whole number from 1 to 10"),
    ("importance 11", {"importance": 11}, "importance must be"),
    ("importance float", {"importance": 5.0}, "importance must be"),
    ("importance bool", {"importance": True}, "importance must be"),
    ("meta object", {"meta": {"x": object()}}, "meta\\['x'\\] is a object"),
    ("meta key", {"meta": {"ok": {1: "a"}}}, "JSON keys must be text"),
    ("meta nan", {"meta": {"x": [math.nan]}}, "JSON cannot hold"),
    ("meta list", {"meta": [1]}, "meta must be a dict"),
    ("emotion number", {"emotion": 3}, "emotion must be text"),
    ("model number", {"model": 3}, "model must be text"),
]


@pytest.mark.parametrize(("case", "change", "message"), BAD_CALLS,
                         ids=[case for case, _, _ in BAD_CALLS])
def test_bad_input_is_refused_and_writes_nothing(store: DialogStore, db_path: Path, case: str,
                                                 change: dict[str, Any], message: str) -> None:
    cid = store.new_conversation()
    parent = store.append(cid, "user", "hi")
    foreign = store.append(store.new_conversation(), "user", "elsewhere")
    args: dict[str, Any] = {"conversation": cid, "parent": parent.id, "role": "assistant",
                            "content": "hello"}
    fields = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    if args["parent"] == "foreign":
        args["parent"] = foreign.id
    before = dump(db_path)
    with pytest.raises(InputError, match=message) as caught:
        store.add(args["conversation"], args["parent"], args["role"], args["content"], **fields)
    assert "\n" not in str(caught.value)
    if fields:  # labels are checked the same way when appended or annotated later
        with pytest.raises(InputError, match=message):
            store.append(cid, "assistant", "hello", **fields)
        if set(fields) <= {"importance", "arousal", "valence", "emotion", "meta"}:
            with pytest.raises(InputError, match=message):
                store.annotate(parent.id, **fields)
    assert dump(db_path) == before


def test_other_bad_calls_are_refused_and_write_nothing(store: DialogStore,
                                                       db_path: Path) -> None:
    cid = store.new_conversation()
    node = store.append(cid, "user", "hi")
    other = store.new_conversation()
    before = dump(db_path)
    calls = [
        (lambda: store.edit("missing", "x"), "no message with id 'missing'"),
        (lambda: store.edit(node.id, 42), "content must be text"),  # type: ignore[arg-type]
        (lambda: store.regenerate("missing", "x"), "no message with id"),
        (lambda: store.annotate("missing", importance=3), "no message with id"),
        (lambda: store.select("missing"), "no message with id"),
        (lambda: store.switch("missing", 1), "no message with id"),
        (lambda: store.append("nope", "user", "x"), "no conversation with id"),
        (lambda: store.rename("nope", "t"), "no conversation with id"),
        (lambda: store.rename(cid, None), "title must be text"),  # type: ignore[arg-type]
        (lambda: store.delete_conversation("nope"), "no conversation with id"),
        (lambda: store.children(node.id, other), "not in conversation"),
        (lambda: store.search("   "), "give some text"),
        (lambda: store.add(cid, None, "user", "x", created=math.nan), "created must be"),
    ]
    for call, message in calls:
        with pytest.raises(InputError, match=message):
            call()
    assert dump(db_path) == before
