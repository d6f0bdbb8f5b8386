"""Time estimates before a job starts: the arithmetic on a fixed pace, the timing on a real
tiny teacher, the corpus cache seen by the estimate, and the form's warning for hours."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from textual.widgets import Input

from engine.distill.config import DistillConfig
from engine.distill.estimate import Pace, estimate_run, format_duration, measure_pace
from engine.facade import Engine
from engine.services.jobs import QUICK_START_LR, QUICK_START_OPTIONS, QUICK_START_STEPS
from mindset.widgets.training_pane import TrainingPane
from tests.test_tui_support import APP_SIZE, make_app, mounted, wait_for

# The default model's pace on 2 cores, as measured_pace gave it (fixed: no timing here).
DEFAULT_PACE = Pace(forward_s_per_token=1.4e-3, sample_step_s=0.09,
                    sample_step_per_sequence_s=3e-3, load_s=8.0)


def quick_start_config() -> DistillConfig:
    return DistillConfig(teacher="default", layers="15", memory="featural", data=[],
                         steps=QUICK_START_STEPS, lr=QUICK_START_LR, **QUICK_START_OPTIONS)  # type: ignore[arg-type]


def test_the_quick_start_is_minutes_and_the_form_default_data_free_job_is_not() -> None:
    quick = estimate_run(quick_start_config(), DEFAULT_PACE, layers=1)
    assert 60 < quick.total_s < 300
    names = [name for name, _ in quick.parts]
    assert names[:2] == ["loading the teacher", "sampling training text"]
    assert {"building the student", "end-to-end steps", "evaluation"} <= set(names)
    # The form's defaults, data-free: 256 sampled blocks of 256 tokens and 200 steps of 8.
    form = DistillConfig(teacher="default", layers="15", data=[], steps=200, eval_every=40)
    slow = estimate_run(form, DEFAULT_PACE, layers=1)
    assert slow.total_s > 5 * quick.total_s
    # 8 batches of 32 training blocks, then one of 16 held-out ones, 255 steps each.
    assert math.isclose(slow.part("sampling training text"),
                        255 * (8 * (0.09 + 32 * 3e-3) + (0.09 + 16 * 3e-3)))


def test_a_cached_corpus_costs_no_sampling_and_a_data_file_none_at_all() -> None:
    config = quick_start_config()
    fresh = estimate_run(config, DEFAULT_PACE, layers=1)
    cached = estimate_run(config, DEFAULT_PACE, layers=1, corpus_cached=True)
    assert cached.part("sampling training text") == 0 and cached.corpus_cached
    assert math.isclose(fresh.total_s - cached.total_s, fresh.part("sampling training text"))
    with_data = estimate_run(config, DEFAULT_PACE, layers=1, data_tokens=10_000)
    assert "sampling training text" not in [name for name, _ in with_data.parts]


def test_steps_and_layers_scale_their_stages() -> None:
    config = quick_start_config()
    config.local_steps, config.local_tokens, config.router_steps = 120, 2048, 40
    one = estimate_run(config, DEFAULT_PACE, layers=1)
    three = estimate_run(config, DEFAULT_PACE, layers=3)
    assert math.isclose(three.part("layer-local stage"), 3 * one.part("layer-local stage"))
    config.steps *= 10
    longer = estimate_run(config, DEFAULT_PACE, layers=1)
    assert math.isclose(longer.part("end-to-end steps"), 10 * one.part("end-to-end steps"))


def test_durations_read_as_people_say_them() -> None:
    assert format_duration(42) == "about 40 s"
    assert format_duration(230) == "about 4 min"
    assert format_duration(150) == "about 2 min 30 s"
    assert format_duration(1500) == "about 25 min"
    assert format_duration(7800) == "about 2 h 10 min"
    assert format_duration(7200) == "about 2 h"


def test_the_pace_of_a_real_tiny_teacher_is_measured() -> None:
    from engine.model.loading import load_model

    loaded = load_model("tiny-llama")
    vocab = int(loaded.model.get_input_embeddings().weight.shape[0])
    pace = measure_pace(loaded.model, vocab_size=vocab)
    assert 0 < pace.forward_s_per_token < 1 and 0 < pace.sample_step_s < 1
    assert pace.sample_step_per_sequence_s >= 0
    # Sampling more sequences at once costs more per step, but less per sequence.
    assert pace.sampling_s(32, 64, 32) < pace.sampling_s(32, 64, 8)


async def test_the_estimate_sees_the_cached_corpus_of_the_engines_teacher(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.distill.corpus_cache import cache_path, write_cached
    from engine.distill.run_data import data_free_key

    monkeypatch.setenv("MINDSET_HOME", str(tmp_path / "home"))  # no corpus cached yet

    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "runs")
    try:
        request = engine.jobs.quick_start_request()
        first = await engine.jobs.estimate_request(request)
        assert not first.corpus_cached and first.part("sampling training text") > 0
        config = engine.jobs._config(request, "middle")
        key = data_free_key(config, await engine.load_model())
        import torch

        write_cached(key, torch.zeros(2, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
        try:
            second = await engine.jobs.estimate_request(request)
            assert second.corpus_cached and second.part("sampling training text") == 0
        finally:
            cache_path(key).unlink()
    finally:
        await engine.close()


async def test_the_form_warns_when_its_settings_take_hours(tmp_path: Path) -> None:
    engine = Engine("tiny-llama", database=tmp_path / "m.db", runs_root=tmp_path / "runs")
    app = make_app(engine)
    async with app.run_test(size=APP_SIZE) as pilot:
        await pilot.press("f4")
        await mounted(pilot, app, TrainingPane)
        line = app.query_one("#form-estimate")
        assert not line.display  # nothing until a setting changes
        # The first change is to a field composed empty: it counts as an edit too.
        readme = Path(__file__).resolve().parents[1] / "README.md"
        app.query_one("#form-data", Input).value = str(readme)
        await wait_for(pilot, lambda: "estimated time on this machine" in str(line.render()),
                       timeout=60)
        app.query_one("#form-data", Input).value = ""
        app.query_one("#form-steps", Input).value = "20"
        await wait_for(pilot, lambda: "estimated time on this machine" in str(line.render()),
                       timeout=60)
        assert not line.has_class("estimate-warning")
        app.query_one("#form-steps", Input).value = "100000000"
        await wait_for(pilot, lambda: "would take" in str(line.render()), timeout=60)
        assert line.has_class("estimate-warning") and " h" in str(line.render())
        assert "end-to-end steps" in str(line.render())  # where the time goes
        app.query_one("#form-layers", Input).value = "99"  # wrong: no estimate
        await wait_for(pilot, lambda: not line.display, timeout=30)
        assert not engine.jobs._job_runner().jobs()  # nothing was started
