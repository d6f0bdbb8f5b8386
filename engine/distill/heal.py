"""Prune, then heal: a short distillation from the original model into a reshaped one.

Architecture surgery (pruned heads or neurons, inserted gates or feedback) leaves a model that
is close to the original but not equal to it. Healing trains the changed model, the student,
to match the original, the teacher, on text: the loss is the knowledge-distillation loss of
:func:`engine.distill.objective.kd_loss`,

    L = T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T))   (mean over tokens)

plus, when head gates train, an optional sparsity penalty λ · mean_h sigmoid(c_h) over every
gate's ``contribution`` c_h (gate value sigmoid(c_h)), which pushes heads the teacher's
distributions do not need towards off. Only the parameters of the chosen set train (AdamW,
warmup then a cosine decay); the rest are frozen for the run and their ``requires_grad``
flags restored after it. Batches come from :class:`engine.distill.data.BlockOrder` and the
random generators are seeded, so the same seed and blocks give bit-identical weights.

Which parameters a train set names:

* ``all``: every parameter; ``all-but-embeddings``: all but those of the token and position
  embeddings and the output embeddings (the LM head, usually tied to the token embeddings).
* ``attention``: the decoder layers' attention modules, head gates included (they wrap the
  output projection inside the attention module).
* ``gates``: parameters named ``contribution`` (head gates).
* ``feedback``: parameters with ``feedback`` in a component of their name (feedback modules
  are attached under such a name).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from engine.distill.config import MAX_SEED, MAX_STEPS
from engine.distill.data import BlockOrder, pack, token_stream
from engine.distill.objective import (
    NonFiniteLossError,
    Optimizers,
    clip_gradients,
    kd_loss,
    lr_factor,
    sparse_gradient_names,
)
from engine.distill.report import model_logits, next_token_nll
from engine.errors import InputError
from engine.evaluation import MAX_LOG_PPL, model_context
from engine.model.anatomy import decoder_layers, unwrap
from engine.model.architecture.attention import attention_of

TRAIN_SETS = ("all", "attention", "gates", "feedback", "all-but-embeddings")
GATE_PARAMETER = "contribution"
MIN_LR_RATIO = 0.1  # the cosine decay ends at a tenth of the peak learning rate
SMOOTHING = 10  # first/last loss: the mean over up to this many steps at each end


@dataclass
class HealConfig:
    """The settings of one healing run."""

    steps: int = 100
    # High for weights that are already trained (fine-tuning usually takes 1e-5..1e-4), as a
    # short heal needs; it is half distillation's default, DistillConfig.lr = 1e-3, which is
    # meant for memory layers that start from scratch (their values at 10x that).
    lr: float = 5e-4
    batch_size: int = 8
    block_size: int = 128  # tokens per block; the blocks given to heal() must match it
    temperature: float = 1.0
    train: str = "all"  # one of TRAIN_SETS
    gate_sparsity: float = 0.0  # λ of the gate penalty λ · mean(sigmoid(contribution))
    seed: int = 0
    warmup: int = 10  # steps of linear warmup before the cosine decay
    clip_norm: float = 1.0  # global gradient norm; 0 = no clipping

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, model: Any | None = None) -> None:
        """Check the settings; given the student, also that the chosen set has parameters."""
        self._check_types()
        for name in ("steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive (got {getattr(self, name)})")
        if self.steps > MAX_STEPS:
            raise InputError(f"steps={self.steps} is more than {MAX_STEPS:,}; give a realistic "
                             "number of steps")
        if self.block_size < 2:
            raise InputError(f"block_size must be at least 2 tokens (got {self.block_size})")
        if not self.lr > 0:
            raise InputError(f"lr must be positive (got {self.lr})")
        if not self.temperature > 0:
            raise InputError(f"temperature must be positive (got {self.temperature})")
        if self.clip_norm < 0 or self.gate_sparsity < 0:
            raise InputError("clip_norm and gate_sparsity must not be negative")
        if not 0 <= self.warmup <= self.steps:
            raise InputError(f"warmup={self.warmup} must be within 0..steps ({self.steps}); "
                             "give fewer warmup steps")
        if not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed={self.seed} must be within 0..{MAX_SEED}")
        if self.train not in TRAIN_SETS:
            raise InputError(f"unknown train set {self.train!r}; give one of "
                             f"{', '.join(TRAIN_SETS)}")
        if model is not None:
            self._check_model(unwrap(model))

    def _check_types(self) -> None:
        # A config read from JSON may hold anything, and nan passes every range check.
        for item in fields(self):
            value, kind = getattr(self, item.name), str(item.type)
            if kind == "int":
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif kind == "float":
                ok = (isinstance(value, int | float) and not isinstance(value, bool)
                      and math.isfinite(value))
            else:
                ok = isinstance(value, str)
            if not ok:
                word = {"int": "an integer", "float": "a finite number"}.get(kind, "text")
                raise InputError(f"{item.name}={value!r} must be {word}")

    def _check_model(self, model: nn.Module) -> None:
        context = model_context(model)
        if context is not None and self.block_size > context:
            raise InputError(f"block_size {self.block_size} exceeds the model's context of "
                             f"{context} tokens; give a smaller block size")
        chosen = trainable_parameters(model, self.train)
        if not chosen:
            raise InputError(f"nothing to train for train={self.train!r}: the model has "
                             f"{MISSING[self.train]}; choose another train set")
        if self.gate_sparsity > 0:
            chosen_ids = {id(p) for p in chosen}
            gates = gate_parameters(model)
            if not gates:
                raise InputError("gate_sparsity needs head gates and the model has none; "
                                 "insert gates first or set gate_sparsity to 0")
            if not all(id(g) in chosen_ids for g in gates):
                raise InputError(f"gate_sparsity needs the head gates to train, and train="
                                 f"{self.train!r} leaves them frozen; train 'gates', "
                                 "'attention' or 'all', or set gate_sparsity to 0")


MISSING = {
    "all": "no parameters", "all-but-embeddings": "no parameters outside its embeddings",
    "attention": "no attention parameters", "gates": "no head gates (insert gates first)",
    "feedback": "no feedback parameters (add feedback first)",
}


@dataclass
class HealProgress:
    """One step done: ``step`` of ``total`` (1-based), its distillation loss, gate penalty
    (λ · mean gate, 0 without one), learning rate and gradient norm before clipping."""

    step: int
    total: int
    loss: float
    gate_penalty: float
    lr: float
    grad_norm: float


@dataclass
class HealReport:
    steps: int  # steps done
    total_steps: int
    stopped_early: bool  # should_stop() asked to stop before ``total_steps``
    first_loss: float | None  # mean distillation loss of the first steps (None: no step)
    last_loss: float | None  # ... and of the last steps
    seconds: float
    trainable_parameters: int
    train: str
    gate_mean: float | None  # mean sigmoid(contribution) at the end; None without gates

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- which parameters train ----------------------------------------------------------------


def gate_parameters(model: Any) -> list[nn.Parameter]:
    """Every head gate's ``contribution`` parameter."""
    return [p for name, p in unwrap(model).named_parameters()
            if name.rsplit(".", 1)[-1] == GATE_PARAMETER]


def _embedding_ids(model: nn.Module) -> set[int]:
    ids = {id(p) for module in model.modules() if isinstance(module, nn.Embedding)
           for p in module.parameters()}
    get_output: Any = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if isinstance(head, nn.Module):
        ids |= {id(p) for p in head.parameters()}
    return ids


def trainable_parameters(model: Any, train: str) -> list[nn.Parameter]:
    """The parameters of ``model`` that the train set ``train`` names (see the module doc)."""
    model = unwrap(model)
    named = list(model.named_parameters())
    if train == "all":
        return [p for _, p in named]
    if train == "gates":
        return gate_parameters(model)
    if train == "feedback":
        return [p for name, p in named
                if any("feedback" in part for part in name.split("."))]
    if train == "attention":
        ids = {id(p) for layer in range(len(decoder_layers(model)))
               for p in attention_of(model, layer).parameters()}
        return [p for _, p in named if id(p) in ids]
    if train == "all-but-embeddings":
        excluded = _embedding_ids(model)
        return [p for _, p in named if id(p) not in excluded]
    raise InputError(f"unknown train set {train!r}; give one of {', '.join(TRAIN_SETS)}")


def gate_mean(gates: list[nn.Parameter]) -> torch.Tensor:
    """The mean gate value sigmoid(contribution) over every head of every gate."""
    return torch.cat([torch.sigmoid(g.float()).reshape(-1) for g in gates]).mean()


# --- healing -------------------------------------------------------------------------------


def _vocab_size(model: nn.Module) -> int | None:
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return value if isinstance(value, int) else None


def check_blocks(blocks: Any, *, block_size: int | None = None,
                 models: tuple[nn.Module, ...] = ()) -> torch.Tensor:
    """``blocks`` as a [N, block_size] long tensor of token ids the models know."""
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.dtype.is_floating_point:
        raise InputError("blocks must be a [blocks, block_size] tensor of token ids")
    if blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise InputError(f"blocks has shape {list(blocks.shape)}; give at least one block of "
                         "two or more tokens")
    if block_size is not None and blocks.shape[1] != block_size:
        raise InputError(f"the blocks have {blocks.shape[1]} tokens but block_size is "
                         f"{block_size}; make the blocks with the same block size")
    low, high = int(blocks.min()), int(blocks.max())
    if low < 0:
        raise InputError(f"the blocks hold a negative token id ({low}); tokenise with the "
                         "model's tokenizer")
    for model in models:
        vocab = _vocab_size(model)
        if vocab is not None and high >= vocab:
            raise InputError(f"the blocks hold token ids {low}..{high}, outside the model's "
                             f"vocabulary of {vocab}; tokenise with the model's tokenizer")
    return blocks.long()


def heal(student: Any, teacher: Any, blocks: torch.Tensor, config: HealConfig, *,
         progress: Callable[[HealProgress], None] | None = None,
         should_stop: Callable[[], bool] | None = None) -> HealReport:
    """Train ``student`` in place to match ``teacher``'s next-token distributions on
    ``blocks``; the caller copies the model first. The student ends in eval mode with its
    ``requires_grad`` flags as they were; the teacher is only read."""
    student_model, teacher_model = unwrap(student), unwrap(teacher)
    if student_model is teacher_model:
        raise InputError("the student is the teacher itself; heal a copy of the model")
    config.validate(student_model)
    vocabs = (_vocab_size(student_model), _vocab_size(teacher_model))
    if None not in vocabs and vocabs[0] != vocabs[1]:
        raise InputError(f"the student's vocabulary ({vocabs[0]}) differs from the teacher's "
                         f"({vocabs[1]}); heal from the model it was made from")
    blocks = check_blocks(blocks, block_size=config.block_size,
                          models=(student_model, teacher_model))
    flags = [(p, p.requires_grad) for p in student_model.parameters()]
    teacher_training = teacher_model.training
    try:
        with torch.random.fork_rng(devices=[]):  # seeded dropout, the caller's RNG untouched
            torch.manual_seed(config.seed)
            return _train(student_model, teacher_model, blocks, config, progress, should_stop)
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        student_model.eval()
        teacher_model.train(teacher_training)


def _train(student: nn.Module, teacher: nn.Module, blocks: torch.Tensor, config: HealConfig,
           progress: Callable[[HealProgress], None] | None,
           should_stop: Callable[[], bool] | None) -> HealReport:
    start = time.perf_counter()
    chosen = {id(p) for p in trainable_parameters(student, config.train)}
    for parameter in student.parameters():
        parameter.requires_grad_(id(parameter) in chosen)
    device = next(student.parameters()).device
    teacher_device = next(teacher.parameters()).device
    # Memory layers may read their values with sparse gradients, which AdamW cannot step:
    # one probe finds them and Optimizers gives them SparseAdam (at the same learning rate).
    probe = blocks[:1, : min(8, blocks.shape[1])].to(device)
    student.eval()
    sparse = sparse_gradient_names(
        student, lambda: model_logits(student, probe).float().mean())
    optimizers = Optimizers(student, lr=config.lr, value_lr=config.lr, weight_decay=0.0,
                            sparse_names=sparse)
    gates = gate_parameters(student)
    order = BlockOrder(len(blocks), config.batch_size, config.seed)
    teacher.eval()
    student.train()
    losses: list[float] = []
    stopped = False
    for step in range(config.steps):
        if should_stop is not None and should_stop():
            stopped = True
            break
        factor = lr_factor(step, total=config.steps, warmup=config.warmup, schedule="cosine",
                           min_ratio=MIN_LR_RATIO)
        optimizers.set_lr_factor(factor)
        batch = order.batch(blocks, step)
        with torch.no_grad():
            teacher_logits = model_logits(teacher, batch.to(teacher_device)).to(device)
        student_logits = model_logits(student, batch.to(device))
        kd = kd_loss(student_logits, teacher_logits, config.temperature)
        loss = kd
        penalty = 0.0
        if config.gate_sparsity > 0:
            term = config.gate_sparsity * gate_mean(gates)
            loss = kd + term
            penalty = float(term.detach())
        value = float(loss.detach())
        if not math.isfinite(value):
            # objective.check_finite's message speaks of checkpoints and resuming, which a
            # healing run has none of.
            raise NonFiniteLossError(
                f"the healing loss became {value} at step {step + 1}; healing stopped and the "
                f"student is unusable: lower lr (now {config.lr:g}) or clip_norm and heal a "
                "fresh copy")
        optimizers.zero_grad()
        loss.backward()
        norm = clip_gradients(optimizers.parameters, config.clip_norm)
        optimizers.step()
        losses.append(float(kd.detach()))
        if progress is not None:
            progress(HealProgress(step=step + 1, total=config.steps, loss=losses[-1],
                                  gate_penalty=penalty, lr=config.lr * factor, grad_norm=norm))
    optimizers.zero_grad()  # free the gradients: the student goes back to the caller
    window = max(1, min(SMOOTHING, len(losses) // 2))
    with torch.no_grad():
        final_gates = float(gate_mean(gates)) if gates else None
    return HealReport(
        steps=len(losses), total_steps=config.steps, stopped_early=stopped,
        first_loss=sum(losses[:window]) / window if losses else None,
        last_loss=sum(losses[-window:]) / window if losses else None,
        seconds=time.perf_counter() - start,
        trainable_parameters=sum(p.numel() for p in optimizers.parameters),
        train=config.train, gate_mean=final_gates,
    )


# --- data and evaluation -------------------------------------------------------------------


def heal_blocks(tokenizer: Any, paths: list[str], block_size: int, *,
                limit_blocks: int | None = None) -> torch.Tensor:
    """The text files (or folders) ``paths`` tokenised, joined and packed into a
    [blocks, block_size] tensor; at most the first ``limit_blocks`` blocks."""
    if block_size < 2:
        raise InputError(f"block_size must be at least 2 tokens (got {block_size})")
    if limit_blocks is not None and limit_blocks <= 0:
        raise InputError(f"limit_blocks must be positive (got {limit_blocks})")
    stream = token_stream(paths, tokenizer, cache_dir=None)
    blocks = pack(stream, block_size)
    if len(blocks) == 0:
        raise InputError(f"{', '.join(paths)} holds only {len(stream)} tokens, fewer than one "
                         f"block of {block_size}; give more text or a smaller block size")
    return blocks[:limit_blocks] if limit_blocks is not None else blocks


def held_out_perplexity(model: Any, blocks: torch.Tensor, *, batch_size: int = 8) -> float:
    """exp of the mean next-token cross-entropy of ``model`` over ``blocks`` (no gradients);
    inf for a model so far off that the exponential overflows.

    engine.evaluation.perplexity scores a text, not token blocks; this one sums with the
    helpers of engine.distill.report (as its ``heldout_ppl`` does) and keeps the model's mode.
    """
    model = unwrap(model)
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive (got {batch_size})")
    blocks = check_blocks(blocks, models=(model,))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for first in range(0, len(blocks), batch_size):
                chunk = blocks[first : first + batch_size].to(device)
                nll, n = next_token_nll(model_logits(model, chunk), chunk)
                total, count = total + nll, count + n
    finally:
        model.train(was_training)
    mean = total / count
    if math.isnan(mean):
        return math.nan
    return math.exp(mean) if mean < MAX_LOG_PPL else math.inf
