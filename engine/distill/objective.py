"""What the student is trained to minimise, and how its parameters are stepped.

* End to end: KL(teacher ‖ student) over the vocabulary at temperature T, scaled by T² so the
  gradient size does not depend on T (Hinton et al. 2015), plus an optional cross-entropy of
  the student on the text itself.
* Layer-local (an optional first stage): each replaced layer's output is matched to the
  teacher's MLP output on the teacher's own MLP input (teacher-forced), captured with forward
  hooks (:func:`engine.model.anatomy.capture_mlps`). The layers train in parallel from one
  teacher forward pass and do not compound errors.
* Parameters: the memory value tables get their own learning rate (10x by default, as in
  Memory Layers at Scale); parameters whose gradients are sparse (values read with
  ``embedding_bag(sparse=True)``) are stepped by ``SparseAdam``, the rest by ``AdamW``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import MindsetError


class NonFiniteLossError(MindsetError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) at ``temperature``, times temperature²."""
    vocab = student_logits.shape[-1]
    log_student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def ce_loss(student_logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the student on the block itself."""
    vocab = student_logits.shape[-1]
    return F.cross_entropy(
        student_logits[:, :-1].float().reshape(-1, vocab), input_ids[:, 1:].reshape(-1)
    )


class LocalMatcher(nn.Module):
    """The replaced layers side by side: the mean over layers of each layer's relative MSE.

    Relative (divided by the target's mean square) so layers with large outputs, such as the
    first and last, do not drown the others. A module of its own so DistributedDataParallel
    can wrap it in the layer-local stage.
    """

    def __init__(self, memories: dict[int, nn.Module]) -> None:
        super().__init__()
        self.order = sorted(memories)
        self.memories = nn.ModuleList([memories[i] for i in self.order])

    def forward(self, inputs: dict[int, torch.Tensor],
                targets: dict[int, torch.Tensor]) -> torch.Tensor:
        losses = []
        for index, memory in zip(self.order, self.memories, strict=True):
            target = targets[index].float()
            predicted = memory(inputs[index]).float()
            scale = target.pow(2).mean().clamp_min(1e-8)
            losses.append(F.mse_loss(predicted, target) / scale)
        return torch.stack(losses).mean()


def is_value_parameter(name: str) -> bool:
    """Memory value tables, which train with their own (higher) learning rate."""
    leaf = name.rsplit(".", 1)[-1]
    return "value" in leaf


def sparse_gradient_names(model: nn.Module, probe: Any) -> set[str]:
    """Names of the trainable parameters whose gradients come out sparse, found by one probe.

    ``probe()`` runs a small forward pass and returns a scalar; its gradients are discarded.
    """
    loss = probe()
    loss.backward()
    names = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.is_sparse}
    for parameter in model.parameters():
        parameter.grad = None
    return names


class Optimizers:
    """AdamW for dense parameters and SparseAdam for sparse ones, stepped together."""

    def __init__(self, model: nn.Module, *, lr: float, value_lr: float, weight_decay: float,
                 sparse_names: set[str], allow_none: bool = False) -> None:
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        self.parameters: list[nn.Parameter] = []
        for name, parameter in model.named_parameters():
            if not parameter.requires_grad:
                continue
            self.parameters.append(parameter)
            key = (name in sparse_names, is_value_parameter(name))
            groups.setdefault(key, []).append(parameter)
        if not self.parameters and not allow_none:
            raise MindsetError("the student has no trainable parameters; choose layers to replace")
        dense = [
            {"params": params, "lr": value_lr if is_value else lr,
             "base_lr": value_lr if is_value else lr}
            for (is_sparse, is_value), params in sorted(groups.items()) if not is_sparse
        ]
        sparse = [
            {"params": params, "lr": value_lr if is_value else lr,
             "base_lr": value_lr if is_value else lr}
            for (is_sparse, is_value), params in sorted(groups.items()) if is_sparse
        ]
        self.all: list[torch.optim.Optimizer] = []
        if dense:
            self.all.append(torch.optim.AdamW(dense, weight_decay=weight_decay))
        if sparse:
            self.all.append(torch.optim.SparseAdam(sparse))

    def zero_grad(self) -> None:
        for optimizer in self.all:
            optimizer.zero_grad(set_to_none=True)

    def set_lr_factor(self, factor: float) -> None:
        for optimizer in self.all:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor

    def step(self) -> None:
        for optimizer in self.all:
            optimizer.step()

    def state_dict(self) -> list[dict[str, Any]]:
        return [optimizer.state_dict() for optimizer in self.all]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) != len(self.all):
            raise MindsetError("the checkpoint's optimizer does not match this run; restart it")
        for optimizer, state in zip(self.all, states, strict=True):
            optimizer.load_state_dict(state)


def clip_gradients(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm (sparse gradients included); returns the norm before."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    squares = [
        (g.coalesce().values() if g.is_sparse else g).float().pow(2).sum() for g in grads
    ]
    norm = float(torch.stack(squares).sum().sqrt())
    if max_norm > 0 and math.isfinite(norm) and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for grad in grads:
            grad.mul_(scale)
    return norm


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rates at ``step`` (0-based) of a stage of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_finite(value: float, *, step: int, what: str, last_checkpoint: int | None) -> None:
    if math.isfinite(value):
        return
    kept = (f"the last good checkpoint (step {last_checkpoint}) was kept"
            if last_checkpoint is not None else "no checkpoint had been written yet")
    raise NonFiniteLossError(
        f"the {what} became {value} at step {step}; training stopped and {kept}: "
        "lower the learning rate (--lr, --value-lr) or the clip norm and resume"
    )
