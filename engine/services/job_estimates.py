"""How long a job would take on this machine, before it starts (``engine.jobs.estimate_request``).

The teacher is timed once per workbench session (:func:`engine.distill.estimate.measure_pace`,
a few seconds) on the engine's loaded teacher when the job names it, otherwise on a copy
loaded here; every estimate after that is arithmetic. The job's own process has to start
and load its teacher too, which the estimate counts as :data:`JOB_START_SECONDS` plus the
teacher's measured load time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from engine.views import JobRequest

if TYPE_CHECKING:
    from engine.distill.estimate import Pace, WorkEstimate
    from engine.model.loading import LoadedModel
    from engine.runtime import Runtime

# A job's process imports torch and transformers before it loads its teacher (measured on
# 2 cores: about 6 s).
JOB_START_SECONDS = 6.0
BYTES_PER_TOKEN = 4  # text files: a rough count of their tokens from their size


class JobEstimator:
    """Measures teachers' pace once and estimates requests with it."""

    def __init__(self, runtime: Runtime | None) -> None:
        self.runtime = runtime
        self._paces: dict[str, tuple[Pace, LoadedModel | None]] = {}
        self._lock = asyncio.Lock()

    async def _pace(self, spec: str) -> tuple[Pace, LoadedModel | None]:
        """The pace of ``spec`` (measured on first use) and the model timed, when it is the
        engine's own teacher (kept, to tell whether its sampled corpus is cached)."""
        async with self._lock:
            if spec in self._paces:
                return self._paces[spec]
            from engine.distill.estimate import measure_pace

            if self.runtime is not None and spec == self.runtime.model_spec:
                from engine.runtime import TEACHER

                started = time.perf_counter()
                already = self.runtime.model(TEACHER) is not None
                loaded = await self.runtime.load_model(TEACHER)
                load_s = 0.0 if already else time.perf_counter() - started
                run = self.runtime.in_models
            else:
                from engine.runtime import load_spec

                started = time.perf_counter()
                loaded = await asyncio.to_thread(load_spec, spec)
                load_s = time.perf_counter() - started
                run = _in_thread
            vocab = int(loaded.model.get_input_embeddings().weight.shape[0])
            pace = await run(lambda: measure_pace(loaded.model, vocab_size=vocab,
                                                  load_s=load_s))
            if load_s == 0.0:  # loaded before this session's timing: count a typical load
                pace = replace(pace, load_s=_typical_load_s(loaded))
            keep = loaded if self.runtime is not None and spec == self.runtime.model_spec else None
            self._paces[spec] = (pace, keep)
            return pace, keep

    async def estimate(self, request: JobRequest, config: Any) -> WorkEstimate:
        """Seconds by phase for ``config`` (the DistillConfig ``request`` would run)."""
        from engine.distill.estimate import estimate_run
        from engine.model.anatomy import resolve_layers
        from engine.model.loading import model_config

        pace, loaded = await self._pace(request.teacher)
        layers = len(resolve_layers(config.layers, await asyncio.to_thread(
            model_config, request.teacher)))
        data_tokens = None
        cached = False
        if config.data:
            data_tokens = await asyncio.to_thread(_text_bytes, config.data) // BYTES_PER_TOKEN
        elif loaded is not None and config.data_free_cache:
            cached = await self._corpus_cached(config, loaded)
        pace = replace(pace, load_s=pace.load_s + JOB_START_SECONDS)
        return estimate_run(config, pace, layers=layers, corpus_cached=cached,
                            data_tokens=data_tokens)

    async def _corpus_cached(self, config: Any, loaded: LoadedModel) -> bool:
        from engine.distill.corpus_cache import cached_corpus_exists
        from engine.distill.run_data import data_free_key

        assert self.runtime is not None  # only the engine's teacher is kept
        key = await self.runtime.in_models(data_free_key, config, loaded)
        return cached_corpus_exists(key)


async def _in_thread(fn: Any) -> Any:
    return await asyncio.to_thread(fn)


def _typical_load_s(loaded: LoadedModel) -> float:
    """Load time for a model loaded before the timing: about 1 s per 100M parameters (the
    default model's 135M load in about 1.5 s from its converted file, 2 cores)."""
    parameters = sum(p.numel() for p in loaded.model.parameters())
    return parameters / 1e8


def _text_bytes(paths: list[str]) -> int:
    from engine.distill.data import collect_files

    total = 0
    for file in collect_files(paths):
        try:
            total += file.stat().st_size
        except OSError:
            continue
    return total
