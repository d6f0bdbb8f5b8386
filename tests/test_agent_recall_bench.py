"""bench/agent_recall.py runs end to end on tiny models and writes the fields its issue
names (the figures themselves come from the default model; see bench/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.conftest import REPO_ROOT


def load_bench() -> object:
    spec = importlib.util.spec_from_file_location("agent_recall",
                                                  REPO_ROOT / "bench" / "agent_recall.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quick_bench_writes_every_figure(tmp_path: Path) -> None:
    bench = load_bench()
    out = tmp_path / "agent_recall.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0  # type: ignore[attr-defined]
    result = json.loads(out.read_text())
    for key in ("accuracy_memory", "accuracy_baseline", "retrieval_recall", "deferral_rate"):
        assert 0.0 <= result[key] <= 1.0
    assert result["config"]["turns"] == 40 and result["config"]["facts"] == 4
    # The baseline's window holds none of the planted facts; retrieval finds some.
    assert result["arms"]["baseline"]["retrieval_recall"] == 0.0
    assert result["retrieval_recall"] > 0.0


def test_the_script_plants_each_fact_once_in_the_first_fifth() -> None:
    bench = load_bench()
    facts = bench.FACTS[:6]  # type: ignore[attr-defined]
    lines = bench.script(60, facts, seed=3)  # type: ignore[attr-defined]
    users = [text for role, text in lines if role == "user"]
    assert len(lines) == 60
    for statement, _, answer in facts:
        assert users.count(statement) == 1 and users.index(statement) < len(users) // 5 + 1
        assert sum(answer.lower() in text.lower() for text in users) == 1
