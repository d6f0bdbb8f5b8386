"""The distillation loop in-process: KL goes down, resume, cancel, NaN handling, outputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.distill import events as ev
from engine.distill.build import build_student, layer_mlps
from engine.distill.checkpoints import load_checkpoint
from engine.distill.loop import run_distillation
from engine.distill.objective import NonFiniteLossError
from engine.distill.report import compare
from engine.model.loading import load_model
from tests.test_distill_support import step_events, teacher_dir, tiny_config


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
    kinds = [e["type"] for e in ev.read_events(run_dir)]
    assert kinds.count("step") == 12 and "eval" in kinds and kinds[-2] == "done"
    step = step_events(ev.read_events(run_dir))[12]
    for key in ("loss", "kl", "tokens_per_s", "eta_s", "lr", "grad_norm", "tokens_seen"):
        assert key in step
    # The student directory loads back and gives the same held-out numbers.
    from engine.model.student import load_student

    loaded = load_student(run_dir / "student")
    teacher = load_model(str(teacher_dir()))
    from engine.distill.data import load_text_data

    data = load_text_data([str(p) for p in tiny_config().data], teacher.tokenizer,
                          block_size=32, heldout_fraction=0.1, cache_dir=None)
    again = compare(loaded.model, teacher.model, data.heldout[:4], [1, 2])
    assert again["ppl_student"] == pytest.approx(report["ppl_student"], rel=1e-4)


def test_layer_local_stage_fits_the_teacher_mlps(tmp_path: Path) -> None:
    events: list[dict] = []
    config = tiny_config(local_steps=10, steps=1, schedule="constant", lr=3e-2)
    run_distillation(config, tmp_path / "r", on_event=events.append)
    local = [e["local"] for e in events if e["type"] == "step" and e["stage"] == "local"]
    assert len(local) == 10
    assert sum(local[-3:]) < 0.85 * sum(local[:3]), local


def test_cancel_then_resume_gives_the_same_run_as_no_interruption(tmp_path: Path) -> None:
    reference = step_events(_run_events(tmp_path / "reference", tiny_config()))

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
    resumed = step_events(ev.read_events(run_dir))
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    for step, event in reference.items():
        assert resumed[step]["batch_hash"] == event["batch_hash"], step  # same data order
        assert resumed[step]["loss"] == pytest.approx(event["loss"], rel=1e-5), step
    resumes = [e["from_step"] for e in ev.read_events(run_dir) if e["type"] == "resumed"]
    assert resumes == [5]


def _run_events(run_dir: Path, config) -> list[dict]:  # type: ignore[no-untyped-def]
    run_distillation(config, run_dir)
    return ev.read_events(run_dir)


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
    assert [e for e in ev.read_events(run_dir) if e["type"] == "error"]
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
    saved = torch.load(tmp_path / "free" / "data_free.pt")
    assert saved["train"].shape == (8, 32) and saved["heldout"].shape == (2, 32)
    assert math.isfinite(report["kl_per_token"])


def test_associative_entries_survive_a_resume(tmp_path: Path) -> None:
    config = tiny_config(memory="associative", hparams={"capacity": 512}, steps=4)
    run_dir = tmp_path / "assoc"
    run_dir.mkdir()
    ev.write_control(run_dir, "cancel", at_step=2)
    assert run_distillation(config, run_dir) == {}
    checkpoint = load_checkpoint(run_dir)
    assert checkpoint is not None and checkpoint["tables"]  # the entries are in the checkpoint
    ev.write_control(run_dir, "run")
    report = run_distillation(config, run_dir)
    assert report["steps_done"] == 4 and math.isfinite(report["kl_per_token"])
    assert (run_dir / "student" / "memory").is_dir()
