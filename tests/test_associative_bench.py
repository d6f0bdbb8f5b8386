"""The associative benchmark runs end to end on a tiny model and reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("ppl_ratio_middle", "gap_closed_middle", "ppl_ratio_late", "gap_closed_late",
        "second_read_ratio", "unrelated_ppl_change", "inserts_per_s", "entries_inserted")


def test_quick_benchmark_writes_the_top_level_figures(tmp_path: Path) -> None:
    wiki, other = tmp_path / "wiki.txt", tmp_path / "other.txt"
    wiki.write_text("The river ran past the mill and the mill wheel turned. " * 200,
                    encoding="utf-8")
    other.write_text("Spring came late to the hills that year, and the snow stayed. " * 120,
                     encoding="utf-8")
    out = tmp_path / "associative.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench/associative.py"), "--quick", "--model", "tiny-llama",
         "--middle", "1", "--late", "2", "--window", "64", "--wikitext", str(wiki),
         "--shakespeare", str(other), "--output", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text(encoding="utf-8"))
    for key in KEYS:
        assert isinstance(report[key], int | float), key
    assert report["ppl_ratio_middle"] < 1.01 and report["gap_closed_middle"] > 0.9
    assert report["second_read_ratio"] < 1.0 and report["entries_inserted"] > 0
    assert report["reading"]["table_entries"] <= report["reading"]["capacity"]
