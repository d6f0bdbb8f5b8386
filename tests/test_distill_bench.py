"""``bench/distill_quality.py --quick`` runs end to end on a tiny teacher."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT
from tests.test_distill_support import teacher_dir, text_file

KEYS = ["ppl_teacher", "ppl_ratio_1_layer", "ppl_ratio_3_layers", "ppl_ratio_all_layers",
        "gap_closed_1_layer", "gap_closed_3_layers", "gap_closed_all_layers",
        "control_ppl_ratio_1_layer", "control_ppl_ratio_3_layers",
        "control_ppl_ratio_all_layers", "throughput_ratio_vs_finetune", "cpu_seconds"]


def _bench_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "distill_quality", REPO_ROOT / "bench" / "distill_quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_every_key(tmp_path: Path) -> None:
    module = _bench_module()
    out = tmp_path / "distill_quality.json"
    assert module.main(["--model", str(teacher_dir()), "--data", str(text_file()), "--quick",
                        "--sets", "1_layer", "--block-size", "32", "--finetune-steps", "1",
                        "--threads", "1",
                        "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert all(key in results for key in KEYS)
    assert results["ppl_ratio_1_layer"] > 0 and results["control_ppl_ratio_1_layer"] > 0
    assert results["ppl_ratio_3_layers"] is None  # not run: reported as missing, not invented
    assert results["throughput_ratio_vs_finetune"] > 0
    assert set(results["cpu_seconds"]) == {"1_layer_featural", "1_layer_dense", "total"}
    student = results["runs"]["1_layer_featural"]["student"]["mindset_student.json"]
    assert student["layers"] == [2] and student["kind"] == "featural"
    kept = tmp_path / "distill_quality_students" / "1_layer"
    assert json.loads((kept / "mindset_student.json").read_text()) == student
    assert json.loads((kept / "config.json").read_text())["num_hidden_layers"] > 0
    assert results["complete"] is True


def _committed_results() -> dict[str, bytes]:
    results = REPO_ROOT / "bench" / "results"
    files = [results / "distill_quality.json",
             *sorted((results / "distill_quality_students").rglob("*.json"))]
    return {str(path): path.read_bytes() for path in files if path.is_file()}


def test_a_quick_run_without_out_never_touches_committed_results(tmp_path: Path) -> None:
    module = _bench_module()
    before = _committed_results()
    assert before  # the committed figures exist
    assert module.main(["--model", str(teacher_dir()), "--data", str(text_file()), "--quick",
                        "--sets", "1_layer", "--block-size", "32", "--finetune-steps", "1",
                        "--threads", "1", "--runs-dir", str(tmp_path / "runs")]) == 0
    assert _committed_results() == before
