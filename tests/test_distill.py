"""The distillation loop in-process: KL goes down, resume, cancel, NaN handling, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.distill import events as ev
from engine.distill.build import build_student
from engine.distill.checkpoints import ENTRIES_KEY, load_checkpoint
from engine.distill.job_events import (
    DoneEvent,
    ErrorEvent,
    EvalEvent,
    JobEvent,
    ResumedEvent,
    StepEvent,
    latest_steps,
    read_events,
)
from engine.distill.loop import run_distillation
from engine.distill.objective import NonFiniteLossError
from engine.distill.report import compare
from engine.errors import MindsetError
from engine.model.anatomy import layer_mlps
from engine.model.loading import load_model
from tests.test_distill_support import teacher_dir, tiny_config


def initial_kl(config_kwargs: dict) -> float:
    """KL on the held-out blocks of the freshly converted student, before any training."""
    config = tiny_config(**config_kwargs)
    teacher = load_model(config.teacher)
    from engine.distill.data import load_text_data

    data = load_text_data(config.data, teacher.tokenizer, block_size=config.block_size,
                          heldout_fraction=config.heldout_fraction, cache_dir=None)
    torch.manual_seed(config.seed)
    student = build_student(teacher.model, [1, 2], config.memory, dict(config.hparams))
    return float(compare(student, teacher.model, data.heldout[: config.heldout_blocks],
                         [1, 2])["kl_per_token"])


def test_a_few_steps_lower_the_kl_and_write_every_output(tmp_path: Path) -> None:
    kwargs = dict(steps=12, lr=3e-2)
    before = initial_kl(kwargs)
    run_dir = tmp_path / "run"
    report = run_distillation(tiny_config(**kwargs), run_dir)
    assert report["kl_per_token"] < 0.8 * before, (before, report["kl_per_token"])
    assert report["steps_done"] == 12 and report["tokens_seen"] == 12 * 4 * 32
    assert report["ppl_student"] > 0 and report["cpu_seconds"] > 0
    assert 0.0 <= report["top1_agreement"] <= 1.0
    # Gap closed follows its definition from the three perplexities.
    expected = (report["ppl_zeroed"] - report["ppl_student"]) / (
        report["ppl_zeroed"] - report["ppl_teacher"])
    assert report["gap_closed"] == pytest.approx(expected)
    assert json.loads((run_dir / ev.REPORT_NAME).read_text())["ppl_student"] == pytest.approx(
        report["ppl_student"])
    assert "gap closed" in (run_dir / ev.SUMMARY_NAME).read_text()
    assert any((run_dir / ev.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert ev.read_state(run_dir)["state"] == "completed"
    events = read_events(run_dir)
    kinds = [type(e) for e in events]
    assert kinds.count(StepEvent) == 12 and EvalEvent in kinds and kinds[-2] is DoneEvent
    step = latest_steps(events)[12]
    assert step.kl is not None and step.ce is None and step.stage == "e2e"
    assert step.loss > 0 and step.tokens_per_s > 0 and step.lr > 0 and step.grad_norm > 0
    assert step.eta_s == 0 and step.tokens_seen == 12 * 4 * 32 and step.version == 1
    done = events[-2]
    assert isinstance(done, DoneEvent) and done.ppl_student == pytest.approx(
        report["ppl_student"]) and done.layers == [1, 2]
    # The student directory loads back and gives the same held-out numbers.
    from engine.model.loading import load_student

    loaded = load_student(run_dir / "student")
    teacher = load_model(str(teacher_dir()))
    from engine.distill.data import load_text_data

    data = load_text_data([str(p) for p in tiny_config().data], teacher.tokenizer,
                          block_size=32, heldout_fraction=0.1, cache_dir=None)
    again = compare(loaded.model, teacher.model, data.heldout[:4], [1, 2])
    assert again["ppl_student"] == pytest.approx(report["ppl_student"], rel=1e-4)


def test_layer_local_stage_fits_the_teacher_mlps(tmp_path: Path) -> None:
    events: list[JobEvent] = []
    config = tiny_config(local_steps=10, steps=1, schedule="constant", lr=3e-2)
    run_distillation(config, tmp_path / "r", on_event=events.append)
    local = [e.local for e in events if isinstance(e, StepEvent) and e.stage == "local"]
    assert len(local) == 10
    assert sum(local[-3:]) < 0.85 * sum(local[:3]), local


def test_cancel_then_resume_gives_the_same_run_as_no_interruption(tmp_path: Path) -> None:
    reference = latest_steps(_run_events(tmp_path / "reference", tiny_config()))

    run_dir = tmp_path / "interrupted"
    run_dir.mkdir()
    ev.write_control(run_dir, "cancel", at_step=5)
    assert run_distillation(tiny_config(), run_dir) == {}  # cancelled: no report
    assert ev.read_state(run_dir)["state"] == "cancelled"
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint["step"] == 5
    ev.write_control(run_dir, "run")
    report = run_distillation(tiny_config(), run_dir)
    assert report["steps_done"] == 8
    resumed = latest_steps(read_events(run_dir))
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    for step, event in reference.items():
        assert resumed[step].batch_hash == event.batch_hash, step  # same data order
        assert resumed[step].loss == event.loss, step  # bit-identical
    resumes = [e.from_step for e in read_events(run_dir) if isinstance(e, ResumedEvent)]
    assert resumes == [5]


def _run_events(run_dir: Path, config) -> list[JobEvent]:  # type: ignore[no-untyped-def]
    run_distillation(config, run_dir)
    return read_events(run_dir)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    # A temperature this small overflows the scaled logits to infinity, so the KL is NaN as
    # soon as the end-to-end stage starts; two layer-local steps checkpoint before that.
    config = tiny_config(local_steps=2, temperature=1e-40, checkpoint_every=1, steps=5)
    run_dir = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError) as raised:
        run_distillation(config, run_dir)
    message = str(raised.value)
    assert "became" in message and "last good checkpoint" in message
    state = ev.read_state(run_dir)
    assert state["state"] == "failed" and state["error"] == message
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint["step"] == state["last_checkpoint"] >= 1
    assert f"step {checkpoint['step']}" in message
    assert [e for e in read_events(run_dir) if isinstance(e, ErrorEvent)]
    assert checkpoint["step"] == state["step"] == 2  # the step before the NaN
    weights = checkpoint["weights"]
    assert all(torch.isfinite(t).all() for t in weights.values()), "a NaN was checkpointed"


def test_dense_control_replaces_only_the_chosen_layers(tmp_path: Path) -> None:
    teacher = load_model(str(teacher_dir()))
    student = build_student(teacher.model, [2], "dense", {"width": 24})
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.2.mlp.") for n in trainable)
    assert layer_mlps(student, [2])[2].up.out_features == 24
    assert layer_mlps(teacher.model, [2])[2] is not layer_mlps(student, [2])[2]


def test_data_free_distillation_samples_a_corpus_from_the_teacher(tmp_path: Path) -> None:
    config = tiny_config(data=[], data_free_blocks=8, heldout_blocks=2, steps=2)
    report = run_distillation(config, tmp_path / "free")
    assert report["data"] == "sampled from the teacher"
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "free" / "data_free.safetensors")  # tensors only, no pickle
    assert saved["train"].shape == (8, 32) and saved["heldout"].shape == (2, 32)
    assert not list((tmp_path / "free").glob("*.pt"))
    from engine.distill.loop import load_data_free

    (tmp_path / "free" / "data_free.safetensors").write_bytes(b"\x80\x04garbage")
    with pytest.raises(MindsetError, match="unreadable"):
        load_data_free(tmp_path / "free" / "data_free.safetensors")
    assert math.isfinite(report["kl_per_token"])


ASSOCIATIVE = dict(memory="associative", hparams={"base": "none", "capacity": 512}, steps=4)


def test_associative_entries_survive_a_resume(tmp_path: Path) -> None:
    config = tiny_config(**ASSOCIATIVE)
    reference = latest_steps(_run_events(tmp_path / "reference", config))
    run_dir = tmp_path / "assoc"
    run_dir.mkdir()
    ev.write_control(run_dir, "cancel", at_step=2)
    assert run_distillation(config, run_dir) == {}
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint is not None and "tables" not in checkpoint
    entries = checkpoint[ENTRIES_KEY]  # the memories' own state, as tensors
    assert sorted(entries) == [1, 2]
    assert all(len(layer["keys"]) == len(layer["crf"]) > 0 for layer in entries.values())
    ev.write_control(run_dir, "run")
    report = run_distillation(config, run_dir)
    assert report["steps_done"] == 4 and math.isfinite(report["kl_per_token"])
    assert (run_dir / "student" / "memory").is_dir()
    # Entries and their LRFU statistics came back exactly: the resumed steps are the same.
    resumed = latest_steps(read_events(run_dir))
    for step, event in reference.items():
        assert resumed[step].loss == event.loss, step  # bit-identical


def test_a_crash_between_the_tensor_file_and_the_manifest_keeps_the_last_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from engine.distill import checkpoints

    run_dir = tmp_path / "crash"
    run_distillation(tiny_config(steps=2, checkpoint_every=1), run_dir)
    state = load_checkpoint(run_dir)
    assert state is not None
    before = state["step"]
    state["step"] = before + 5
    state["weights"] = {k: v + 1 for k, v in state["weights"].items()}

    def crash(*_args: object) -> None:
        raise OSError("disk pulled")

    monkeypatch.setattr(checkpoints, "atomic_write_text", crash)
    with pytest.raises(OSError):
        checkpoints.save_checkpoint(run_dir, state)
    monkeypatch.undo()
    kept = load_checkpoint(run_dir)
    assert kept is not None and kept["step"] == before  # the old pair, whole
    checkpoints.save_checkpoint(run_dir, state)
    assert load_checkpoint(run_dir)["step"] == before + 5  # type: ignore[index]
    assert len(list(run_dir.glob("checkpoint-*.safetensors"))) == 1  # the stale one went
