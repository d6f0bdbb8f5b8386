"""The training data of a run: its text files, or a corpus sampled from the teacher once.

A data-free run samples its corpus on rank 0, keeps it in the run directory
(``data_free.safetensors``, read back without unpickling) so a resumed run trains on the same
text, and reports the sampling's progress as a phase. Augmentation of the training text
(``DistillConfig.augment``) is applied here: by :func:`engine.distill.data.load_text_data` for
text files, on the loaded sample for data-free runs (the saved sample stays clean: the noise
is a pure function of the seed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.distill.config import DistillConfig
from engine.distill.corpus_cache import load_data_free, save_blocks
from engine.distill.data import TokenData, augment_sampled, data_free, load_text_data
from engine.distill.distributed import DistContext

DATA_FREE_NAME = "data_free.safetensors"


def prepare_data(config: DistillConfig, teacher: Any, run_dir: Path, ctx: DistContext,
                 phase: PhaseReporter | None = None) -> TokenData:
    report = phase or (lambda *_args, **_kwargs: None)
    if config.data:
        report("reading the training text")
        from engine.paths import data_dir

        cache = data_dir() / "cache" / "tokens"
        return load_text_data(config.data, teacher.tokenizer, block_size=config.block_size,
                              heldout_fraction=config.heldout_fraction, cache_dir=cache,
                              augment=config.augment, augment_heldout=config.augment_heldout,
                              seed=config.seed)
    # Data-free: sample once, keep the sample in the run directory so a resume reuses it.
    path = run_dir / DATA_FREE_NAME
    if ctx.is_main and not path.exists():
        save_blocks(path, *sample_or_reuse(config, teacher, report))
    if ctx.enabled:
        dist.barrier()
    train, heldout = load_data_free(path)
    data = TokenData(train=train, heldout=heldout, source="sampled from the teacher")
    if config.augment.strip():  # the saved sample stays clean; the noise is a pure function
        data = augment_sampled(data, teacher.tokenizer, config.augment, seed=config.seed,
                               augment_heldout=config.augment_heldout)
    return data


PhaseReporter = Callable[..., None]  # (phase, done=0, total=0, unit="", eta_s=None)
SAMPLING = "sampling training text from the teacher"
REUSING = "reusing the training text this teacher sampled before"


def data_free_key(config: DistillConfig, teacher: Any) -> str:
    """The corpus cache key of ``config``'s data-free text for ``teacher``."""
    from engine.distill.corpus_cache import corpus_key
    from engine.distill.data import SAMPLE_BATCH, separator_id

    start = separator_id(teacher.tokenizer)
    return corpus_key(teacher.model, start_token=0 if start is None else start,
                      blocks=config.data_free_blocks, heldout_blocks=config.heldout_blocks,
                      block_size=config.block_size, seed=config.seed, batch=SAMPLE_BATCH)


def sample_or_reuse(config: DistillConfig, teacher: Any,
                    report: PhaseReporter) -> tuple[torch.Tensor, torch.Tensor]:
    """The data-free corpus: from the cache when this teacher sampled it before with the same
    settings (:mod:`engine.distill.corpus_cache`), else sampled now, then cached."""
    from engine.distill.corpus_cache import read_cached, write_cached

    key = data_free_key(config, teacher) if config.data_free_cache else ""
    cached = read_cached(key) if key else None
    if cached is not None:
        report(REUSING)
        return cached
    total = config.data_free_blocks + config.heldout_blocks
    progress = SamplingProgress(total, report)
    progress.start()
    sampled = data_free(teacher.model, teacher.tokenizer, blocks=config.data_free_blocks,
                        heldout_blocks=config.heldout_blocks, block_size=config.block_size,
                        seed=config.seed, on_blocks=progress.advance)
    if key:
        write_cached(key, sampled.train, sampled.heldout)
    return sampled.train, sampled.heldout


class SamplingProgress:
    """Blocks sampled so far and an ETA from their pace, reported after each batch."""

    def __init__(self, total: int, report: PhaseReporter) -> None:
        self.total, self.report, self.done = total, report, 0
        self.started = time.perf_counter()

    def start(self) -> None:
        self.report(SAMPLING, 0, self.total, "blocks")

    def advance(self, count: int) -> None:
        self.done += count
        pace = (time.perf_counter() - self.started) / max(self.done, 1)
        self.report(SAMPLING, self.done, self.total, "blocks", pace * (self.total - self.done))
