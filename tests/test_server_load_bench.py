"""bench/server_load.py runs end to end against a real `mindset serve` (tiny-llama, short
levels) and writes the agreed keys."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_server_load_bench_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_server_load",
                                                  REPO_ROOT / "bench/server_load.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "server_load.json"
    module.main(["--model", "tiny-llama", "--clients", "1,4", "--seconds", "1.5",
                 "--tokens", "8", "--output", str(output)])
    result = json.loads(output.read_text())
    assert result["errors"] == 0
    assert result["completed"] >= 2
    assert [level["clients"] for level in result["levels"]] == [1, 4]
    assert all(level["completed"] >= 1 for level in result["levels"])
    assert result["health_p95_ms_under_load"] is not None
    assert all(level["health_samples"] > 0 for level in result["levels"])
