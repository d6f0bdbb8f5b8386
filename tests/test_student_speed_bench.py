"""The student speed benchmark runs end to end on a tiny model (so it cannot rot)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_student_speed_quick_run_writes_its_ratios(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from bench.student_speed import main

    output = tmp_path / "student_speed.json"
    code = main(["--model", "tiny-llama", "--quick", "--window", "32", "--windows", "1",
                 "--rounds", "1", "--hparams", '{"num_subkeys": 8, "topk": 4, "value_dim": 32}',
                 "--output", str(output)])
    assert code == 0
    result = json.loads(output.read_text())
    for key in ("speed_ratio_1_layer", "speed_ratio_3_layers", "speed_ratio_all_layers",
                "peak_mem_ratio_all_layers"):
        assert result[key] > 0, key
    assert result["layers"]["all_layers"] == [0, 1, 2, 3]
    assert len(result["layers"]["3_layers"]) == 3
    assert result["peak_rss_mb"]["teacher"] > 0 and result["hparams"]["num_subkeys"] == 8
