"""The memory store benchmark script runs end to end (quick mode) and writes its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_writes_all_figures(tmp_path: Path) -> None:
    out = tmp_path / "memory_store.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench/memory_store.py"),
            "--quick",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    for key in (
        "query_ratio_vs_faiss_100k",
        "query_ratio_vs_faiss_1m",
        "inserts_per_s",
        "ann_recall_at_32_1m",
        "ann_speedup_vs_exact_1m",
    ):
        assert report[key] > 0, key
    assert 0.0 < report["ann_recall_at_32_1m"] <= 1.0
    assert report["detail"]["mode"] == "quick"
