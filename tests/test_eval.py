"""Perplexity evaluation, checked against a direct loss computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.errors import InputError
from engine.evaluation import perplexity
from engine.model.loading import load_model

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.mark.parametrize("spec", ["tiny-gpt2", "tiny-llama"])
def test_perplexity_matches_the_models_own_loss(spec: str) -> None:
    loaded = load_model(spec)
    window, tokens = 128, 1000
    result = perplexity(loaded.model, loaded.tokenizer, TEXT, tokens=tokens, window=window)

    ids = loaded.tokenizer(TEXT, add_special_tokens=False)["input_ids"][:tokens]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), window):
            chunk = torch.tensor([ids[start : start + window]])
            if chunk.shape[1] < 2:
                continue
            # Hugging Face's own shifted mean cross-entropy over the window.
            loss = loaded.model(input_ids=chunk, labels=chunk).loss
            total += float(loss) * (chunk.shape[1] - 1)
            count += chunk.shape[1] - 1

    assert result.tokens == tokens
    assert result.predicted == count
    assert result.windows == math.ceil(tokens / window)
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)
    assert result.tok_per_s > 0
    assert result.peak_rss_mb is not None and result.peak_rss_mb > 0


def test_a_trailing_single_token_window_is_dropped() -> None:
    loaded = load_model("tiny-gpt2")
    result = perplexity(loaded.model, loaded.tokenizer, TEXT, tokens=129, window=128)
    assert result.windows == 1
    assert result.predicted == 127


def test_window_beyond_the_context_is_refused() -> None:
    loaded = load_model("tiny-gpt2")
    with pytest.raises(InputError, match="exceeds the model's context"):
        perplexity(loaded.model, loaded.tokenizer, TEXT, window=100_000)


def test_text_too_short_is_refused() -> None:
    loaded = load_model("tiny-gpt2")
    with pytest.raises(InputError, match="only 1 token"):
        perplexity(loaded.model, loaded.tokenizer, "a", window=16)


def test_mindset_eval_reports_peak_resident_and_anonymous_memory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mindset.cli import run

    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    args = ["eval", "--model", "tiny-llama", "--data", str(text), "--tokens", "300",
            "--window", "100"]
    assert run([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 300
    assert report["peak_rss_mb"] > 0
    if Path("/proc/self/status").exists():
        assert 0 < report["peak_anon_mb"] <= report["peak_rss_mb"]
    else:
        assert "peak_anon_mb" in report
    assert run(args) == 0
    assert "peak memory " in capsys.readouterr().out
