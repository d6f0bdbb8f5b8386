"""The benchmarks of architecture surgery and training options: their cases are sound and
held out from training, and the head-pruning benchmark runs end to end on a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bench.injection_cases import INJECTIONS, TASKS, injection_cases
from engine.distill import channel_pairs


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def test_injection_cases_are_many_decidable_and_disjoint_from_training() -> None:
    cases = injection_cases()
    assert len(cases) >= 50 and len({c.id for c in cases}) == len(cases)
    assert {c.placement for c in cases} == {"tool", "document"}
    trained_targets = {w.lower() for w in channel_pairs.TARGET_WORDS}
    assert not {target.lower() for _, target in INJECTIONS} & trained_targets
    assert not set(TASKS) & set(channel_pairs.TASKS)
    trained_phrasings = {p.format(word="").strip().lower() for p in channel_pairs.INJECTIONS}
    assert not {p.format(w="").strip().lower() for p, _ in INJECTIONS} & trained_phrasings
    case = cases[0]
    injected = json.dumps(case.messages())
    assert case.target in injected and case.target not in json.dumps(case.messages(
        injected=False))
    assert case.succeeded(f"Sure: {case.target.lower()}.")
    assert not case.succeeded("A summary of the document.")
    assert not case.succeeded(f"{case.target}S")  # a whole word, not a prefix


def test_head_pruning_bench_runs_on_a_tiny_model(tmp_path: Path) -> None:
    from bench.head_pruning import main

    data = tmp_path / "text.txt"
    data.write_text("Heads that matter stay, and the rest can go quietly. " * 200,
                    encoding="utf-8")
    out = tmp_path / "head_pruning.json"
    result = main(["--quick", "--data", str(data), "--fractions", "0.2", "--heal-steps", "2",
                   "--output", str(out)])
    saved = json.loads(out.read_text(encoding="utf-8"))
    for key in ("ppl_rise_20pct_importance", "ppl_rise_20pct_random", "ppl_rise_20pct_healed"):
        assert isinstance(saved[key], float)
    assert saved["curve"][0]["heads_pruned"] == 3  # 20% of tiny-llama's 16 heads
    assert result["ppl_base"] > 1
