"""Perplexity, speed and peak memory of a causal LM on a text file.

:func:`perplexity` reports the process's lifetime peak resident memory; ``mindset eval``
replaces it with the peaks that :class:`engine.process_memory.PeakMemory` sampled over the
model's loading and the evaluation, resident and anonymous (the part not backed by a file).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from engine.errors import InputError
from engine.process_memory import lifetime_peak_rss_mb

MIN_WINDOW = 2
MAX_TOKENS = 100_000_000
MAX_LOG_PPL = 700.0  # math.exp overflows past about 709: report such a model as inf


@dataclass
class EvalResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # tokens read from the text (N)
    predicted: int  # tokens scored (each window predicts W - 1)
    windows: int
    window: int
    seconds: float
    tok_per_s: float
    peak_rss_mb: float | None  # MiB; None where the platform does not say
    peak_anon_mb: float | None = None  # MiB of anonymous (not file-backed) memory, if known
    entries_added: int | None = None  # reading mode (learn=True): entries written
    learn_seconds: float | None = None  # reading mode: time spent writing them

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_rss_mb() -> float | None:
    """The process's peak resident memory so far, in MiB (None where unknown)."""
    return lifetime_peak_rss_mb()


def validate_window(tokens: int | None, window: int, max_positions: int | None) -> None:
    if window < MIN_WINDOW:
        raise InputError(f"--window {window} is too small; give at least {MIN_WINDOW} tokens")
    if max_positions is not None and window > max_positions:
        raise InputError(
            f"--window {window} exceeds the model's context of {max_positions} tokens; "
            "give a smaller window"
        )
    if tokens is not None and not (MIN_WINDOW <= tokens <= MAX_TOKENS):
        raise InputError(f"--tokens {tokens} is out of range; give {MIN_WINDOW}..{MAX_TOKENS}")


def model_context(model: Any) -> int | None:
    config = model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def tokenize(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def perplexity(
    model: Any,
    tokenizer: Any,
    text: str,
    *,
    tokens: int | None = None,
    window: int = 512,
    learn: bool = False,
    on_window: Callable[[int, int], None] | None = None,
    affect: tuple[float, float] | None = None,
) -> EvalResult:
    """Perplexity over non-overlapping windows of ``window`` tokens of the first ``tokens``.

    Each window is scored on its own (no context carried over), predicting its W - 1 tokens
    after the first; a trailing window shorter than two tokens is dropped.

    ``learn``: reading mode. After each window is scored, the model's associative layers
    read it (:mod:`engine.model.reading`), so later windows, and a second pass, can recall
    it; the entries stay in the model's memory (not saved by this function).
    ``on_window(tokens, total)`` is called after each window (progress displays).
    ``affect``: (arousal, valence) for every token, for a model with an affect label channel
    (:mod:`engine.model.label_channels`; content labels are 0).
    """
    from contextlib import nullcontext

    import torch

    validate_window(tokens, window, model_context(model))
    if affect is not None:
        from engine.model.label_channels import channel_settings, check_labels, labelled

        check_labels(channel_settings(model) or [], affect=affect)
    if learn:
        from engine.model.reading import read_chunk, require_reading_layers

        require_reading_layers(model)
    ids = tokenize(tokenizer, text)
    if tokens is not None:
        ids = ids[:tokens]
    if len(ids) < MIN_WINDOW:
        raise InputError(f"the text has only {len(ids)} token(s); give a longer text")
    chunks = [ids[i : i + window] for i in range(0, len(ids), window)]
    chunks = [chunk for chunk in chunks if len(chunk) >= MIN_WINDOW]

    total_nll = 0.0
    predicted = 0
    added, learn_seconds = 0, 0.0
    start = time.perf_counter()
    for chunk in chunks:
        labels = nullcontext() if affect is None else labelled(model,
                                                              affect=torch.tensor(affect))
        with torch.inference_mode(), labels:
            input_ids = torch.tensor([chunk], dtype=torch.long)
            logits = model(input_ids=input_ids).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[0, :-1], input_ids[0, 1:], reduction="sum"
            )
        total_nll += float(loss)
        predicted += len(chunk) - 1
        if learn:
            report = read_chunk(model, tokenizer, chunk)
            added += report.entries_added
            learn_seconds += report.seconds
        if on_window is not None:
            on_window(len(chunk), len(ids))
    seconds = time.perf_counter() - start
    nll = total_nll / predicted
    if not math.isfinite(nll):
        raise InputError(f"the model's loss is {nll} on this text: its weights hold NaN or "
                         "infinite values; re-convert or re-train it")
    return EvalResult(
        ppl=math.exp(nll) if nll < MAX_LOG_PPL else math.inf,
        nll=nll,
        tokens=len(ids),
        predicted=predicted,
        windows=len(chunks),
        window=window,
        seconds=seconds,
        tok_per_s=len(ids) / seconds if seconds > 0 else float("inf"),
        peak_rss_mb=peak_rss_mb(),
        entries_added=added if learn else None,
        learn_seconds=learn_seconds if learn else None,
    )
