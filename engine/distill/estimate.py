"""How long a distillation run will take on this machine, from a few seconds of timing.

:func:`measure_pace` times the loaded teacher: one forward pass over a block of tokens
(seconds per token of a full forward) and a few sampling steps of ``generate`` at two batch
sizes (a step's fixed cost and its cost per sequence: on CPU the fixed part dominates, so the
sampler's batch size matters). :func:`estimate_run` turns a run's settings into seconds per
phase with those two figures and fixed ratios, read off the default model's quick-start job
events on 2 cores (seconds per step and per phase against the timed forward pass):

- an end-to-end step costs 2.5 forward-token times per training token (the teacher's
  forward, the student's forward and its backward);
- a layer-local step costs 0.14 of a forward-token time per row and replaced layer, a router
  step 0.05;
- building a routed student reads 4,096 calibration tokens and clusters their neurons
  (about one second a layer);
- every evaluation runs the teacher and the student over the held-out blocks.

The result is an estimate, good to within about a third in our runs; it is meant to tell
minutes from hours before a job starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

E2E_FORWARDS_PER_TOKEN = 2.5
LOCAL_FORWARDS_PER_ROW = 0.14
ROUTER_FORWARDS_PER_ROW = 0.05
ROUTED_CALIBRATION_TOKENS = 4096
CLUSTER_SECONDS_PER_LAYER = 1.0
SAVE_SECONDS = 3.0
PACE_BLOCK = 128  # tokens in the timed forward
PACE_DECODE_STEPS = 8  # sampling steps timed at each of two batch sizes


@dataclass(frozen=True)
class Pace:
    """This machine's speed on one teacher."""

    forward_s_per_token: float  # a full forward, batched over a block
    # One sampling step (``generate``, one token for each of ``size`` sequences) takes
    # ``sample_step_s + sample_step_per_sequence_s * size``: per-step overhead dominates on CPU.
    sample_step_s: float
    sample_step_per_sequence_s: float = 0.0
    load_s: float = 0.0  # loading the teacher (0 when it was already loaded)

    def sampling_s(self, blocks: int, block_size: int, batch: int) -> float:
        """Seconds to sample ``blocks`` sequences of ``block_size`` tokens, ``batch`` at a
        time, as :func:`engine.distill.data.sample_corpus` does."""
        seconds, remaining = 0.0, blocks
        while remaining > 0:
            size = min(batch, remaining)
            seconds += (block_size - 1) * (self.sample_step_s
                                           + self.sample_step_per_sequence_s * size)
            remaining -= size
        return seconds


@dataclass(frozen=True)
class WorkEstimate:
    """Seconds a run will take, by phase, on the machine its :class:`Pace` was measured on."""

    parts: tuple[tuple[str, float], ...]
    corpus_cached: bool = False

    @property
    def total_s(self) -> float:
        return sum(seconds for _name, seconds in self.parts)

    def part(self, name: str) -> float:
        return sum(seconds for part, seconds in self.parts if part == name)


def measure_pace(model: Any, *, vocab_size: int, load_s: float = 0.0) -> Pace:
    """Time ``model``: one forward over a block (after a short warm-up), and sampling steps
    with ``generate`` at two batch sizes (the step time's fixed and per-sequence parts)."""
    import torch

    from engine.distill.data import SAMPLE_BATCH

    generator = torch.Generator().manual_seed(0)
    block = torch.randint(0, vocab_size, (1, PACE_BLOCK), generator=generator)
    step_s = {}
    with torch.inference_mode(), torch.random.fork_rng():  # the caller's RNG stays as it was
        model(block[:, :16])  # warm-up: first calls allocate
        started = time.perf_counter()
        model(block)
        forward = (time.perf_counter() - started) / PACE_BLOCK
        for size in (SAMPLE_BATCH // 4, SAMPLE_BATCH):
            prompt = block[:, :1].repeat(size, 1)
            started = time.perf_counter()
            model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                           max_new_tokens=PACE_DECODE_STEPS, min_new_tokens=PACE_DECODE_STEPS,
                           top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)
            step_s[size] = (time.perf_counter() - started) / PACE_DECODE_STEPS
    small, large = SAMPLE_BATCH // 4, SAMPLE_BATCH
    per_sequence = max(0.0, (step_s[large] - step_s[small]) / (large - small))
    fixed = max(1e-6, step_s[small] - per_sequence * small)
    return Pace(forward_s_per_token=forward, sample_step_s=fixed,
                sample_step_per_sequence_s=per_sequence, load_s=load_s)


def estimate_run(config: Any, pace: Pace, *, layers: int, corpus_cached: bool = False,
                 data_tokens: int | None = None) -> WorkEstimate:
    """Seconds per phase for a run of ``config`` (a DistillConfig) replacing ``layers``
    layers. ``data_tokens``: tokens in its text files (None: data-free, sampled unless
    ``corpus_cached``)."""
    f = pace.forward_s_per_token
    parts: list[tuple[str, float]] = [("loading the teacher", pace.load_s)]
    if data_tokens is None:
        from engine.distill.data import SAMPLE_BATCH

        sampling = sum(pace.sampling_s(blocks, config.block_size, SAMPLE_BATCH)
                       for blocks in (config.data_free_blocks, config.heldout_blocks))
        parts.append(("sampling training text", 0.0 if corpus_cached else sampling))
    routed = config.memory == "featural" and config.hparams.get("keys") == "routed"
    if routed:
        parts.append(("building the student", ROUTED_CALIBRATION_TOKENS * f
                      + CLUSTER_SECONDS_PER_LAYER * layers))
    if config.local_tokens:
        parts.append(("capturing pairs", config.local_tokens * f))
    rows = config.local_batch_tokens * layers
    if config.router_steps:
        parts.append(("router stage", config.router_steps * rows * ROUTER_FORWARDS_PER_ROW * f))
    if config.local_steps and config.local_tokens:  # rows drawn from the captured pairs
        parts.append(("layer-local stage",
                      config.local_steps * rows * LOCAL_FORWARDS_PER_ROW * f))
    elif config.local_steps:  # one teacher pass per local step
        parts.append(("layer-local stage",
                      config.local_steps * config.batch_size * config.block_size * 2 * f))
    step_tokens = config.batch_size * config.block_size
    parts.append(("end-to-end steps", config.steps * step_tokens * E2E_FORWARDS_PER_TOKEN * f))
    heldout = config.heldout_blocks * config.block_size
    evaluations = config.steps // max(config.eval_every, 1) + 2  # before, during, after
    parts.append(("evaluation", evaluations * heldout * 2 * f))
    parts.append(("saving", SAVE_SECONDS))
    return WorkEstimate(tuple(parts), corpus_cached=corpus_cached)


def format_duration(seconds: float) -> str:
    """``"about 40 s"``, ``"about 2 min 30 s"``, ``"about 25 min"``, ``"about 2 h 10 min"``."""
    if seconds < 90:
        return f"about {max(5, round(seconds / 5) * 5):.0f} s"
    if seconds < 600:  # a few minutes: to the half minute
        halves = round(seconds / 30)
        minutes, half = divmod(halves, 2)
        return f"about {minutes} min 30 s" if half else f"about {minutes} min"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"about {minutes} min"
    hours, rest = divmod(minutes, 60)
    return f"about {hours} h {rest} min" if rest else f"about {hours} h"
