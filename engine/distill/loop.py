"""The distillation run: one process, or one rank of a ``torchrun`` group.

``run_distillation(config, run_dir)`` trains the student of ``config`` in ``run_dir`` and
returns the run report. It resumes from the run directory's checkpoint when there is one
(same data order: the batches are a pure function of the seed and the step), polls
``control.json`` every step (pause, resume, cancel), checkpoints atomically every
``checkpoint_every`` steps and on cancel, and stops with a clear error, keeping the last good
checkpoint, if a loss becomes NaN or infinite. A run with label channels trains them after
its main stages (:mod:`engine.distill.channel_stage`; in one process only).

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) each rank takes its own slice of
every step's batches and the trainable modules are wrapped in DistributedDataParallel (gloo on
CPU, NCCL on GPUs); rank 0 alone writes events, checkpoints and the report.

:class:`Run` orchestrates (setup, restore, train, finish); the training data comes from
:mod:`engine.distill.run_data`, one step is :class:`engine.distill.step.TrainStep`, requests
between steps :mod:`engine.distill.control`, and what the run reports while it trains
:mod:`engine.distill.telemetry`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.atomic import atomic_write_text
from engine.distill import events as ev
from engine.distill.build import build_student
from engine.distill.channel_stage import ChannelStage, add_frozen_channels
from engine.distill.checkpoints import (
    ENTRIES_KEY,
    check_checkpoint,
    load_checkpoint,
    memory_entries,
    restore_memory_entries,
    restore_rng_state,
    rng_state,
    save_checkpoint,
    trainable_state,
    weights_digest,
)
from engine.distill.config import DistillConfig
from engine.distill.control import RunControl, StopSignals
from engine.distill.data import BlockOrder
from engine.distill.distributed import init_distributed, sum_across_ranks
from engine.distill.job_events import (
    CheckpointEvent,
    DoneEvent,
    ErrorEvent,
    LocalPairsEvent,
    PhaseEvent,
    ResumedEvent,
    from_fields,
)
from engine.distill.local_pairs import LocalPairs, capture_local_pairs
from engine.distill.objective import (
    LocalMatcher,
    NonFiniteLossError,
    Optimizers,
    sparse_gradient_names,
)
from engine.distill.report import compare, heldout_ppl, summary_text
from engine.distill.router_stage import RouterFitter
from engine.distill.run_data import (  # SAMPLING, load_data_free: still importable from here
    SAMPLING,  # noqa: F401
    load_data_free,  # noqa: F401
    prepare_data,
)
from engine.distill.step import TrainStep
from engine.distill.telemetry import EventCallback, Telemetry
from engine.errors import InputError, MindsetError, one_line
from engine.model.anatomy import layer_mlps, layer_prefixes, resolve_layers
from engine.model.partial_forward import supports_partial_forward

CALIBRATION_BLOCKS = 16  # training blocks that feed init="data"
STUDENT_DIR = ev.STUDENT_DIR


class RunCancelled(Exception):
    """A cancel (control file or SIGTERM) arrived before training started."""


class Run:
    """One distillation run's state while it trains (see the module docstring)."""

    def __init__(self, config: DistillConfig, run_dir: Path, *, teacher: Any = None,
                 on_event: EventCallback | None = None, resume: bool = True) -> None:
        config.validate()
        self.config = config
        self.run_dir = run_dir
        self.resume = resume
        self.ctx = init_distributed()
        self.teacher_loaded = teacher
        self.telemetry = Telemetry(run_dir, is_main=self.ctx.is_main,
                                   total_steps=config.total_steps, on_event=on_event)
        self.signals = StopSignals()
        self.control = RunControl(run_dir, self.ctx, self.signals)
        self.threads_before = torch.get_num_threads()
        self.step = 0
        self.last_checkpoint: int | None = None
        self.tokens_seen = 0
        self.cpu_before = 0.0
        self.cpu_start = time.process_time()
        self.wall_start = time.time()
        self.channel_report: dict[str, Any] = {}

    def set_state(self, state: str) -> None:
        self.telemetry.set_state(state, self.step)

    def cancel_requested(self) -> bool:
        """Between steps: wait out a pause; True when the run is asked to stop."""
        action = self.control.requested(self.step)
        if action == "pause":
            action = self.control.wait_while_paused(self.step, self.set_state)
        return action == "cancel"

    def phase(self, name: str, done: int = 0, total: int = 0, unit: str = "",
              eta_s: float | None = None) -> None:
        """Report a phase before training, and honour a pause or cancel asked meanwhile (the
        control file and SIGTERM are read here too, not only between steps)."""
        self.telemetry.emit(PhaseEvent(phase=name, done=done, total=total, unit=unit,
                                       eta_s=eta_s))
        if self.ctx.enabled:
            return  # ranks agree on requests between steps; sampling runs on rank 0 alone
        action = self.control.requested(self.step)
        if action == "pause":
            def state(name: str) -> None:  # resumed: still starting, not yet running
                self.set_state("starting" if name == "running" else name)

            action = self.control.wait_while_paused(self.step, state)
        if action == "cancel":
            raise RunCancelled

    def cpu_seconds(self) -> float:
        return self.cpu_before + time.process_time() - self.cpu_start

    # -- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        config, ctx = self.config, self.ctx
        if self.resume:
            check_checkpoint(self.run_dir)  # a legacy or damaged one: refused before any load
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if ctx.is_main:
            config.save(self.run_dir / ev.CONFIG_NAME)
        self.set_state("starting")
        if config.threads:
            torch.set_num_threads(config.threads)
        if ctx.enabled and config.channels:
            raise InputError("label channels train in one process; run without torchrun")
        torch.manual_seed(config.seed)
        if self.teacher_loaded is None:
            from engine.model.loading import load_model

            self.phase("loading the teacher")
            self.teacher_loaded = load_model(config.teacher)
        teacher = self.teacher_loaded.model
        teacher.eval().to(ctx.device)
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        self.layers = resolve_layers(config.layers, teacher)
        hparams = dict(config.hparams)
        if ctx.enabled and config.memory == "featural":
            hparams.setdefault("sparse", False)  # DDP reduces dense gradients on any backend
        self.data = prepare_data(config, self.teacher_loaded, self.run_dir, ctx, self.phase)
        self.phase("building the student")
        torch.manual_seed(config.seed)  # the same initial student on every rank
        self.student = build_student(
            teacher, self.layers, config.memory, hparams, teacher_spec=config.teacher,
            calibration=self.data.train[:CALIBRATION_BLOCKS].to(ctx.device),
        ).to(ctx.device)
        if config.channels:  # zero and frozen until the channel stage
            add_frozen_channels(self.student, config.channels)
        self.student.train()
        self.prefixes = layer_prefixes(self.student, self.layers)
        self.heldout = self.data.heldout[: config.heldout_blocks]
        order = BlockOrder(len(self.data.train), config.batch_size, config.seed,
                           rank=ctx.rank, world=ctx.world)
        probe_ids = self.data.train[:1, : min(8, self.data.block_size)].to(ctx.device)
        # The associative recipe starts exact and learns by reading: nothing to train here.
        self.exact = config.memory == "associative" and all(
            getattr(m, "base", None) is not None
            for m in layer_mlps(self.student, self.layers).values())
        self.student.eval()
        sparse = set() if self.exact else sparse_gradient_names(
            self.student, lambda: self.student(input_ids=probe_ids).logits.float().mean()
        )
        self.student.train()
        self.optimizers = Optimizers(self.student, lr=config.lr,
                                     value_lr=config.effective_value_lr,
                                     weight_decay=config.weight_decay, sparse_names=sparse,
                                     allow_none=self.exact)
        teacher_mlps = layer_mlps(teacher, self.layers)
        matcher = LocalMatcher(layer_mlps(self.student, self.layers))
        router = RouterFitter(layer_mlps(self.student, self.layers)) \
            if config.router_steps else None
        self.restore()
        pairs: LocalPairs | None = None
        if config.local_tokens and self.step < config.pre_e2e_steps:
            self.phase("capturing the MLPs' input/output pairs", 0, config.local_tokens,
                       "tokens")
            pairs = capture_local_pairs(teacher, teacher_mlps, self.data.train,
                                        config.local_tokens)
            self.telemetry.emit(LocalPairsEvent(tokens=pairs.tokens, bytes=pairs.nbytes()))
        # Below the first replaced layer the student is the teacher: start it there (not
        # under DDP, whose gradient hooks need the wrapped module's own forward).
        start_layer = 0
        if (not ctx.enabled and min(self.layers) > 0 and supports_partial_forward(teacher)
                and supports_partial_forward(self.student)):
            start_layer = min(self.layers)
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            student_ddp: nn.Module = DDP(self.student)
            matcher_ddp: nn.Module = DDP(matcher) if config.local_steps else matcher
            router_ddp: nn.Module | None = DDP(router) if router is not None else None
        else:
            student_ddp, matcher_ddp, router_ddp = self.student, matcher, router
        self.train_step = TrainStep(
            config=config, ctx=ctx, teacher=teacher, student=self.student,
            student_ddp=student_ddp, matcher_ddp=matcher_ddp, teacher_mlps=teacher_mlps,
            optimizers=self.optimizers, order=order, train_blocks=self.data.train,
            pairs=pairs, start_layer=start_layer, router_ddp=router_ddp,
        )
        self.telemetry.open_tensorboard(self.step)

    def restore(self) -> None:
        state = load_checkpoint(self.run_dir) if self.resume else None
        if state is None:
            return
        saved = state.get("config")
        saved_config = DistillConfig.from_dict(saved) if isinstance(saved, dict) else None
        if saved_config is None or saved_config.to_dict() != self.config.to_dict():
            raise MindsetError(
                f"the checkpoint in {self.run_dir} belongs to a run with other settings; "
                "resume it with its own config.json or start a new run directory"
            )
        expected = set(trainable_state(self.student, self.prefixes))
        if expected - set(state["weights"]):
            raise MindsetError(
                f"the checkpoint in {self.run_dir} does not match this run's student "
                "(different layers or memory); start a new run directory"
            )
        try:
            self.student.load_state_dict(state["weights"], strict=False)
            restore_memory_entries(layer_mlps(self.student, self.layers), state[ENTRIES_KEY])
            self.optimizers.load_state_dict(state["optimizers"])
            restore_rng_state(state["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError,
                OverflowError) as exc:
            raise MindsetError(
                f"the checkpoint in {self.run_dir} does not fit this run's student "
                f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); start a new "
                "run directory"
            ) from None
        self.step = self.last_checkpoint = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.cpu_before = float(state["cpu_seconds"])
        self.telemetry.emit(ResumedEvent(from_step=self.step))

    def checkpoint(self) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.run_dir, {
                "step": self.step,
                "config": self.config.to_dict(),
                "weights": trainable_state(self.student, self.prefixes),
                ENTRIES_KEY: memory_entries(layer_mlps(self.student, self.layers)),
                "optimizers": self.optimizers.state_dict(),
                "rng": rng_state(),
                "tokens_seen": self.tokens_seen,
                "cpu_seconds": self.cpu_seconds(),
            })
            self.telemetry.emit(CheckpointEvent(step=self.step))
        self.last_checkpoint = self.step

    # -- training -------------------------------------------------------------------------
    def train(self) -> str:
        """Step to the end; "completed", or "cancelled" (checkpointed) when asked to stop."""
        config = self.config
        total = config.total_steps
        self.set_state("running")
        step_seconds: float | None = None
        if self.exact:  # no step could improve on the teacher's own entries (Adam would drift)
            return "completed"
        while self.step < total:
            if self.cancel_requested():
                self.checkpoint()
                self.set_state("cancelled")
                return "cancelled"
            started = time.perf_counter()
            record = self.train_step(self.step, last_checkpoint=self.last_checkpoint)
            self.tokens_seen += record.tokens * self.ctx.world
            self.step += 1
            elapsed = time.perf_counter() - started
            step_seconds = elapsed if step_seconds is None else 0.9 * step_seconds + 0.1 * elapsed
            if self.step % config.log_every == 0 or self.step == total:
                self.telemetry.log_step(record, step=self.step, elapsed=elapsed,
                                        step_seconds=step_seconds, tokens_seen=self.tokens_seen,
                                        cpu_seconds=self.cpu_seconds(), world=self.ctx.world)
            if self.step % config.eval_every == 0 and self.step < total and self.ctx.is_main:
                self.telemetry.log_eval(self.step, heldout_ppl(self.student, self.heldout))
            if self.step % config.checkpoint_every == 0 or self.step == total:
                self.checkpoint()
        return "completed"

    def train_channels(self) -> str:
        """The label-channel stage; "completed", or "cancelled" (a resume reruns it)."""
        def progress(name: str, done: int, total: int, unit: str, eta: float | None) -> None:
            self.telemetry.emit(PhaseEvent(phase=name, done=done, total=total, unit=unit,
                                           eta_s=eta))

        stage = ChannelStage(self.config, teacher=self.teacher_loaded.model,
                             student=self.student, tokenizer=self.teacher_loaded.tokenizer,
                             blocks=self.data.train, device=self.ctx.device, progress=progress,
                             keep_going=lambda: not self.cancel_requested(),
                             scalar=self.telemetry.scalar)
        result = stage.run()
        if result is None:
            self.set_state("cancelled")
            return "cancelled"
        self.channel_report = result.as_dict()
        return "completed"

    def finish(self) -> dict[str, Any]:
        cpu = sum_across_ranks(self.cpu_seconds(), self.ctx)
        if self.ctx.enabled:
            digest = weights_digest(trainable_state(self.student, self.prefixes))
            ranks = self.run_dir / "ranks"
            ranks.mkdir(exist_ok=True)
            atomic_write_text(ranks / f"rank-{self.ctx.rank}.txt", digest + "\n")
        report: dict[str, Any] = {}
        if self.ctx.is_main:
            report = compare(self.student, self.teacher_loaded.model, self.heldout, self.layers)
            report.update({
                "state": "completed", "teacher": self.config.teacher,
                "memory": self.config.memory, "layers": self.layers,
                "hparams": self.config.hparams, "steps_done": self.step,
                "total_steps": self.config.total_steps, "tokens_seen": self.tokens_seen,
                "cpu_seconds": cpu, "wall_seconds": time.time() - self.wall_start,
                "world_size": self.ctx.world, "data": self.data.source,
                "trainable_parameters": sum(p.numel() for p in self.student.parameters()
                                            if p.requires_grad),
                **self.channel_report,
            })
            atomic_write_text(self.run_dir / ev.REPORT_NAME,
                              json.dumps(ev.clean(report), indent=2) + "\n")
            atomic_write_text(self.run_dir / ev.SUMMARY_NAME, summary_text(report))
            self.save_student()
            self.telemetry.scalar("eval/heldout_ppl", report["ppl_student"], self.step)
            done: DoneEvent = from_fields(DoneEvent, report)  # the report less its hparams
            self.telemetry.emit(done)
            self.set_state("completed")
        return report

    def save_student(self) -> None:
        """The trained student as a directory in the run (memory kinds; not the control)."""
        from engine.model.surgery import student_spec

        if student_spec(self.student) is None:
            return
        from engine.model.student import save_student

        self.student.eval()
        save_student(self.student, self.run_dir / STUDENT_DIR, self.teacher_loaded.tokenizer)

    def fail(self, message: str) -> None:
        self.telemetry.emit(ErrorEvent(message=message, step=self.step))
        self.telemetry.set_failed(self.step, message, self.last_checkpoint)

    def close(self) -> None:
        self.signals.restore()
        torch.set_num_threads(self.threads_before)  # a run in-process leaves no trace
        self.telemetry.close()


def run_distillation(config: DistillConfig, run_dir: Path, *, teacher: Any = None,
                     on_event: EventCallback | None = None, resume: bool = True) -> dict[str, Any]:
    """Train, report, and return the report (empty when cancelled, or on ranks other than 0).

    ``on_event`` gets every event rank 0 writes (:mod:`engine.distill.job_events`)."""
    run = Run(config, run_dir, teacher=teacher, on_event=on_event, resume=resume)
    run.signals.install()
    try:
        try:
            run.setup()
        except RunCancelled:
            run.set_state("cancelled")
            return {}
        outcome = run.train()
        if outcome == "completed" and run.config.channel_stage_steps:
            outcome = run.train_channels()
        if outcome == "cancelled":
            return {}
        return run.finish()
    except NonFiniteLossError as exc:
        run.fail(str(exc))
        raise
    except BaseException as exc:
        message = str(exc) if isinstance(exc, MindsetError) else one_line(exc)
        if run.ctx.is_main and run.run_dir.exists():
            run.fail(message)
        raise
    finally:
        run.close()
