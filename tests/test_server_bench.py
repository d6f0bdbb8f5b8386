"""bench/server.py runs end to end (--quick, tiny-llama) and writes the agreed keys."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_server_bench_quick(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_server", REPO_ROOT / "bench/server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    output = tmp_path / "server.json"
    module.main(["--model", "tiny-llama", "--quick", "--server", "thread", "--output", str(output)])
    result = json.loads(output.read_text())
    assert result["concurrent_streams_ok"] is True
    assert result["tok_per_s_ratio"] > 0 and result["ttft_ratio"] > 0
    assert result["in_process"]["tokens"] == result["server"]["tokens"] == 16
    assert result["concurrent"]["tokens"] == [16] * 4
