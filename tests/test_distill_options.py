"""Distillation options: text augmentation, forgetful causal masking, label channels; their
CLI flags and launch-form fields."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.distill import events as ev
from engine.distill.channel_stage import TRAINING
from engine.distill.config import DistillConfig
from engine.distill.data import augment_blocks, load_text_data
from engine.distill.forgetful import forgetful_mask, hidden_share
from engine.distill.job_events import JobEvent, PhaseEvent, read_events
from engine.distill.loop import Run, run_distillation
from engine.errors import InputError
from engine.model.label_channels import ATTRIBUTE, channel_settings
from engine.model.loading import load_model, load_student
from tests.test_distill_support import SAMPLE_TEXT, teacher_dir, text_file, tiny_config

CHANNEL_RUN = dict(steps=2, channels=["content", "affect"], channel_steps=20, channel_pairs=6,
                   channel_lr=1e-2, checkpoint_every=2, eval_every=100)


@functools.cache
def teacher_tokenizer() -> Any:
    return load_model(str(teacher_dir())).tokenizer


def text_data(tmp_path: Path | None = None, **options: Any) -> Any:
    return load_text_data([str(text_file())], teacher_tokenizer(), block_size=32,
                          heldout_fraction=0.1, cache_dir=tmp_path, **options)


# -- augmentation ---------------------------------------------------------------------------

def test_augmentation_noises_the_training_blocks_and_never_the_heldout(tmp_path: Path) -> None:
    tokenizer = teacher_tokenizer()
    clean = text_data(augment="typo=0")  # the same text-level split, no noise
    noised = text_data(augment="typo=0.1,homoglyph=0.05")
    assert torch.equal(noised.heldout, clean.heldout)
    assert not torch.equal(noised.train[: len(clean.train)], clean.train[: len(noised.train)])
    # The held-out blocks are untouched text; some training block holds text that is not.
    assert all(tokenizer.decode(b) in SAMPLE_TEXT for b in noised.heldout.tolist())
    assert not all(tokenizer.decode(b) in SAMPLE_TEXT for b in noised.train.tolist())
    both = text_data(augment="typo=0.1,homoglyph=0.05", augment_heldout=True)
    assert torch.equal(both.train, noised.train)
    assert not all(tokenizer.decode(b) in SAMPLE_TEXT for b in both.heldout.tolist())
    # Deterministic with the seed, cached under a key that includes the spec and the seed.
    first = text_data(tmp_path, augment="typo=0.1", seed=3)
    assert torch.equal(text_data(tmp_path, augment="typo=0.1", seed=3).train, first.train)
    assert torch.equal(text_data(None, augment="typo=0.1", seed=3).train, first.train)
    assert not torch.equal(text_data(tmp_path, augment="typo=0.2", seed=3).train, first.train)
    assert not torch.equal(text_data(tmp_path, augment="typo=0.1", seed=4).train, first.train)
    assert len(list(tmp_path.glob("*.npy"))) == 6  # train + held-out for each of three keys


def test_data_free_runs_noise_the_sampled_training_blocks(tmp_path: Path) -> None:
    from engine.distill.distributed import init_distributed
    from engine.distill.run_data import load_data_free, prepare_data

    teacher = load_model(str(teacher_dir()))
    config = tiny_config(data=[], data_free_blocks=4, heldout_blocks=2, augment="typo=0.2")
    data = prepare_data(config, teacher, tmp_path, init_distributed())
    train, heldout = load_data_free(tmp_path / "data_free.safetensors")  # kept clean
    assert torch.equal(data.heldout, heldout)
    round_trip = augment_blocks(train, teacher.tokenizer, "typo=0", seed=0, prefix="train")
    assert data.train.shape[1] == 32 and not torch.equal(data.train[:2], round_trip[:2])
    again = prepare_data(config, teacher, tmp_path, init_distributed())
    assert torch.equal(again.train, data.train)


# -- forgetful causal masking ---------------------------------------------------------------

def test_forgetful_masks_hide_earlier_tokens_at_the_rate() -> None:
    assert forgetful_mask(4, 16, 0.0, seed=0, step=0) is None
    mask = forgetful_mask(64, 128, 0.3, seed=1, step=5)
    assert mask is not None and mask.shape == (64, 128) and mask.dtype == torch.long
    assert bool((mask[:, 0] == 1).all())  # every query keeps a key
    assert hidden_share(mask) == pytest.approx(0.3, abs=0.02)
    again, later = (forgetful_mask(64, 128, 0.3, seed=1, step=s) for s in (5, 6))
    assert again is not None and later is not None
    assert torch.equal(mask, again) and not torch.equal(mask, later)  # again: a resume's
    with pytest.raises(ValueError):
        forgetful_mask(1, 4, 1.0, seed=0, step=0)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_2d_mask_removes_the_hidden_columns(family: str) -> None:
    """At a kept position the masked logits are those of the kept tokens alone, run at their
    original positions: a hidden token influences nothing."""
    from engine.model.tiny import tiny_model

    model = tiny_model(family).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = forgetful_mask(2, 24, 0.3, seed=0, step=0)
    assert mask is not None
    with torch.no_grad():
        full = model(input_ids=ids).logits
        masked = model(input_ids=ids, attention_mask=mask).logits
        for row in range(2):
            kept = mask[row].nonzero().squeeze(1)
            alone = model(input_ids=ids[row:row + 1, kept],
                          position_ids=kept.unsqueeze(0)).logits[0]
            torch.testing.assert_close(masked[row, kept], alone, atol=1e-5, rtol=1e-5)
    assert float((masked - full).abs().max()) > 1e-3


def test_only_the_students_training_forwards_are_masked(tmp_path: Path) -> None:
    teacher = load_model(str(teacher_dir()))
    calls: list[tuple[bool, bool, torch.Tensor | None]] = []

    def record(module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        calls.append((module is teacher.model, module.training, kwargs.get("attention_mask")))

    handle = teacher.model.register_forward_pre_hook(record, with_kwargs=True)  # copied too
    try:
        config = tiny_config(steps=3, forgetful_mask=0.25, eval_every=2)
        report = run_distillation(config, tmp_path / "run", teacher=teacher)
    finally:
        handle.remove()
    assert report["steps_done"] == 3
    assert all(mask is None for is_teacher, _, mask in calls if is_teacher)
    trained = [mask for is_teacher, training, mask in calls if not is_teacher and training]
    evaluated = [mask for is_teacher, training, mask in calls if not is_teacher and not training]
    assert len(trained) == 3 and evaluated and all(mask is None for mask in evaluated)
    for step, mask in enumerate(trained):  # the step's own mask: a resumed run draws it again
        expected = forgetful_mask(4, 32, 0.25, seed=0, step=step)
        assert mask is not None and expected is not None and torch.equal(mask, expected)


# -- label channels -------------------------------------------------------------------------

def test_the_channel_stage_trains_only_the_channels(tmp_path: Path) -> None:
    events: list[JobEvent] = []
    run = Run(tiny_config(**CHANNEL_RUN), tmp_path / "run", on_event=events.append)
    try:
        run.setup()
        assert run.train() == "completed"
        student = run.student
        channels = getattr(student, ATTRIBUTE)
        assert all(not p.requires_grad and not p.any() for p in channels.parameters())
        before = {name: t.clone() for name, t in student.state_dict().items()}
        probe = run.heldout[:2]
        with torch.no_grad():
            logits_before = student.eval()(input_ids=probe).logits
        assert run.train_channels() == "completed"
        after = student.state_dict()
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        assert changed == {f"{ATTRIBUTE}.content.weight", f"{ATTRIBUTE}.affect.weight"}
        assert not after[f"{ATTRIBUTE}.content.weight"][0].any()  # unlabelled tokens' row
        with torch.no_grad():  # so on unlabelled text the student is what the main stage made
            assert torch.equal(student.eval()(input_ids=probe).logits, logits_before)
        result = run.channel_report
        assert result["channel_pairs"] == 12 and result["channel_steps"] == 20
        assert result["channel_kl_after"] < 0.95 * result["channel_kl_before"], result
        progress = [e for e in events if isinstance(e, PhaseEvent) and e.phase == TRAINING]
        assert [e.done for e in progress] == list(range(1, 21))
        report = run.finish()
    finally:
        run.close()
    assert report["channel_kl_after"] == result["channel_kl_after"]
    loaded = load_student(tmp_path / "run" / "student")
    assert channel_settings(loaded) == ["content", "affect"]
    assert torch.equal(loaded.model.state_dict()[f"{ATTRIBUTE}.affect.weight"],
                       after[f"{ATTRIBUTE}.affect.weight"])


def test_a_cancelled_channel_stage_reruns_on_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    config = tiny_config(**{**CHANNEL_RUN, "channel_steps": 3, "channel_pairs": 2})

    def cancel_in_stage(event: JobEvent) -> None:
        if isinstance(event, PhaseEvent) and event.phase == TRAINING:
            ev.write_control(run_dir, "cancel")

    assert run_distillation(config, run_dir, on_event=cancel_in_stage) == {}
    assert ev.read_state(run_dir)["state"] == "cancelled"
    ev.write_control(run_dir, "run")
    report = run_distillation(config, run_dir)
    assert report["steps_done"] == 2 and report["channel_steps"] == 3
    phases = [e.done for e in read_events(run_dir) if isinstance(e, PhaseEvent)
              and e.phase == TRAINING]
    assert phases[-3:] == [1, 2, 3]  # the stage ran again from its start


@pytest.mark.parametrize(("settings", "message"), [
    ({"augment": "bogus=0.1"}, "augment: unknown transform 'bogus'"),
    ({"augment": "typo=2"}, "augment: typo=2"),
    ({"augment_heldout": True}, "augment_heldout needs an augment spec"),
    ({"augment_heldout": "yes"}, "augment_heldout='yes' must be true or false"),
    ({"forgetful_mask": 1.0}, "forgetful_mask must be within [0, 1)"),
    ({"forgetful_mask": -0.1}, "forgetful_mask must be within [0, 1)"),
    ({"channels": ["content", "mood"]}, "channels: unknown channel 'mood'"),
    ({"channels": ["affect", "affect"]}, "name a channel twice"),
    ({"channel_steps": -1}, "channel_steps must be within"),
    ({"channel_train": "memory"}, "channel_train 'memory' is not one of channels, all"),
])
def test_bad_option_values_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError) as caught:
        DistillConfig(**settings).validate()
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_settings_know_the_models_channels() -> None:
    from engine.distill.config import CHANNEL_NAMES
    from engine.model.label_channels import CHANNELS

    assert CHANNEL_NAMES == CHANNELS  # named twice so reading a config needs no torch
    DistillConfig(augment="typo=0.02", augment_heldout=True, forgetful_mask=0.5,
                  channels=["affect", "content"], channel_steps=0).validate()


# -- the command line -----------------------------------------------------------------------

BASE = ["distill", "--layers", "1", "--block-size", "32", "--batch-size", "2", "--threads", "1",
        "--hparam", "num_subkeys=16", "--hparam", "topk=4", "--hparam", "query_dim=16"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--augment", "bogus=0.1"], "unknown transform 'bogus'"),
    (["--forgetful-mask", "1.5"], "forgetful_mask must be within [0, 1)"),
    (["--forgetful-mask", "-0.2"], "forgetful_mask must be within [0, 1)"),
    (["--channels", "content,mood"], "unknown channel 'mood'"),
    (["--channels", "affect", "--channel-steps", "-3"], "-3 must not be negative"),
    (["--channels", "affect", "--channel-train", "some"], "invalid choice: 'some'"),
])
def test_the_cli_refuses_bad_values_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    from mindset.cli import run

    args = [*BASE, "--teacher", str(teacher_dir()), "--data", str(text_file()), "--steps", "1",
            "--out", str(tmp_path / "bad"), *extra]
    try:
        status = run(args)
    except SystemExit as exc:  # argparse's own checks
        status = int(exc.code or 0)
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("mindset: error: ") and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


def test_a_cli_run_with_every_option_saves_a_student_with_channels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mindset.cli import run

    out = tmp_path / "run"
    args = [*BASE, "--teacher", str(teacher_dir()), "--data", str(text_file()), "--steps", "2",
            "--augment", "typo=0.05,homoglyph=0.02", "--forgetful-mask", "0.2",
            "--channels", "content,affect", "--channel-steps", "2", "--channel-pairs", "2",
            "--channel-train", "all", "--out", str(out), "--json"]
    assert run(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps_done"] == 2 and report["channel_steps"] == 2
    assert "augmented: typo=0.05,homoglyph=0.02" in report["data"]
    saved = json.loads((out / ev.CONFIG_NAME).read_text())
    assert saved["forgetful_mask"] == 0.2 and saved["channel_train"] == "all"
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["mindset_architecture"]["channels"] == ["content", "affect"]
    assert channel_settings(load_student(out / "student")) == ["content", "affect"]


# -- the launch form ------------------------------------------------------------------------

async def test_the_launch_form_passes_the_options_and_refuses_bad_ones(tmp_path: Path) -> None:
    from textual.widgets import Checkbox, Collapsible, Input, Static

    from engine.facade import Engine
    from mindset.widgets.training_pane import TrainingPane
    from tests.test_tui_support import APP_SIZE, make_app, mounted, wait_for

    runs = tmp_path / "runs"
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=runs)
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        await pilot.press("f4")
        pane = await mounted(pilot, app, TrainingPane)
        app.query_one("#form-layers", Input).value = "1"
        app.query_one("#form-augment", Input).value = "typo=2"
        app.query_one("#form-forgetful_mask", Input).value = "0.15"
        app.query_one("#form-channel-content", Checkbox).value = True
        await pilot.press("ctrl+l")
        error = app.query_one("#form-augment-error", Static)
        await wait_for(pilot, lambda: error.display, timeout=30)
        assert "typo=2" in str(error.render())
        assert not app.query_one("#form-options", Collapsible).collapsed
        assert any("not started" in note.message for note in app._notifications)
        assert not runs.exists() or not any(runs.iterdir())  # nothing launched
        app.query_one("#form-augment", Input).value = "typo=0.02"
        request = pane._request()
        assert request is not None and request.options == {
            "augment": "typo=0.02", "forgetful_mask": 0.15, "channels": ["content"],
            "channel_steps": 200}
        assert await engine.jobs.check_request(request) == {}
        app.query_one("#form-forgetful_mask", Input).value = "1.5"
        problems = await engine.jobs.check_request(pane._request())  # type: ignore[arg-type]
        assert list(problems) == ["forgetful_mask"]
        app.query_one("#form-forgetful_mask", Input).value = "0.15"
        app.query_one("#form-channel_steps", Input).value = "-2"
        problems = await engine.jobs.check_request(pane._request())  # type: ignore[arg-type]
        assert list(problems) == ["channel_steps"]
