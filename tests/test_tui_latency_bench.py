"""``bench/tui_latency.py`` runs end to end on a tiny teacher (a smoke test: its timings are
never asserted), and more presses than a page has rows (50) still find a repaint each time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_the_latency_benchmark_runs_and_writes_where_told(tmp_path: Path) -> None:
    out = tmp_path / "tui_latency.json"
    committed = REPO_ROOT / "bench" / "results" / "tui_latency.json"
    before = committed.read_bytes() if committed.exists() else None
    result = subprocess.run(
        [sys.executable, "bench/tui_latency.py", "--presses", "56", "--cold-starts", "1",
         "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert len(figures["first_frame_runs_s"]) == 1
    assert figures["keypress_idle"]["p50_ms"] > 0 and figures["tab_switch_idle"]["p50_ms"] > 0
    assert (committed.read_bytes() if committed.exists() else None) == before
