"""One training step of a distillation run, and the record it returns.

Three stages. For routed memories, first the router stage (``step < router_steps``, see
:mod:`engine.distill.router_stage`). Then layer-local (the next ``local_steps``): each
replaced layer is matched to the teacher's MLP on the teacher's own MLP input (from captured
pairs when the run captured them, else from a teacher pass over the step's batch). Then end
to end: KL(teacher ‖ student) at temperature T plus the optional cross-entropy, the student
optionally under a forgetful causal mask (:mod:`engine.distill.forgetful`; the teacher never
is, and then the student runs its full forward, since its lower layers must see the mask
too). Under DDP the loss and gradient norm are the means over ranks, and a NaN or infinite
value stops the run (:class:`NonFiniteLossError`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from engine.distill.config import DistillConfig
from engine.distill.data import BlockOrder
from engine.distill.distributed import DistContext, mean_across_ranks
from engine.distill.forgetful import forgetful_mask
from engine.distill.local_pairs import LocalPairs
from engine.distill.objective import (
    Optimizers,
    ce_loss,
    check_finite,
    clip_gradients,
    kd_loss,
    lr_factor,
)
from engine.model.anatomy import capture_mlps
from engine.model.partial_forward import capture_layer_input, logits_from_layer

Stage = Literal["router", "local", "e2e"]


@dataclass(frozen=True)
class StepRecord:
    """What one step did; the losses the stage does not train are None."""

    stage: Stage
    loss: float  # the weighted total, averaged over ranks
    grad_norm: float  # before clipping, averaged over ranks
    lr: float
    tokens: int  # tokens this rank trained on
    batch_hash: int  # CRC-32 of the step's input: a resumed run must see the same data
    kl: float | None = None
    ce: float | None = None
    local: float | None = None
    router: float | None = None  # the router loss (router stage)
    router_recall: float | None = None  # recall of the oracle's top-k mass (router stage)


@dataclass(frozen=True)
class _Forward:
    loss: torch.Tensor
    tokens: int
    hashed: torch.Tensor
    kl: float | None = None
    ce: float | None = None
    local: float | None = None
    router: float | None = None
    router_recall: float | None = None


@dataclass
class TrainStep:
    """Everything a step reads; :meth:`__call__` trains one step."""

    config: DistillConfig
    ctx: DistContext
    teacher: nn.Module
    student: nn.Module
    student_ddp: nn.Module  # the student, wrapped for DDP when there are several ranks
    matcher_ddp: nn.Module  # the layer-local matcher, likewise
    teacher_mlps: dict[int, nn.Module]
    optimizers: Optimizers
    order: BlockOrder
    train_blocks: torch.Tensor
    pairs: LocalPairs | None = None
    start_layer: int = 0  # the student runs from this layer up in the end-to-end stage
    router_ddp: nn.Module | None = None  # the router fitter (router stage), DDP-wrapped

    def __call__(self, step: int, *, last_checkpoint: int | None) -> StepRecord:
        config, ctx = self.config, self.ctx
        stage = config.stage_of(step)
        local = stage != "e2e"  # the router stage reads MLP inputs as the local one does
        batch = (None if local and self.pairs is not None
                 else self.order.batch(self.train_blocks, step).to(ctx.device))
        factor = self._lr_factor(step, stage)
        self.optimizers.set_lr_factor(factor)
        self.optimizers.zero_grad()
        if stage == "router":
            forward = self._router(step, batch)
        elif local and self.pairs is not None:
            forward = self._local_from_pairs(step)
        elif local:
            assert batch is not None
            forward = self._local_from_batch(batch)
        else:
            assert batch is not None
            forward = self._end_to_end(batch, step)
        value = mean_across_ranks(float(forward.loss.detach()), ctx)
        check_finite(value, step=step + 1, what="loss", last_checkpoint=last_checkpoint)
        forward.loss.backward()
        norm = clip_gradients(self.optimizers.parameters, config.clip_norm)
        norm = mean_across_ranks(norm, ctx)
        check_finite(norm, step=step + 1, what="gradient norm", last_checkpoint=last_checkpoint)
        self.optimizers.step()
        return StepRecord(
            stage=stage, loss=value, grad_norm=norm,
            lr=config.lr * factor, tokens=forward.tokens,
            batch_hash=zlib.crc32(forward.hashed.cpu().numpy().tobytes()),
            kl=forward.kl, ce=forward.ce, local=forward.local, router=forward.router,
            router_recall=forward.router_recall,
        )

    def _lr_factor(self, step: int, stage: str) -> float:
        """The base learning rates' multiplier; the router stage runs at ``router_lr``."""
        config = self.config

        def within(start: int, total: int) -> float:
            return lr_factor(step - start, total=total, warmup=config.warmup_steps,
                             schedule=config.schedule, min_ratio=config.min_lr_ratio)

        if stage == "router":
            return config.router_lr / config.lr * within(0, config.router_steps)
        if stage == "local":
            return within(config.router_steps, config.local_steps)
        return within(config.pre_e2e_steps, config.steps)

    def _router(self, step: int, batch: torch.Tensor | None) -> _Forward:
        config, ctx = self.config, self.ctx
        assert self.router_ddp is not None
        if self.pairs is not None:
            inputs, _ = self.pairs.batch(step, config.local_batch_tokens, seed=config.seed,
                                         rank=ctx.rank, world=ctx.world)
            inputs = {k: v.to(ctx.device) for k, v in inputs.items()}
            tokens, hashed = config.local_batch_tokens, next(iter(inputs.values()))
        else:
            assert batch is not None
            with torch.no_grad(), capture_mlps(self.teacher_mlps, stop_early=True) as seen:
                self.teacher(input_ids=batch)
            inputs, tokens, hashed = seen.inputs, batch.numel(), batch
        loss = self.router_ddp(inputs)
        fitter: Any = getattr(self.router_ddp, "module", self.router_ddp)
        recall = float(fitter.last_recall)
        return _Forward(loss, tokens, hashed, router=float(loss.detach()),
                        router_recall=mean_across_ranks(recall, ctx))

    def _local_from_pairs(self, step: int) -> _Forward:
        config, ctx = self.config, self.ctx
        assert self.pairs is not None
        inputs, targets = self.pairs.batch(step, config.local_batch_tokens, seed=config.seed,
                                           rank=ctx.rank, world=ctx.world)
        inputs = {k: v.to(ctx.device) for k, v in inputs.items()}
        targets = {k: v.to(ctx.device) for k, v in targets.items()}
        loss = self.matcher_ddp(inputs, targets)
        return _Forward(loss, config.local_batch_tokens, next(iter(inputs.values())),
                        local=float(loss.detach()))

    def _local_from_batch(self, batch: torch.Tensor) -> _Forward:
        with torch.no_grad(), capture_mlps(self.teacher_mlps, stop_early=True) as captured:
            self.teacher(input_ids=batch)
        loss = self.matcher_ddp(captured.inputs, captured.outputs)
        return _Forward(loss, batch.numel(), batch, local=float(loss.detach()))

    def _end_to_end(self, batch: torch.Tensor, step: int) -> _Forward:
        config, ctx = self.config, self.ctx
        mask = forgetful_mask(batch.shape[0], batch.shape[1], config.forgetful_mask,
                              seed=config.seed, step=step, rank=ctx.rank, world=ctx.world,
                              device=batch.device)
        if mask is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=batch).logits
            student_logits = self.student_ddp(input_ids=batch, attention_mask=mask).logits
        elif self.start_layer:
            with torch.no_grad(), capture_layer_input(self.teacher, self.start_layer) as seen:
                teacher_logits = self.teacher(input_ids=batch).logits
            student_logits = logits_from_layer(self.student, seen["hidden"], self.start_layer)
        else:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=batch).logits
            student_logits = self.student_ddp(input_ids=batch).logits
        kl = kd_loss(student_logits, teacher_logits, config.temperature)
        loss = config.kl_weight * kl
        ce_value = None
        if config.ce_weight > 0:
            ce = ce_loss(student_logits, batch)
            loss = loss + config.ce_weight * ce
            ce_value = float(ce.detach())
        return _Forward(loss, batch.numel(), batch, kl=float(kl.detach()), ce=ce_value)
