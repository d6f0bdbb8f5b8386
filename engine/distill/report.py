"""How close the student got: held-out perplexities, gap closed, KL and top-1 agreement."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine.model.anatomy import zeroed_mlps_hooks


def next_token_nll(logits: torch.Tensor, blocks: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of tokens predicted."""
    vocab = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, vocab), blocks[:, 1:].reshape(-1), reduction="sum"
    )
    return float(loss), int(blocks[:, 1:].numel())


def model_logits(model: nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    output: Any = model(input_ids=blocks)
    logits: torch.Tensor = output.logits
    return logits


def heldout_ppl(model: nn.Module, blocks: torch.Tensor, *, batch: int = 2) -> float:
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(blocks), batch):
            chunk = blocks[start : start + batch]
            nll, n = next_token_nll(model_logits(model, chunk), chunk)
            total, count = total + nll, count + n
    model.train(was_training)
    return math.exp(total / max(1, count))


def gap_closed(ppl_zeroed: float, ppl_student: float, ppl_teacher: float) -> float:
    """(ppl_zeroed - ppl_student) / (ppl_zeroed - ppl_teacher): 1 = as good as the teacher."""
    denominator = ppl_zeroed - ppl_teacher
    if not math.isfinite(denominator) or abs(denominator) < 1e-12:
        return float("nan")
    return (ppl_zeroed - ppl_student) / denominator


def compare(student: nn.Module, teacher: nn.Module, blocks: torch.Tensor, layers: list[int],
            *, batch: int = 2) -> dict[str, Any]:
    """Teacher, student and zeroed-MLP perplexities, KL(teacher ‖ student) and agreement."""
    sums = {"teacher": 0.0, "student": 0.0, "zeroed": 0.0, "kl": 0.0, "agree": 0.0}
    predicted = positions = 0
    student_training = student.training
    student.eval()
    with torch.inference_mode():
        for start in range(0, len(blocks), batch):
            chunk = blocks[start : start + batch]
            teacher_logits = model_logits(teacher, chunk).float()
            student_logits = model_logits(student, chunk).float()
            hooks = zeroed_mlps_hooks(teacher, layers)
            try:
                zeroed_logits = model_logits(teacher, chunk)
            finally:
                for hook in hooks:
                    hook.remove()
            for name, logits in (("teacher", teacher_logits), ("student", student_logits),
                                 ("zeroed", zeroed_logits)):
                nll, n = next_token_nll(logits, chunk)
                sums[name] += nll
            predicted += n
            log_t = torch.log_softmax(teacher_logits, dim=-1)
            log_s = torch.log_softmax(student_logits, dim=-1)
            sums["kl"] += float((log_t.exp() * (log_t - log_s)).sum())
            sums["agree"] += float(
                (teacher_logits.argmax(-1) == student_logits.argmax(-1)).sum()
            )
            positions += chunk.numel()
    student.train(student_training)
    ppl = {name: math.exp(min(sums[name] / predicted, 700.0))
           for name in ("teacher", "student", "zeroed")}
    return {
        "ppl_teacher": ppl["teacher"],
        "ppl_student": ppl["student"],
        "ppl_zeroed": ppl["zeroed"],
        "ppl_ratio": ppl["student"] / ppl["teacher"],
        "gap_closed": gap_closed(ppl["zeroed"], ppl["student"], ppl["teacher"]),
        "kl_per_token": sums["kl"] / positions,
        "top1_agreement": sums["agree"] / positions,
        "heldout_tokens": predicted,
    }


def summary_text(report: dict[str, Any]) -> str:
    """The readable version of a run report."""
    def number(key: str, fmt: str = ".4f") -> str:
        value = report.get(key)
        return format(value, fmt) if isinstance(value, int | float) else "n/a"

    lines = [
        f"Distillation run: {report.get('teacher')} -> {report.get('memory')} memory in layers "
        f"{report.get('layers')}",
        f"  state            {report.get('state')} after {report.get('steps_done')} of "
        f"{report.get('total_steps')} steps"
        + (" (nothing to train: the associative recipe starts exact and learns by reading)"
           if report.get("trainable_parameters") == 0 and report.get("memory") == "associative"
           else ""),
        f"  held-out ppl     teacher {number('ppl_teacher')}, student {number('ppl_student')}, "
        f"replaced MLPs zeroed {number('ppl_zeroed', '.4g')}",
        f"  ppl ratio        {number('ppl_ratio')} (student / teacher)",
        f"  gap closed       {number('gap_closed')} (1.0 = as good as the teacher)",
        f"  KL per token     {number('kl_per_token')} nats",
        f"  top-1 agreement  {number('top1_agreement', '.2%')}",
        f"  tokens seen      {report.get('tokens_seen')} "
        f"(held-out tokens scored: {report.get('heldout_tokens')})",
        f"  CPU time         {number('cpu_seconds', '.1f')} s "
        f"(wall {number('wall_seconds', '.1f')} s)",
    ]
    return "\n".join(lines) + "\n"
