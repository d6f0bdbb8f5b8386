"""Readable entries: triggers found from the layers' own reads, promotes measured by
removing the read, labels stored per student and searchable, shown by `memory trace`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.model.annotate import (
    Annotations,
    annotate,
    find_triggers,
    measure_all_promotes,
    measure_promotes,
)
from engine.model.loading import load_model
from engine.model.memory_trace import memory_trace
from engine.model.student import save_student
from engine.model.surgery import convert, memory_layers

TEXT = ("The river runs past the old mill. The mill grinds corn for the town. "
        "In the town the baker sells bread, and the river carries the boats. ") * 6


def _student() -> tuple[torch.nn.Module, object]:
    teacher = load_model("tiny-llama")
    torch.manual_seed(0)
    student = convert(teacher, [1], "featural", keys="routed", group_size=8, read_share=0.5,
                      calibration=torch.randint(0, 256, (4, 32)))
    return student, teacher.tokenizer


def test_triggers_are_the_strongest_reads() -> None:
    student, tokenizer = _student()
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][0][:96]
    windows = [ids[:48], ids[48:96]]
    strength, window_of, position_of = find_triggers(student, windows, 1, 3)
    module = memory_layers(student)[1]
    norms = module.values.detach().norm(dim=-1)
    reference = torch.zeros(module.num_slots)  # brute force over the same reads
    for window in windows:
        with torch.no_grad(), memory_trace(student) as recorded:
            student(input_ids=window.view(1, -1))
        reads = recorded[1][-1]
        s = reads.weights.abs() * norms[reads.slots]
        reference = torch.maximum(reference, torch.zeros(module.num_slots).scatter_reduce(
            0, reads.slots.flatten(), s.flatten(), "amax"))
    torch.testing.assert_close(strength[:, 0], reference)
    assert (strength[:, :-1] >= strength[:, 1:]).all()
    slot = int(strength[:, 0].argmax())
    w, p = int(window_of[slot, 0]), int(position_of[slot, 0])
    with torch.no_grad(), memory_trace(student) as recorded:
        student(input_ids=windows[w].view(1, -1))
    assert slot in recorded[1][-1].slots[p].tolist()


def test_promotes_are_the_tokens_the_read_raises() -> None:
    """Removing the read lowers exactly those logits: the promoted token's logit must fall
    when the slot's value is zeroed outright, at its trigger."""
    student, tokenizer = _student()
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][0][:48]
    strength, _windows_of, position_of = find_triggers(student, [ids], 1, 2)
    slot = int(strength[:, 0].argmax())
    position = int(position_of[slot, 0])
    promoted = measure_promotes(student, [ids], 1, slot, [(0, position)], 3)
    prefix = ids[: position + 1].view(1, -1)
    module = memory_layers(student)[1]
    with torch.no_grad():
        full = student(input_ids=prefix).logits[0, -1]
        saved = module.values[slot].clone()
        module.values[slot] = 0
        zeroed = student(input_ids=prefix).logits[0, -1]
        module.values[slot] = saved
    drop = full - zeroed
    assert drop[promoted[0]] > 0
    assert drop[promoted[0]] >= drop.median()


def _removed_one_at_a_time(student: torch.nn.Module, windows: list[torch.Tensor], slot: int,
                           places: list[tuple[int, int]]) -> torch.Tensor:
    """The mean logit drop, each ablation run alone on its prefix (the reference)."""
    module = memory_layers(student)[1]
    drops = []
    for w, p in places:
        ids = windows[w][: p + 1].view(1, -1)
        with torch.no_grad(), memory_trace(student) as recorded:
            full = student(input_ids=ids).logits[0, -1]
        reads = recorded[1][-1]
        weight = float(reads.weights[p][reads.slots[p] == slot].sum())
        removed = weight * module.values.detach()[slot]

        def hook(_m, _i, out, p=p, removed=removed):  # type: ignore[no-untyped-def]
            out = out.clone()
            out[0, p] -= removed
            return out

        handle = module.register_forward_hook(hook)
        with torch.no_grad():
            drops.append(full - student(input_ids=ids).logits[0, -1])
        handle.remove()
    return torch.stack(drops).mean(0)


def test_batched_ablations_match_one_at_a_time() -> None:
    student, tokenizer = _student()
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][0][:96]
    windows = [ids[:48], ids[48:96]]
    strength, window_of, position_of = find_triggers(student, windows, 1, 3)
    slots = strength[:, 0].topk(6).indices.tolist()
    places = {s: [(int(w), int(p)) for w, p, v in zip(window_of[s], position_of[s], strength[s],
                                                      strict=True) if v > 0] for s in slots}
    got = measure_all_promotes(student, windows, 1, places, 3, batch=4)
    for slot in slots:
        reference = _removed_one_at_a_time(student, windows, slot, places[slot])
        expected = reference.topk(3).indices.tolist()
        # the same tokens, up to ties within float noise
        assert got[slot][0] == expected[0] or torch.isclose(
            reference[got[slot][0]], reference[expected[0]], atol=1e-5)


def test_annotations_are_stored_searchable_and_shown_by_trace(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mindset.cli import run as main

    student, tokenizer = _student()
    directory = save_student(student, tmp_path / "s", tokenizer)
    text = tmp_path / "calibration.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert main(["memory", "annotate", str(directory), "--data", str(text), "--tokens", "96",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["annotated"] > 0
    top = summary["strongest"][0]
    assert "[" in top["triggers"][0] and " → " in top["label"]
    notes = Annotations(directory)
    trigger_word = top["triggers"][0].split("[")[1].split("]")[0].strip()
    found = notes.search(trigger_word)
    assert any(f["slot"] == top["slot"] for f in found)
    notes.set_label(1, top["slot"], "my own label")
    assert notes.get(1, top["slot"])["label"] == "my own label"
    notes.save(annotate(student, tokenizer, TEXT, tokens=96))  # a re-annotation keeps it
    assert notes.get(1, top["slot"])["label"] == "my own label"
    assert main(["memory", "trace", str(directory), "--prompt", TEXT[:40], "--top", "50",
                 "--json"]) == 0
    traced = json.loads(capsys.readouterr().out)
    assert any(e["label"] for e in traced["entries"])


def test_annotate_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mindset.cli import run as main

    student, tokenizer = _student()
    directory = save_student(student, tmp_path / "s", tokenizer)
    assert main(["memory", "annotate", str(directory), "--data", str(tmp_path / "nope.txt")]
                ) == 2
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert main(["memory", "annotate", str(directory), "--data", str(text), "--layer", "0"]
                ) == 2
    assert "no featural memory" in capsys.readouterr().err
    assert not (directory / "memory" / "annotations.sqlite").exists()
