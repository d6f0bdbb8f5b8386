"""The newcomer benchmarks run end to end on tiny-llama (--quick) and leave the committed
results alone: the first-ten-minutes flow (offer with its estimate, quick start, Memory,
Chat) and the quick-start recipe sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def committed() -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in RESULTS.rglob("*") if path.is_file()}


def run_bench(script: str, out: Path, home: Path) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=420,
                          cwd=ROOT, env={**os.environ, "MINDSET_HOME": str(home)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text(encoding="utf-8"))


def test_the_first_ten_minutes_flow_runs_from_an_empty_data_directory(tmp_path: Path) -> None:
    before = committed()
    report = run_bench("first_ten_minutes.py", tmp_path / "flow.json", tmp_path / "home")
    assert set(report["steps_s"]) == {"start_to_offer_with_estimate", "quick_start",
                                      "memory_pane", "chat_reply"}
    assert "on this machine" in report["welcome_estimate"]
    assert "neurons become slots" in report["welcome_result"]
    phases = report["job_phases_s"]
    assert next(iter(phases)) == "loading the teacher" and "training and evaluation" in phases
    assert "gap closed" in report["summary"] and report["report"]["ppl_ratio"] > 0
    assert report["memory_table"].endswith("_featural") and report["reply"]
    assert committed() == before


def test_the_recipe_sweep_compares_every_variant_on_one_corpus(tmp_path: Path) -> None:
    before = committed()
    report = run_bench("quick_start_recipes.py", tmp_path / "recipes.json", tmp_path / "home")
    rows = report["rows"]
    assert [(row["read"], row["training"]) for row in rows][-2:] == [
        ("20/24", "quick start"), ("24/24", "closed form")]
    exact = rows[-1]
    assert abs(exact["ppl_ratio"] - 1.0) < 1e-3  # every group read: the MLP itself
    assert len({row["ppl_teacher"] for row in rows}) == 1  # one held-out text for all
    cached = list((tmp_path / "home" / "cache" / "data_free").glob("*.safetensors"))
    assert len(cached) == 1  # sampled once, reused by every later variant
    assert committed() == before


def test_the_welcome_screens_figure_is_the_committed_measurement_of_these_settings() -> None:
    """QUICK_START_RATIO, which the welcome screen shows, is what the committed
    first-ten-minutes run measured, and that run used the quick start's current settings: a
    change to either without measuring again fails here."""
    from engine.services.jobs import (
        QUICK_START_LR,
        QUICK_START_OPTIONS,
        QUICK_START_RATIO,
        QUICK_START_STEPS,
    )

    measured = json.loads((RESULTS / "first_ten_minutes.json").read_text(encoding="utf-8"))
    assert measured["model"] == "default"
    settings = {"steps": QUICK_START_STEPS, "lr": QUICK_START_LR, **QUICK_START_OPTIONS}
    assert measured["quick_start_settings"] == json.loads(json.dumps(settings))
    assert round(measured["report"]["ppl_ratio"], 4) == QUICK_START_RATIO
