"""What a run tells the outside while it trains: events, state and TensorBoard curves.

Only rank 0 writes; on the other ranks every call is a no-op. Events go to ``events.jsonl``
(:mod:`engine.distill.job_events`) and to the in-process callback, if any (the CLI's progress
bar); ``state.json`` is rewritten on every state change; TensorBoard gets the losses, the
learning rate, the gradient norm, the throughput and the held-out perplexity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.distill import events as ev
from engine.distill.job_events import (
    EvalEvent,
    EventWriter,
    JobEvent,
    StateEvent,
    StepEvent,
)
from engine.distill.step import StepRecord

EventCallback = Callable[[JobEvent], None]


class Telemetry:
    def __init__(self, run_dir: Path, *, is_main: bool, total_steps: int,
                 on_event: EventCallback | None = None) -> None:
        self.run_dir = run_dir
        self.is_main = is_main
        self.total_steps = total_steps
        self.on_event = on_event
        self.writer: EventWriter | None = None
        self.tensorboard: Any = None

    def emit(self, event: JobEvent) -> None:
        if not self.is_main:
            return
        if self.writer is None:  # opened on first use: a run directory may not exist before
            self.writer = EventWriter(self.run_dir)
        self.writer.write(event)
        if self.on_event is not None:
            self.on_event(event)

    def set_state(self, state: str, step: int) -> None:
        if self.is_main:
            ev.write_state(self.run_dir, state, step=step, total_steps=self.total_steps)
            self.emit(StateEvent(state=state, step=step))

    def set_failed(self, step: int, error: str, last_checkpoint: int | None) -> None:
        if self.is_main:
            ev.write_state(self.run_dir, "failed", step=step, total_steps=self.total_steps,
                           error=error, last_checkpoint=last_checkpoint)
            self.emit(StateEvent(state="failed", step=step, error=error,
                                 last_checkpoint=last_checkpoint))

    def open_tensorboard(self, step: int) -> None:
        """Start the curves; a resumed run drops what an earlier attempt logged past ``step``."""
        if self.is_main:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(logdir=str(self.run_dir / ev.TENSORBOARD_DIR),
                                             purge_step=step if step else None)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tensorboard is not None and math.isfinite(value):
            self.tensorboard.add_scalar(tag, value, step)

    def log_step(self, record: StepRecord, *, step: int, elapsed: float, step_seconds: float,
                 tokens_seen: int, cpu_seconds: float, world: int) -> None:
        """The event and curves of a finished step (``step`` counts from 1)."""
        tokens_per_s = record.tokens * world / max(elapsed, 1e-9)
        self.emit(StepEvent(
            step=step, total_steps=self.total_steps, stage=record.stage, loss=record.loss,
            grad_norm=record.grad_norm, lr=record.lr, tokens_per_s=tokens_per_s,
            eta_s=(self.total_steps - step) * step_seconds, tokens_seen=tokens_seen,
            cpu_seconds=cpu_seconds, batch_hash=record.batch_hash, kl=record.kl,
            ce=record.ce, local=record.local, router_recall=record.router_recall,
        ))
        for key, value in (("loss", record.loss), ("kl", record.kl), ("ce", record.ce),
                           ("local", record.local), ("router", record.router)):
            if value is not None:
                self.scalar(f"loss/{key}", value, step)
        if record.router_recall is not None:
            self.scalar("train/router_recall", record.router_recall, step)
        self.scalar("train/lr", record.lr, step)
        self.scalar("train/grad_norm", record.grad_norm, step)
        self.scalar("train/tokens_per_s", tokens_per_s, step)

    def log_eval(self, step: int, heldout_ppl: float) -> None:
        self.emit(EvalEvent(step=step, heldout_ppl=heldout_ppl))
        self.scalar("eval/heldout_ppl", heldout_ppl, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.writer is not None:
            self.writer.close()
