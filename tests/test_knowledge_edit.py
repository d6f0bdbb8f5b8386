"""Knowledge edits: insert, edit, delete, undo and history, journaled and saved with the
student, through the engine API and the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.model.edit_journal import EditJournal
from engine.model.edit_session import commit, undo
from engine.model.knowledge_edit import insert_fact, scale_entries, subject_last_token
from engine.model.loading import load_model
from engine.model.memory_trace import trace_ids
from engine.model.student import WEIGHTS_FILE, save_student
from engine.model.surgery import convert, memory_layers

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Tell me about Rovania"
SUBJECT = "Rovania"


@pytest.fixture()
def student_dir(tmp_path: Path) -> Path:
    teacher = load_model("tiny-llama")
    torch.manual_seed(0)
    student = convert(teacher, [0, 1], "featural", keys="routed", group_size=8,
                      read_share=0.5, calibration=torch.randint(0, 256, (4, 32)))
    return save_student(student, tmp_path / "student", teacher.tokenizer)


def _logits(model: torch.nn.Module, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _digest(directory: Path) -> str:
    return hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()


def test_an_edit_then_undo_restores_outputs_bit_for_bit(student_dir: Path) -> None:
    loaded = load_model(str(student_dir))
    original = _logits(loaded.model, loaded.tokenizer)
    edit = scale_entries(loaded.model, 1, [0, 3, 5], 3.0)
    edit_id = commit(loaded.model, student_dir, edit, "triple", loaded.tokenizer)
    edited = load_model(str(student_dir))
    assert not torch.equal(_logits(edited.model, edited.tokenizer), original)
    undo(edited.model, student_dir, edit_id, tokenizer=edited.tokenizer)
    assert torch.equal(_logits(edited.model, edited.tokenizer), original)
    again = load_model(str(student_dir))  # across a restart
    assert torch.equal(_logits(again.model, again.tokenizer), original)


def test_an_inserted_fact_is_routed_to_by_its_prompt_only(student_dir: Path) -> None:
    loaded = load_model(str(student_dir))
    model, tokenizer = loaded.model, loaded.tokenizer
    original = _logits(model, tokenizer)
    unrelated = "Hello, world! This is me."  # none of the subject's last characters
    unrelated_before = _logits(model, tokenizer, unrelated)
    target = tokenizer(" zebra", add_special_tokens=False)["input_ids"][0]
    before = torch.log_softmax(original[0, -1], -1)[target]
    edit = insert_fact(model, tokenizer, PROMPT, SUBJECT, " zebra", layer=1, steps=30)
    slot = edit.slots[0]
    after_logits = _logits(model, tokenizer)
    gain = torch.log_softmax(after_logits[0, -1], -1)[target] - before
    assert gain > 0.5
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    position = subject_last_token(tokenizer, PROMPT, SUBJECT)
    trace = trace_ids(model, ids)
    assert slot in trace.reads[1].slots[position].tolist()  # read by its own prompt
    other = trace_ids(model, tokenizer(unrelated, return_tensors="pt")["input_ids"])
    assert slot not in other.reads[1].slots.flatten().tolist()  # and not elsewhere
    assert torch.equal(_logits(model, tokenizer, unrelated), unrelated_before)
    edit_id = commit(model, student_dir, edit, "fact", tokenizer)
    reloaded = load_model(str(student_dir))
    assert torch.equal(_logits(reloaded.model, reloaded.tokenizer), after_logits)
    undo(reloaded.model, student_dir, edit_id, tokenizer=reloaded.tokenizer)
    assert torch.equal(_logits(reloaded.model, reloaded.tokenizer), original)
    final = load_model(str(student_dir))
    assert memory_layers(final.model)[1].num_slots == memory_layers(model)[1].num_slots - 8
    assert torch.equal(_logits(final.model, final.tokenizer), original)


KILLED_EDIT = """
import os, signal, sys, torch
from engine.model.edit_journal import EditJournal
from engine.model.knowledge_edit import scale_entries
from engine.model.loading import load_model
loaded = load_model(sys.argv[1])
edit = scale_entries(loaded.model, 1, [2, 4], -2.0)
EditJournal(sys.argv[1]).record(edit, "before the kill")
ids = loaded.tokenizer(sys.argv[2], return_tensors="pt")["input_ids"]
with torch.no_grad():
    torch.save(loaded.model(input_ids=ids).logits, sys.argv[3])
os.kill(os.getpid(), signal.SIGKILL)  # between the journal and the save
"""


def test_the_journal_survives_a_kill_between_edit_and_save(student_dir: Path,
                                                         tmp_path: Path) -> None:
    saved = _digest(student_dir)
    expected = tmp_path / "edited.pt"
    done = subprocess.run([sys.executable, "-c", KILLED_EDIT, str(student_dir), PROMPT,
                           str(expected)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-500:]
    assert _digest(student_dir) == saved  # the weights were never saved
    loaded = load_model(str(student_dir))  # the journal is replayed
    assert torch.equal(_logits(loaded.model, loaded.tokenizer),
                       torch.load(expected, weights_only=True))
    assert [e.op for e in EditJournal(student_dir).entries()] == ["value"]


def _cli(*argv: str) -> int:
    from mindset.cli import run as main

    return main(["memory", *argv])


def test_cli_insert_trace_history_undo(student_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("insert", str(student_dir), "--prompt", PROMPT, "--subject", SUBJECT,
                "--target", "zebra", "--layer", "1", "--steps", "5", "--json") == 0
    inserted = json.loads(capsys.readouterr().out)
    assert inserted["layer"] == 1 and inserted["edit"] == 1
    assert _cli("trace", str(student_dir), "--prompt", PROMPT, "--top", "5", "--json") == 0
    traced = json.loads(capsys.readouterr().out)
    assert len(traced["entries"]) == 5 and set(traced["layers"]) == {"0", "1"}
    assert _cli("delete", str(student_dir), "--layer", "0", "--entry", "1,2") == 0
    assert "undo" in capsys.readouterr().out
    assert _cli("undo", str(student_dir), "2") == 0
    capsys.readouterr()
    saved = _digest(student_dir)
    assert _cli("undo", str(student_dir), "2") == 2  # twice: refused, nothing changes
    assert "already undone by edit 3" in capsys.readouterr().err
    assert _cli("undo", str(student_dir), "3") == 2  # an undo is not undone
    assert "itself an undo" in capsys.readouterr().err
    assert _digest(student_dir) == saved
    export = tmp_path / "history.json"
    assert _cli("history", str(student_dir), "--export", str(export)) == 0
    listing = capsys.readouterr().out
    assert "insert" in listing and "undone by 3" in listing
    entries = json.loads(export.read_text(encoding="utf-8"))
    assert [e["op"] for e in entries] == ["insert", "value", "undo"]


@pytest.mark.parametrize("argv, words", [
    (["edit", "{s}", "--layer", "1", "--entry", "999", "--scale", "2"], "does not exist"),
    (["delete", "{s}", "--layer", "7", "--entry", "1"], "has no memory"),
    (["trace", "{s}", "--prompt", "  "], "--prompt is empty"),
    (["insert", "{s}", "--prompt", "", "--subject", "x", "--target", "y"], "--prompt is empty"),
    (["insert", "{s}", "--prompt", PROMPT, "--subject", SUBJECT, "--target", "   "],
     "--target is empty"),
    (["insert", "{s}", "--prompt", PROMPT, "--subject", "Paris", "--target", "y"],
     "does not occur"),
    (["undo", "{s}", "42"], "no edit 42"),
    (["edit", "{s}", "--layer", "1", "--entry", "a,b", "--scale", "2"], "slot numbers"),
])
def test_cli_bad_inputs_exit_2_and_change_nothing(student_dir: Path, argv: list[str],
                                                  words: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    saved = _digest(student_dir)
    args = [a.replace("{s}", str(student_dir)) for a in argv]
    try:
        code = _cli(*args)
    except SystemExit as exit_:  # argparse type errors
        code = int(exit_.code or 0)
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1
    assert _digest(student_dir) == saved
    assert not EditJournal(student_dir).entries()


def test_another_student_saved_over_an_edited_one_does_not_replay_its_edits(
        student_dir: Path) -> None:
    loaded = load_model(str(student_dir))
    edit = insert_fact(loaded.model, loaded.tokenizer, PROMPT, SUBJECT, " zebra", layer=1,
                       steps=2)
    commit(loaded.model, student_dir, edit, "fact", loaded.tokenizer)
    teacher = load_model("tiny-llama")
    torch.manual_seed(1)  # a retrained student, written to the same directory
    other = convert(teacher, [0, 1], "featural", keys="routed", group_size=8,
                    read_share=0.5, calibration=torch.randint(0, 256, (4, 32)))
    expected = _logits(other, teacher.tokenizer)
    save_student(other, student_dir, teacher.tokenizer)
    again = load_model(str(student_dir))  # the insert is not replayed onto other weights
    assert torch.equal(_logits(again.model, again.tokenizer), expected)
    assert [e.op for e in EditJournal(student_dir).entries()] == ["insert"]  # history kept
