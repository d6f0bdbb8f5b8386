"""The distillation loop: one process, or one rank of a ``torchrun`` group.

``run_distillation(config, run_dir)`` trains the student of ``config`` in ``run_dir`` and
returns the run report. It resumes from the run directory's checkpoint when there is one
(same data order: the batches are a pure function of the seed and the step), polls
``control.json`` every step (pause, resume, cancel), checkpoints atomically every
``checkpoint_every`` steps and on cancel, and stops with a clear error, keeping the last good
checkpoint, if a loss becomes NaN or infinite.

Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) each rank takes its own slice of
every step's batches and the trainable modules are wrapped in DistributedDataParallel (gloo on
CPU, NCCL on GPUs); rank 0 alone writes events, checkpoints and the report.
"""

from __future__ import annotations

import math
import os
import signal
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from engine.distill import events as ev
from engine.distill.build import build_student, layer_mlps, layer_prefixes
from engine.distill.checkpoints import (
    atomic_write_text,
    load_checkpoint,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from engine.distill.config import DistillConfig, parse_layers
from engine.distill.data import BlockOrder, TokenData, data_free, load_text_data
from engine.distill.local_pairs import LocalPairs, capture_local_pairs
from engine.distill.objective import (
    LocalMatcher,
    NonFiniteLossError,
    Optimizers,
    capture_mlps,
    ce_loss,
    check_finite,
    clip_gradients,
    kd_loss,
    lr_factor,
    sparse_gradient_names,
)
from engine.distill.partial_forward import (
    capture_layer_input,
    logits_from_layer,
    supports_partial_forward,
)
from engine.distill.report import compare, heldout_ppl, summary_text
from engine.errors import MindsetError

EventCallback = Callable[[dict[str, Any]], None]
PAUSE_POLL_SECONDS = 0.2
DATA_FREE_NAME = "data_free.pt"
CALIBRATION_BLOCKS = 16  # training blocks that feed init="data"
STUDENT_DIR = "student"


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return DistContext(rank=dist.get_rank(), world=dist.get_world_size(), device=device)


def mean_across_ranks(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return float(tensor) / ctx.world


def sum_across_ranks(value: float, ctx: DistContext) -> float:
    return mean_across_ranks(value, ctx) * ctx.world


class StopSignals:
    """SIGTERM (and SIGINT in the foreground) ask for a clean cancel: checkpoint, then exit."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for number in (signal.SIGTERM, signal.SIGINT):
            self.previous[number] = signal.signal(number, self.handle)

    def handle(self, _number: int, _frame: Any) -> None:
        self.requested = True

    def restore(self) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous.clear()


def prepare_data(config: DistillConfig, teacher: Any, run_dir: Path, ctx: DistContext) -> TokenData:
    if config.data:
        from engine.paths import data_dir

        cache = data_dir() / "cache" / "tokens"
        return load_text_data(config.data, teacher.tokenizer, block_size=config.block_size,
                              heldout_fraction=config.heldout_fraction, cache_dir=cache)
    # Data-free: sample once, keep the sample in the run directory so a resume reuses it.
    path = run_dir / DATA_FREE_NAME
    if ctx.is_main and not path.exists():
        sampled = data_free(teacher.model, teacher.tokenizer, blocks=config.data_free_blocks,
                            heldout_blocks=config.heldout_blocks, block_size=config.block_size,
                            seed=config.seed)
        from engine.distill.checkpoints import atomic_write

        atomic_write(path, lambda f: torch.save({"train": sampled.train,
                                                 "heldout": sampled.heldout}, f))
    if ctx.enabled:
        dist.barrier()
    saved = torch.load(path, map_location="cpu")
    return TokenData(train=saved["train"], heldout=saved["heldout"],
                     source="sampled from the teacher")


def trainable_state(student: nn.Module, prefixes: list[str]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().cpu().clone()
            for name, tensor in student.state_dict().items()
            if name.startswith(tuple(prefixes))}


def memory_tables(memories: dict[int, nn.Module]) -> dict[str, bytes]:
    """The run-time tables of memories that keep entries outside their weights (associative),
    as file contents, so a checkpoint (one atomic file) carries them too."""
    import tempfile

    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="mindset-tables-") as temp:
        root = Path(temp)
        for layer, memory in memories.items():
            save_tables = getattr(memory, "save_tables", None)
            if save_tables is not None:
                save_tables(root / f"layer{layer}", f"layer{layer}")
        for path in root.rglob("*"):
            if path.is_file():
                out[str(path.relative_to(root))] = path.read_bytes()
    return out


def restore_memory_tables(memories: dict[int, nn.Module], files: dict[str, bytes]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mindset-tables-") as temp:
        root = Path(temp)
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        for layer, memory in memories.items():
            load_tables = getattr(memory, "load_tables", None)
            if load_tables is not None:
                load_tables(root / f"layer{layer}", f"layer{layer}")


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Run:
    """One distillation run's state while it trains (see the module docstring)."""

    def __init__(self, config: DistillConfig, run_dir: Path, *, teacher: Any = None,
                 on_event: EventCallback | None = None, resume: bool = True) -> None:
        config.validate()
        self.config = config
        self.run_dir = run_dir
        self.on_event = on_event
        self.resume = resume
        self.ctx = init_distributed()
        self.teacher_loaded = teacher
        self.writer: ev.EventWriter | None = None
        self.tensorboard: Any = None
        self.signals = StopSignals()
        self.threads_before = torch.get_num_threads()
        self.pairs: LocalPairs | None = None
        self.start_layer = 0  # the student runs from here up in the end-to-end stage
        self.step = 0
        self.last_checkpoint: int | None = None
        self.tokens_seen = 0
        self.cpu_before = 0.0
        self.cpu_start = time.process_time()
        self.wall_start = time.time()

    # -- events ---------------------------------------------------------------------------
    def emit(self, kind: str, **fields: Any) -> None:
        if not self.ctx.is_main:
            return
        if self.writer is None:
            self.writer = ev.EventWriter(self.run_dir)
        event = self.writer.emit(kind, **fields)
        if self.on_event is not None:
            self.on_event(event)

    def set_state(self, state: str, **fields: Any) -> None:
        if self.ctx.is_main:
            ev.write_state(self.run_dir, state, step=self.step,
                           total_steps=self.config.total_steps, **fields)
            self.emit("state", state=state, step=self.step, **fields)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tensorboard is not None and math.isfinite(value):
            self.tensorboard.add_scalar(tag, value, step)

    def cpu_seconds(self) -> float:
        return self.cpu_before + time.process_time() - self.cpu_start

    # -- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        config, ctx = self.config, self.ctx
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if ctx.is_main:
            config.save(self.run_dir / ev.CONFIG_NAME)
        self.set_state("starting")
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        if self.teacher_loaded is None:
            from engine.model.loading import load_model

            self.teacher_loaded = load_model(config.teacher)
        teacher = self.teacher_loaded.model
        teacher.eval().to(ctx.device)
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        self.layers = parse_layers(config.layers, int(teacher.config.num_hidden_layers))
        hparams = dict(config.hparams)
        if ctx.enabled and config.memory == "featural":
            hparams.setdefault("sparse", False)  # DDP reduces dense gradients on any backend
        self.data = prepare_data(config, self.teacher_loaded, self.run_dir, ctx)
        torch.manual_seed(config.seed)  # the same initial student on every rank
        self.student = build_student(
            teacher, self.layers, config.memory, hparams, teacher_spec=config.teacher,
            calibration=self.data.train[:CALIBRATION_BLOCKS].to(ctx.device),
        ).to(ctx.device)
        self.student.train()
        self.prefixes = layer_prefixes(self.student, self.layers)
        self.heldout = self.data.heldout[: config.heldout_blocks]
        self.order = BlockOrder(len(self.data.train), config.batch_size, config.seed,
                                rank=ctx.rank, world=ctx.world)
        probe_ids = self.data.train[:1, : min(8, self.data.block_size)].to(ctx.device)
        self.student.eval()
        sparse = sparse_gradient_names(
            self.student, lambda: self.student(input_ids=probe_ids).logits.float().mean()
        )
        self.student.train()
        self.optimizers = Optimizers(self.student, lr=config.lr,
                                     value_lr=config.effective_value_lr,
                                     weight_decay=config.weight_decay, sparse_names=sparse)
        self.teacher_mlps = layer_mlps(teacher, self.layers)
        self.matcher = LocalMatcher(layer_mlps(self.student, self.layers))
        self.restore()
        if config.local_tokens and self.step < config.local_steps:
            self.pairs = capture_local_pairs(teacher, self.teacher_mlps, self.data.train,
                                             config.local_tokens)
            self.emit("local_pairs", tokens=self.pairs.tokens, bytes=self.pairs.nbytes())
        # Below the first replaced layer the student is the teacher: start it there (not
        # under DDP, whose gradient hooks need the wrapped module's own forward).
        if (not ctx.enabled and min(self.layers) > 0 and supports_partial_forward(teacher)
                and supports_partial_forward(self.student)):
            self.start_layer = min(self.layers)
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.student_ddp: nn.Module = DDP(self.student)
            self.matcher_ddp: nn.Module = DDP(self.matcher) if config.local_steps else self.matcher
        else:
            self.student_ddp, self.matcher_ddp = self.student, self.matcher
        if ctx.is_main:
            from tensorboardX import SummaryWriter

            self.tensorboard = SummaryWriter(logdir=str(self.run_dir / ev.TENSORBOARD_DIR),
                                             purge_step=self.step if self.step else None)

    def restore(self) -> None:
        state = load_checkpoint(self.run_dir) if self.resume else None
        if state is None:
            return
        from engine.distill.config import DistillConfig

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
        self.student.load_state_dict(state["weights"], strict=False)
        restore_memory_tables(layer_mlps(self.student, self.layers), state.get("tables", {}))
        self.optimizers.load_state_dict(state["optimizers"])
        restore_rng_state(state["rng"])
        self.step = self.last_checkpoint = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.cpu_before = float(state["cpu_seconds"])
        self.emit("resumed", from_step=self.step)

    def checkpoint(self) -> None:
        if self.ctx.is_main:
            save_checkpoint(self.run_dir, {
                "step": self.step,
                "config": self.config.to_dict(),
                "weights": trainable_state(self.student, self.prefixes),
                "tables": memory_tables(layer_mlps(self.student, self.layers)),
                "optimizers": self.optimizers.state_dict(),
                "rng": rng_state(),
                "tokens_seen": self.tokens_seen,
                "cpu_seconds": self.cpu_seconds(),
            })
            self.emit("checkpoint", step=self.step)
        self.last_checkpoint = self.step

    # -- control --------------------------------------------------------------------------
    def requested_action(self, reader: ev.ControlReader) -> str:
        """"run", "pause" or "cancel", agreed by every rank (rank 0 decides)."""
        action = "cancel" if self.signals.requested else "run"
        if action == "run":
            control = reader.read()
            if control.command != "run" and (control.at_step is None
                                             or self.step >= control.at_step):
                action = control.command
        if self.ctx.enabled:
            code = torch.tensor([("run", "pause", "cancel").index(action)], device=self.ctx.device)
            dist.broadcast(code, src=0)
            action = ("run", "pause", "cancel")[int(code)]
        return action

    def wait_while_paused(self, reader: ev.ControlReader) -> str:
        self.set_state("paused")
        while True:
            time.sleep(PAUSE_POLL_SECONDS)
            action = self.requested_action(reader)
            if action != "pause":
                if action == "run":
                    self.set_state("running")
                return action

    # -- training -------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        config, ctx = self.config, self.ctx
        local = step < config.local_steps
        batch = (None if local and self.pairs is not None
                 else self.order.batch(self.data.train, step).to(ctx.device))
        if local:
            factor = lr_factor(step, total=config.local_steps, warmup=config.warmup_steps,
                               schedule=config.schedule, min_ratio=config.min_lr_ratio)
        else:
            factor = lr_factor(step - config.local_steps, total=config.steps,
                               warmup=config.warmup_steps, schedule=config.schedule,
                               min_ratio=config.min_lr_ratio)
        self.optimizers.set_lr_factor(factor)
        self.optimizers.zero_grad()
        teacher = self.teacher_loaded.model
        parts: dict[str, float] = {}
        if local and self.pairs is not None:
            inputs, targets = self.pairs.batch(step, config.local_batch_tokens, seed=config.seed,
                                               rank=ctx.rank, world=ctx.world)
            inputs = {k: v.to(ctx.device) for k, v in inputs.items()}
            targets = {k: v.to(ctx.device) for k, v in targets.items()}
            loss = self.matcher_ddp(inputs, targets)
            parts["local"] = float(loss.detach())
            tokens = config.local_batch_tokens
        elif local:
            assert batch is not None
            with torch.no_grad(), capture_mlps(self.teacher_mlps, stop_early=True) as captured:
                teacher(input_ids=batch)
            loss = self.matcher_ddp(captured.inputs, captured.outputs)
            parts["local"] = float(loss.detach())
            tokens = batch.numel()
        else:
            assert batch is not None
            tokens = batch.numel()
            if self.start_layer:
                with torch.no_grad(), capture_layer_input(teacher, self.start_layer) as seen:
                    teacher_logits = teacher(input_ids=batch).logits
                student_logits = logits_from_layer(self.student, seen["hidden"],
                                                   self.start_layer)
            else:
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch).logits
                student_logits = self.student_ddp(input_ids=batch).logits
            kl = kd_loss(student_logits, teacher_logits, config.temperature)
            loss = config.kl_weight * kl
            parts["kl"] = float(kl.detach())
            if config.ce_weight > 0:
                ce = ce_loss(student_logits, batch)
                loss = loss + config.ce_weight * ce
                parts["ce"] = float(ce.detach())
        value = mean_across_ranks(float(loss.detach()), ctx)
        check_finite(value, step=step + 1, what="loss", last_checkpoint=self.last_checkpoint)
        loss.backward()
        norm = clip_gradients(self.optimizers.parameters, config.clip_norm)
        norm = mean_across_ranks(norm, ctx)
        check_finite(norm, step=step + 1, what="gradient norm",
                     last_checkpoint=self.last_checkpoint)
        self.optimizers.step()
        self.tokens_seen += tokens * ctx.world
        hashed = batch if batch is not None else next(iter(inputs.values()))
        return {"loss": value, **parts, "grad_norm": norm, "tokens": float(tokens),
                "lr": config.lr * factor, "stage": 0.0 if local else 1.0,
                "batch_hash": float(zlib.crc32(hashed.cpu().numpy().tobytes()))}

    def train(self) -> str:
        config = self.config
        reader = ev.ControlReader(self.run_dir)
        total = config.total_steps
        self.set_state("running")
        step_seconds: float | None = None
        while self.step < total:
            action = self.requested_action(reader)
            if action == "pause":
                action = self.wait_while_paused(reader)
            if action == "cancel":
                self.checkpoint()
                self.set_state("cancelled")
                return "cancelled"
            started = time.perf_counter()
            metrics = self.train_step(self.step)
            self.step += 1
            elapsed = time.perf_counter() - started
            step_seconds = elapsed if step_seconds is None else 0.9 * step_seconds + 0.1 * elapsed
            if self.step % config.log_every == 0 or self.step == total:
                stage = "local" if metrics.pop("stage") == 0.0 else "e2e"
                batch_hash = int(metrics.pop("batch_hash"))
                tokens_per_step = metrics.pop("tokens") * self.ctx.world
                self.emit("step", step=self.step, total_steps=total, stage=stage,
                          tokens_per_s=tokens_per_step / max(elapsed, 1e-9),
                          eta_s=(total - self.step) * step_seconds,
                          tokens_seen=self.tokens_seen, cpu_seconds=self.cpu_seconds(),
                          batch_hash=batch_hash, **metrics)
                for key in ("loss", "kl", "ce", "local"):
                    if key in metrics:
                        self.scalar(f"loss/{key}", metrics[key], self.step)
                self.scalar("train/lr", metrics["lr"], self.step)
                self.scalar("train/grad_norm", metrics["grad_norm"], self.step)
                self.scalar("train/tokens_per_s", tokens_per_step / max(elapsed, 1e-9), self.step)
            if self.step % config.eval_every == 0 and self.step < total and self.ctx.is_main:
                ppl = heldout_ppl(self.student, self.heldout)
                self.emit("eval", step=self.step, heldout_ppl=ppl)
                self.scalar("eval/heldout_ppl", ppl, self.step)
            if self.step % config.checkpoint_every == 0 or self.step == total:
                self.checkpoint()
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
            })
            atomic_write_text(self.run_dir / ev.REPORT_NAME,
                              __import__("json").dumps(ev.clean(report), indent=2) + "\n")
            atomic_write_text(self.run_dir / ev.SUMMARY_NAME, summary_text(report))
            self.save_student()
            self.scalar("eval/heldout_ppl", report["ppl_student"], self.step)
            self.emit("done", **{k: v for k, v in report.items() if k != "hparams"})
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

    def close(self) -> None:
        self.signals.restore()
        torch.set_num_threads(self.threads_before)  # a run in-process leaves no trace
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.writer is not None:
            self.writer.close()


def run_distillation(config: DistillConfig, run_dir: Path, *, teacher: Any = None,
                     on_event: EventCallback | None = None, resume: bool = True) -> dict[str, Any]:
    """Train, report, and return the report (empty when cancelled, or on ranks other than 0)."""
    run = Run(config, run_dir, teacher=teacher, on_event=on_event, resume=resume)
    run.signals.install()
    try:
        run.setup()
        outcome = run.train()
        if outcome == "cancelled":
            return {}
        return run.finish()
    except NonFiniteLossError as exc:
        run.emit("error", message=str(exc), step=run.step)
        run.set_state("failed", error=str(exc), last_checkpoint=run.last_checkpoint)
        raise
    except BaseException as exc:
        message = str(exc) if isinstance(exc, MindsetError) else f"{type(exc).__name__}: {exc}"
        if run.ctx.is_main and run.run_dir.exists():
            run.emit("error", message=message, step=run.step)
            run.set_state("failed", error=message, last_checkpoint=run.last_checkpoint)
        raise
    finally:
        run.close()
