"""The label-channel stage: paired context distillation after the main stages.

A run with ``channels`` gets the label channels (:mod:`engine.model.label_channels`) right
after its student is built, zero and frozen, so the main stages train exactly as without
them. After the main stages, this stage trains them on pairs from
:mod:`engine.distill.channel_pairs`: the teacher reads the plain prompt (the clean document,
or the feeling said in words), the student reads its own prompt with the labels, and the
loss is KL(teacher ‖ student) at temperature T on the reply tokens only. The two prompts
differ in length, so each side's logits are taken at its own reply positions: the position
before reply token ``j`` is ``len(prompt) - 1 + j`` on each side.

By default (``channel_train="channels"``) only the channel weights train, and the
``content`` embedding's row 0 (the label every unlabelled token gets) is held at zero, so
the student computes exactly what the main stage made it compute on unlabelled text.
``"all"`` also trains what the main stage trained (the replaced layers). The stage runs the
student in eval mode (no dropout; memories that write while training do not write here).

Progress goes out as phase events (building the pairs, then the stage's steps with an ETA);
pause and cancel are honoured between steps. The stage is not checkpointed: a run resumed
after its main stages finished reruns it from its start (its pairs and batches are a pure
function of the seed, so it does the same again).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from engine.distill.channel_pairs import ChannelPair, build_pairs
from engine.distill.config import DistillConfig
from engine.distill.data import BlockOrder, separator_id
from engine.distill.objective import (
    NonFiniteLossError,
    Optimizers,
    clip_gradients,
    kd_loss,
    lr_factor,
    sparse_gradient_names,
)
from engine.model.anatomy import unwrap
from engine.model.label_channels import ATTRIBUTE, install_channels, labelled

BUILDING = "building the label-channel pairs"
TRAINING = "training the label channels"
Progress = Callable[[str, int, int, str, float | None], None]  # phase, done, total, unit, eta


def add_frozen_channels(student: nn.Module, channels: list[str]) -> None:
    """Install ``channels`` on ``student`` in place, zero and frozen (the main stages leave
    them alone: zero channels add nothing)."""
    install_channels(student, channels)
    for parameter in channel_module(student).parameters():
        parameter.requires_grad_(False)


def channel_module(student: nn.Module) -> nn.Module:
    module = getattr(unwrap(student), ATTRIBUTE, None)
    if not isinstance(module, nn.Module):
        raise ValueError("the student has no label channels")
    return module


@dataclass
class PairBatch:
    """Right-padded prompts + replies of both sides, the student's labels, and where each
    side's logits predict the reply tokens (rows, columns)."""

    teacher_ids: torch.Tensor
    student_ids: torch.Tensor
    content: torch.Tensor  # [batch, student tokens] 0/1
    affect: torch.Tensor  # [batch, student tokens, 2]
    teacher_at: tuple[torch.Tensor, torch.Tensor]
    student_at: tuple[torch.Tensor, torch.Tensor]

    @property
    def tokens(self) -> int:
        return int(self.student_at[0].numel())


def collate(pairs: Sequence[ChannelPair], pad: int, device: torch.device | str = "cpu",
            ) -> PairBatch:
    def padded(rows: list[list[int]]) -> torch.Tensor:
        out = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return out

    def reply_positions(prompts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [i for i, pair in enumerate(pairs) for _ in pair.reply]
        cols = [length - 1 + j for length, pair in zip(prompts, pairs, strict=True)
                for j in range(len(pair.reply))]
        return (torch.tensor(rows, device=device), torch.tensor(cols, device=device))

    teacher = padded([[*p.teacher_prompt, *p.reply] for p in pairs])
    student = padded([[*p.student_prompt, *p.reply] for p in pairs])
    content = torch.zeros_like(student)
    affect = torch.zeros(*student.shape, 2)
    for i, pair in enumerate(pairs):
        content[i, :len(pair.content)] = torch.tensor(pair.content, dtype=torch.long)
        affect[i, :len(pair.student_prompt) + len(pair.reply)] = torch.tensor(pair.affect)
    return PairBatch(teacher.to(device), student.to(device), content.to(device),
                     affect.to(device),
                     reply_positions([len(p.teacher_prompt) for p in pairs]),
                     reply_positions([len(p.student_prompt) for p in pairs]))


def paired_kl(student: nn.Module, teacher: nn.Module, batch: PairBatch, channels: list[str],
              temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) on the reply tokens, the student reading its labels."""
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch.teacher_ids).logits[batch.teacher_at]
    labels: dict[str, Any] = {}
    if "content" in channels:
        labels["content"] = batch.content
    if "affect" in channels:
        labels["affect"] = batch.affect
    with labelled(student, **labels):
        student_logits = student(input_ids=batch.student_ids).logits[batch.student_at]
    return kd_loss(student_logits, teacher_logits, temperature)


@dataclass(frozen=True)
class ChannelResult:
    """What the stage did; the KLs are per reply token over all its pairs."""

    channel_steps: int
    channel_pairs: int
    channel_kl_before: float
    channel_kl_after: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ChannelStage:
    """The stage of one run (see the module docstring); :meth:`run` trains it."""

    def __init__(self, config: DistillConfig, *, teacher: nn.Module, student: nn.Module,
                 tokenizer: Any, blocks: torch.Tensor, device: torch.device | str = "cpu",
                 progress: Progress | None = None, keep_going: Callable[[], bool] | None = None,
                 scalar: Callable[[str, float, int], None] | None = None) -> None:
        self.config = config
        self.teacher, self.student, self.tokenizer = teacher, student, tokenizer
        self.blocks, self.device = blocks, device
        self.progress: Progress = progress or (lambda *_args: None)
        self.keep_going = keep_going or (lambda: True)
        self.scalar = scalar or (lambda *_args: None)
        self.pad = separator_id(tokenizer) or 0
        self.pairs: list[ChannelPair] = []

    def build(self) -> list[ChannelPair]:
        config = self.config
        total = config.channel_pairs * len(config.channels)
        self.progress(BUILDING, 0, total, "pairs", None)
        started = time.perf_counter()

        def built(done: int) -> None:
            pace = (time.perf_counter() - started) / max(done, 1)
            self.progress(BUILDING, done, total, "pairs", pace * (total - done))

        self.pairs = build_pairs(self.teacher, self.tokenizer, self.blocks,
                                 channels=config.channels, count=config.channel_pairs,
                                 seed=config.seed, batch=config.batch_size,
                                 device=self.device, on_pairs=built)
        return self.pairs

    def batches(self) -> list[PairBatch]:
        size = self.config.batch_size
        return [collate(self.pairs[i:i + size], self.pad, self.device)
                for i in range(0, len(self.pairs), size)]

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean KL per reply token over every pair."""
        total = tokens = 0.0
        for batch in self.batches():
            kl = paired_kl(self.student, self.teacher, batch, self.config.channels,
                           self.config.temperature)
            total += float(kl) * batch.tokens
            tokens += batch.tokens
        return total / max(tokens, 1.0)

    def trainable(self) -> list[nn.Parameter]:
        """Set ``requires_grad`` for the stage; returns the channel parameters."""
        channels = list(channel_module(self.student).parameters())
        if self.config.channel_train == "channels":
            for parameter in self.student.parameters():
                parameter.requires_grad_(False)
        for parameter in channels:
            parameter.requires_grad_(True)
        return channels

    def optimizers(self) -> Optimizers:
        config = self.config
        lr = config.channel_lr if config.channel_lr is not None else config.lr
        sparse: set[str] = set()
        if config.channel_train == "all":  # memory values may have sparse gradients
            probe = self.pairs[0]
            ids = torch.tensor([list(probe.student_prompt)], device=self.device)
            sparse = sparse_gradient_names(
                self.student, lambda: self.student(input_ids=ids).logits.float().mean())
        return Optimizers(self.student, lr=lr, value_lr=lr * config.effective_value_lr
                          / config.lr, weight_decay=config.weight_decay, sparse_names=sparse)

    def run(self) -> ChannelResult | None:
        """Build the pairs and train; None when cancelled (between steps)."""
        config = self.config
        flags = {name: p.requires_grad for name, p in self.student.named_parameters()}
        was_training = self.student.training
        self.student.eval()
        self.build()
        before = self.evaluate()
        self.trainable()
        hooks = []
        content = getattr(channel_module(self.student), "content", None)
        if isinstance(content, nn.Embedding):  # row 0, every unlabelled token's, stays zero
            keep = torch.ones_like(content.weight)
            keep[0] = 0
            hooks.append(content.weight.register_hook(lambda grad: grad * keep))
        try:
            optimizers = self.optimizers()
            order = BlockOrder(len(self.pairs), config.batch_size, config.seed)
            started = time.perf_counter()
            steps = config.channel_steps
            for step in range(steps):
                if not self.keep_going():
                    return None
                factor = lr_factor(step, total=steps, warmup=0, schedule=config.schedule,
                                   min_ratio=config.min_lr_ratio)
                optimizers.set_lr_factor(factor)
                optimizers.zero_grad()
                batch = collate([self.pairs[i] for i in order.indices(step)], self.pad,
                                self.device)
                loss = paired_kl(self.student, self.teacher, batch, config.channels,
                                 config.temperature)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"the label-channel loss became {value} at channel step {step + 1}; "
                        "the main stages' checkpoint was kept: lower --channel-lr and resume")
                loss.backward()
                clip_gradients(optimizers.parameters, config.clip_norm)
                optimizers.step()
                done = step + 1
                pace = (time.perf_counter() - started) / done
                self.progress(TRAINING, done, steps, "steps", pace * (steps - done))
                self.scalar("loss/channels", value, config.total_steps + done)
            after = self.evaluate()
        finally:
            for hook in hooks:
                hook.remove()
            for name, parameter in self.student.named_parameters():
                parameter.requires_grad_(flags.get(name, False))
            self.student.train(was_training)
        return ChannelResult(config.channel_steps, len(self.pairs), before, after)
