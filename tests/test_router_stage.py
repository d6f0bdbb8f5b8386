"""The router stage of routed memories inside a real distillation run (tiny model), and the
student_pareto benchmark's quick run on a fresh checkout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.distill.config import DistillConfig
from engine.distill.events import write_control
from engine.distill.job_events import StepEvent, read_events
from engine.distill.loop import run_distillation
from engine.errors import InputError
from tests.conftest import REPO_ROOT

TEXT = "The quick brown fox jumps over the lazy dog while the cat sleeps. " * 120


def _config(tmp_path: Path, **overrides: object) -> DistillConfig:
    data = tmp_path / "text.txt"
    data.write_text(TEXT, encoding="utf-8")
    settings: dict = dict(
        teacher="tiny-llama", layers="all", memory="featural",
        hparams={"keys": "routed", "group_size": 8, "read_share": 0.25}, data=[str(data)],
        router_steps=12, router_lr=1e-2, local_steps=4, local_tokens=1024,
        local_batch_tokens=256, steps=2, block_size=64, batch_size=2, eval_every=1000,
        checkpoint_every=1000, threads=1)
    settings.update(overrides)
    return DistillConfig(**settings)


def test_router_stage_runs_first_and_reports_recall(tmp_path: Path) -> None:
    config = _config(tmp_path)
    report = run_distillation(config, tmp_path / "run", resume=False)
    steps = [e for e in read_events(tmp_path / "run") if isinstance(e, StepEvent)]
    assert [e.stage for e in steps] == ["router"] * 12 + ["local"] * 4 + ["e2e"] * 2
    recalls = [e.router_recall for e in steps if e.stage == "router"]
    assert all(r is not None and 0.0 < r <= 1.0 for r in recalls)
    assert all(e.router_recall is None for e in steps if e.stage != "router")
    router_losses = [e.loss for e in steps if e.stage == "router"]
    assert min(router_losses[-3:]) < router_losses[0]  # the router learns its target
    assert report["total_steps"] == 18 and (tmp_path / "run" / "student").is_dir()


def test_router_stage_resumes_to_the_same_losses(tmp_path: Path) -> None:
    """Cancelled inside the router stage (a checkpoint at step 6), resumed: the steps after
    the checkpoint see the same batches and give the same losses as an uninterrupted run."""
    whole = _config(tmp_path, checkpoint_every=6)
    run_distillation(whole, tmp_path / "whole", resume=False)
    expected = {e.step: (e.loss, e.batch_hash) for e in read_events(tmp_path / "whole")
                if isinstance(e, StepEvent)}
    first = _config(tmp_path, checkpoint_every=6)
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    write_control(run_dir, "cancel", at_step=6)
    assert run_distillation(first, run_dir, resume=False) == {}  # cancelled, checkpointed
    write_control(run_dir, "run")
    run_distillation(first, run_dir, resume=True)
    resumed = {e.step: (e.loss, e.batch_hash) for e in read_events(run_dir)
               if isinstance(e, StepEvent)}
    for step in range(7, 19):
        assert resumed[step][1] == expected[step][1]
        assert resumed[step][0] == pytest.approx(expected[step][0], rel=1e-4, abs=1e-6)


def test_router_steps_need_a_routed_memory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="routed memories only"):
        _config(tmp_path, hparams={"keys": "flat"}).validate()
    with pytest.raises(InputError, match="router_lr"):
        _config(tmp_path, router_lr=0.0).validate()


def test_student_pareto_quick_run(tmp_path: Path) -> None:
    """The benchmark runs on a fresh checkout and writes every top-level figure, never under
    bench/results when given --out."""
    wiki, ood = tmp_path / "wiki.txt", tmp_path / "ood.txt"
    wiki.write_text(TEXT * 3, encoding="utf-8")
    ood.write_text("To be, or not to be, that is the question. " * 300, encoding="utf-8")
    out = tmp_path / "pareto.json"
    results = REPO_ROOT / "bench" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    subprocess.run([sys.executable, "bench/student_pareto.py", "--model", "tiny-llama",
                    "--data", str(wiki), "--ood", str(ood), "--quick", "--threads", "1",
                    "--sets", "1_layer,all_layers", "--out", str(out),
                    "--runs-dir", str(tmp_path / "runs")],
                   cwd=REPO_ROOT, check=True, capture_output=True, timeout=600)
    data = json.loads(out.read_text())
    for key in ("ppl_ratio_wikitext_1_layer", "ppl_ratio_shakespeare_all_layers",
                "prefill_speed_ratio_all_layers", "generate_speed_ratio_all_layers",
                "anon_mem_ratio_all_layers", "mlp_cost_share", "cpu_seconds"):
        assert key in data, key
    assert [row["read_share"] for row in data["curve_all_layers"]][-1] == 1.0
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    assert after == before


def test_the_quick_start_recipe_runs_end_to_end(tmp_path: Path) -> None:
    """The workbench's quick start (routed recipe at 20 of 24 groups, data-free) on
    tiny-llama: the closed-form router and slots, then end-to-end steps only; a student
    directory comes out."""
    from engine.services.jobs import QUICK_START_LR, QUICK_START_OPTIONS, QUICK_START_STEPS

    options = dict(QUICK_START_OPTIONS)
    options["hparams"] = {**options["hparams"], "group_size": 8}  # tiny MLPs: 128 neurons
    config = DistillConfig(teacher="tiny-llama", layers="middle", memory="featural",
                           steps=QUICK_START_STEPS, lr=QUICK_START_LR, threads=1, **options)
    report = run_distillation(config, tmp_path / "quick", resume=False)
    stages = {e.stage for e in read_events(tmp_path / "quick") if isinstance(e, StepEvent)}
    assert stages == {"e2e"}
    assert report["steps_done"] == config.total_steps
    assert (tmp_path / "quick" / "student" / "mindset_student.json").is_file()
