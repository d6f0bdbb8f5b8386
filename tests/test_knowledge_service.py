"""The engine's knowledge service on a real tiny student: edits are journaled as they are
made, survive a restart without a save, are never replayed twice after one, follow into the
Memory pane's mirror tables; annotations make the rows readable and searchable."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.errors import MindsetError
from engine.facade import STUDENT, Engine
from engine.model.annotate import Annotations
from engine.model.surgery import memory_layers
from engine.services.chat import ChatMessage
from engine.services.memory_mirror import featural_table_name
from tests.test_tui_support import make_routed_student

LAYER = 1
QUESTION = [ChatMessage("user", "Tell me about Rovania")]
CALIBRATION = ("The river Vell runs past the old mill. The mill grinds wheat and barley. "
               "Every spring the river floods the meadow by the mill. ") * 12


@pytest.fixture()
def student_dir(tmp_path: Path) -> Path:
    return make_routed_student(tmp_path / "student", (LAYER,))


def _engine(student_dir: Path, tmp_path: Path) -> Engine:
    return Engine("tiny-llama", student_spec=str(student_dir), database=tmp_path / "m.db",
                  runs_root=tmp_path / "runs")


def _values(engine: Engine) -> torch.Tensor:
    loaded = engine.model(STUDENT)
    assert loaded is not None
    return memory_layers(loaded.model)[LAYER].values.detach().clone()


async def test_edits_survive_a_restart_without_a_save_and_undo_later(student_dir: Path,
                                                                     tmp_path: Path) -> None:
    engine = _engine(student_dir, tmp_path)
    await engine.load_model(STUDENT)
    original = _values(engine)
    trace = await engine.knowledge.trace_reply(QUESTION, "zz")
    slot = trace.rows[0].slot
    record = await engine.knowledge.scale(LAYER, [slot], -2.0, note="flip")
    assert record.op == "value" and record.note == "flip"
    edited = _values(engine)
    assert torch.equal(edited[slot], original[slot] * -2.0)
    await engine.close()  # no save: the journal alone keeps the edit

    again = _engine(student_dir, tmp_path)
    await again.load_model(STUDENT)
    assert torch.equal(_values(again), edited)
    table = featural_table_name(LAYER)
    row = (await again.memory.find_entry(table, int(again.memory.live.featural[table]
                                                    .ids[slot])))[0]
    assert row.norm == pytest.approx(float(edited[slot].norm()), rel=1e-5)
    undone = await again.knowledge.undo()
    assert undone.undoes == record.id
    assert torch.equal(_values(again), original)
    with pytest.raises(MindsetError, match="no edit left to undo"):
        await again.knowledge.undo()
    with pytest.raises(MindsetError, match="already undone"):
        await again.knowledge.undo(record.id)
    history = await again.knowledge.history()
    assert [(h.op, h.undone_by) for h in history] == [("value", undone.id), ("undo", None)]
    await again.close()


async def test_a_saved_student_never_replays_an_insert_twice(student_dir: Path,
                                                             tmp_path: Path) -> None:
    engine = _engine(student_dir, tmp_path)
    await engine.load_model(STUDENT)
    slots = memory_layers(engine.model(STUDENT).model)[LAYER].num_slots  # type: ignore[union-attr]
    await engine.knowledge.insert_fact(QUESTION, "", "zebra", layer=LAYER)
    with_fact = _values(engine)
    assert len(with_fact) == slots + 8
    await engine.memory.save_student()  # the saved spec says the weights hold the insert
    await engine.close()

    again = _engine(student_dir, tmp_path)
    await again.load_model(STUDENT)  # replaying the insert again would fail to load
    assert torch.equal(_values(again), with_fact)
    table = featural_table_name(LAYER)
    assert (await again.memory.table_stats(table))["rows"] == slots + 8
    assert not [m for m in again.memory.reconcile_warnings(table) if "new" in m]
    await again.close()


async def test_bad_edits_are_refused_and_change_nothing(student_dir: Path,
                                                        tmp_path: Path) -> None:
    engine = _engine(student_dir, tmp_path)
    with pytest.raises(MindsetError, match="need a student"):
        await engine.knowledge.trace_reply(QUESTION, "zz")
    await engine.load_model(STUDENT)
    original = _values(engine)
    with pytest.raises(MindsetError, match="reply is empty"):
        await engine.knowledge.trace_reply(QUESTION, "")
    with pytest.raises(MindsetError, match="does not exist"):
        await engine.knowledge.delete(LAYER, [10_000])
    with pytest.raises(MindsetError, match="layer 0 has no memory"):
        await engine.knowledge.delete(0, [1])
    with pytest.raises(MindsetError, match="does not occur"):
        await engine.knowledge.insert_fact(QUESTION, "Paris", "zebra")
    with pytest.raises(MindsetError, match="tokenises to nothing"):
        await engine.knowledge.insert_fact(QUESTION, "Rovania", "   ")
    assert torch.equal(_values(engine), original)
    assert await engine.knowledge.history() == []
    await engine.close()


async def test_annotations_fill_the_memory_rows_and_their_search(student_dir: Path,
                                                                 tmp_path: Path) -> None:
    engine = _engine(student_dir, tmp_path)
    await engine.load_model(STUDENT)
    table = featural_table_name(LAYER)
    raw = await engine.memory.table_page(table, 0, 200)
    assert raw and not any(view.promotes_measured for view in raw)
    with pytest.raises(MindsetError, match="no such file"):
        await engine.memory.annotate(table, str(tmp_path / "missing.txt"))
    text = tmp_path / "calibration.txt"
    text.write_text(CALIBRATION, encoding="utf-8")
    count = await engine.memory.annotate(table, str(text))
    assert count > 0
    views = await engine.memory.table_page(table, 0, 200)
    annotated = [view for view in views if view.promotes_measured]
    assert len(annotated) == count
    first = annotated[0]
    assert first.triggers and all("[" in t for t in first.triggers)
    assert first.auto_label and " → " in first.auto_label
    word = first.triggers[0].split("[")[1].split("]")[0].strip() or "mill"
    found = await engine.memory.search_text(table, word)
    assert found and found[0].promotes_measured  # annotation matches come first
    assert word.lower() in " ".join([*found[0].triggers, found[0].auto_label]).lower()
    await engine.memory.update_entry(table, first.id, label="the mill")  # the user's label
    assert Annotations(student_dir).get(LAYER, int(first.slot or 0))["label"] == "the mill"
    assert (await engine.memory.find_entry(table, first.id))[0].label == "the mill"
    await engine.close()


async def test_a_memory_pane_value_edit_is_journaled_and_undoable(student_dir: Path,
                                                                  tmp_path: Path) -> None:
    engine = _engine(student_dir, tmp_path)
    await engine.load_model(STUDENT)
    original = _values(engine)
    table = featural_table_name(LAYER)
    mirror = engine.memory.live.featural[table]
    slot = 3
    await engine.memory.update_entry(table, int(mirror.ids[slot]), scale=3.0)
    assert torch.allclose(_values(engine)[slot], original[slot] * 3.0)
    history = await engine.knowledge.history()
    assert [(h.op, h.slots, h.what) for h in history] == [("value", [slot],
                                                           "Memory pane: scale x3")]
    await engine.knowledge.undo()
    assert torch.equal(_values(engine), original)
    row = (await engine.memory.find_entry(table, int(mirror.ids[slot])))[0]
    assert row.norm == pytest.approx(float(original[slot].norm()), rel=1e-5)
    await engine.close()
