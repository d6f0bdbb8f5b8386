"""A run says what it does before training (loading, sampling with a count and an ETA,
building), and a cancel or a pause is honoured in those phases too, not only between steps."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from engine.distill import events as ev
from engine.distill.job_events import PhaseEvent, StateEvent, StepEvent
from engine.distill.loop import SAMPLING, run_distillation
from tests.test_distill_support import tiny_config

# Sampled afresh each time: these tests watch the sampling phase (a cached corpus skips it).
DATA_FREE = dict(data=[], data_free_blocks=16, heldout_blocks=2, steps=2, data_free_cache=False)


def run(tmp_path: Path, react: Any = None) -> tuple[dict[str, Any], list[Any]]:
    seen: list[Any] = []

    def on_event(event: Any) -> None:
        seen.append(event)
        if react is not None:
            react(event, tmp_path / "run")

    report = run_distillation(tiny_config(**DATA_FREE), tmp_path / "run", on_event=on_event)
    return report, seen


def sampled(event: Any) -> bool:
    return isinstance(event, PhaseEvent) and event.phase == SAMPLING and event.done > 0


def test_phases_before_training_are_reported_with_counts(tmp_path: Path) -> None:
    report, seen = run(tmp_path)
    assert report["state"] == "completed"
    phases = [e.phase for e in seen if isinstance(e, PhaseEvent)]
    assert phases[0] == "loading the teacher" and "building the student" in phases
    counts = [(e.done, e.total) for e in seen if isinstance(e, PhaseEvent) and e.phase == SAMPLING]
    assert counts[0] == (0, 18) and counts[-1] == (18, 18)
    assert all(e.eta_s is not None and e.eta_s >= 0 for e in seen if sampled(e))
    first_step = next(i for i, e in enumerate(seen) if isinstance(e, StepEvent))
    assert all(not isinstance(e, PhaseEvent) for e in seen[first_step:])


def test_a_cancel_while_sampling_stops_the_run_before_training(tmp_path: Path) -> None:
    def cancel(event: Any, run_dir: Path) -> None:
        if sampled(event):
            ev.write_control(run_dir, "cancel")

    report, seen = run(tmp_path, cancel)
    assert report == {}
    assert not any(isinstance(e, StepEvent) for e in seen)
    assert sum(1 for e in seen if sampled(e)) == 1  # stopped at the first batch's report
    assert [e.state for e in seen if isinstance(e, StateEvent)] == ["starting", "cancelled"]
    assert ev.read_state(tmp_path / "run")["state"] == "cancelled"


def test_sigterm_while_sampling_cancels_cleanly(tmp_path: Path) -> None:
    def terminate(event: Any, _run_dir: Path) -> None:
        if sampled(event):
            os.kill(os.getpid(), signal.SIGTERM)  # the run's handler turns it into a cancel

    report, seen = run(tmp_path, terminate)
    assert report == {} and not any(isinstance(e, StepEvent) for e in seen)
    assert seen[-1] == StateEvent(state="cancelled", step=0, time=seen[-1].time)


def test_a_pause_while_sampling_waits_then_goes_on(tmp_path: Path) -> None:
    paused = threading.Event()

    def pause(event: Any, run_dir: Path) -> None:
        if sampled(event) and not paused.is_set():
            paused.set()
            ev.write_control(run_dir, "pause")
            threading.Timer(0.5, ev.write_control, (run_dir, "run")).start()

    report, seen = run(tmp_path, pause)
    assert report["state"] == "completed"
    states = [e.state for e in seen if isinstance(e, StateEvent)]
    assert states[:3] == ["starting", "paused", "starting"]  # resumed: still before training
    assert "running" in states and states[-1] == "completed"


def test_a_second_data_free_run_reuses_the_cached_corpus(tmp_path: Path,
                                                         monkeypatch: Any) -> None:
    from engine.distill.corpus_cache import CACHE_SUBDIR
    from engine.distill.run_data import REUSING
    from engine.distill.run_data import load_data_free as read_blocks

    monkeypatch.setenv("MINDSET_HOME", str(tmp_path / "home"))
    settings = {**DATA_FREE, "data_free_cache": True, "seed": 5}
    runs = []
    for name in ("first", "second"):
        seen: list[Any] = []
        report = run_distillation(tiny_config(**settings), tmp_path / name,
                                  on_event=seen.append)
        assert report["state"] == "completed"
        runs.append([e.phase for e in seen if isinstance(e, PhaseEvent)])
    assert SAMPLING in runs[0] and REUSING not in runs[0]
    assert REUSING in runs[1] and SAMPLING not in runs[1]  # not sampled again
    cached = list((tmp_path / "home").joinpath(*CACHE_SUBDIR).glob("*.safetensors"))
    assert len(cached) == 1
    first, second = (read_blocks(tmp_path / name / "data_free.safetensors")
                     for name in ("first", "second"))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_the_corpus_key_follows_the_teacher_and_the_settings() -> None:
    from engine.distill.corpus_cache import corpus_key
    from engine.model.loading import load_model

    model = load_model("tiny-llama").model
    settings = dict(start_token=0, blocks=16, heldout_blocks=2, block_size=32, seed=0, batch=32)
    key = corpus_key(model, **settings)
    assert corpus_key(model, **settings) == key
    assert corpus_key(model, **{**settings, "seed": 1}) != key
    assert corpus_key(model, **{**settings, "blocks": 17}) != key
    with torch.no_grad():
        next(model.parameters()).reshape(-1)[0] += 1.0  # an edited teacher writes other text
    assert corpus_key(model, **settings) != key


def test_an_unreadable_cached_corpus_is_sampled_again(tmp_path: Path, monkeypatch: Any) -> None:
    from engine.distill.corpus_cache import cache_path, read_cached

    monkeypatch.setenv("MINDSET_HOME", str(tmp_path))
    path = cache_path("0" * 32)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    assert read_cached("0" * 32) is None
    assert not path.exists()  # removed, so the next run writes a good one
