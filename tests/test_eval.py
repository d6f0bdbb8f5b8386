"""Perplexity evaluation, checked against a direct loss computation."""

from __future__ import annotations

import math

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
    assert result.peak_rss_mb > 0


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
