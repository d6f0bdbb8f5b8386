"""What a model uses: head importance, MLP neuron usage and memory-slot reads on calibration text.

**Head importance** (Michel, Levy & Neubig, "Are Sixteen Heads Really Better than One?",
2019). Every head ``h`` of every layer gets a mask variable ``ξ_h = 1`` that multiplies its
output before the output projection mixes the heads, so the model computes exactly what it
did. Its importance is the expected sensitivity of the loss to that mask,

    I_h = E_x | ∂L(x) / ∂ξ_h |,

with ``L`` the causal-LM cross-entropy of a batch of calibration rows; the expectation is the
mean over batches of ``batch_size`` rows (each batch weighted by its rows). Since
``∂L/∂ξ_h = Σ_tokens (∂L/∂head_h) · head_h``, this is the first-order (Taylor) estimate of how
much the loss moves when the head is removed: a head whose output cannot reach the residual
stream (zero output-projection columns) scores exactly 0. As in the paper, scores are then
normalised per layer by their L2 norm, which makes layers comparable for a global ranking;
both the raw and the normalised scores are kept.

**Neuron usage**: per dense MLP neuron (the input of the down projection), the mean
``|activation|`` over calibration tokens and the share of tokens where ``|activation|`` exceeds
a small threshold. **Slot usage**: per memory slot (or associative entry), how many tokens
read it, as the memory layers themselves record their reads (:mod:`engine.model.memory_trace`).

Nothing here changes the model: mask hooks are removed, ``requires_grad`` flags and
train/eval modes are restored, and associative memories neither insert entries nor update
their read statistics while the calibration text runs.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import decoder_layers, family_of, mlp_of, unwrap
from engine.model.architecture.attention import attention_shape, output_projection, output_slot
from engine.model.memory_layers.associative import AssociativeMemory
from engine.model.memory_layers.featural import FeaturalMemory
from engine.model.memory_trace import memory_trace
from engine.model.surgery import memory_layers

ACTIVE_THRESHOLD = 1e-3  # |activation| above this counts as the neuron being used
RARE_SHARE = 0.01  # a neuron active on fewer tokens than this is "rarely active"
TOP_SLOTS = 10


# --- checks and a model left as it was ------------------------------------------------------


def _check_ids(model: nn.Module, ids: Any, min_tokens: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.is_floating_point() \
            or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError("calibration ids must be an integer tensor [batch, tokens]")
    if ids.shape[0] < 1 or ids.shape[1] < min_tokens:
        raise InputError(f"calibration ids {list(ids.shape)} are too short; give at least one "
                         f"row of {min_tokens} or more tokens")
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if int(ids.min()) < 0 or (vocab and int(ids.max()) >= vocab):
        raise InputError(f"calibration ids must lie in the vocabulary (0..{vocab - 1}); "
                         "tokenize with the model's own tokenizer")
    return ids.long()


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name}={value!r} must be a positive integer")
    return value


def _batches(ids: torch.Tensor, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
    for start in range(0, ids.shape[0], batch_size):
        yield ids[start:start + batch_size].to(device)


@contextmanager
def _untouched(model: nn.Module, *, freeze: bool) -> Iterator[None]:
    """Eval mode, optionally every parameter frozen, associative memories kept still (no
    inserts, no read statistics); all of it restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    saved = []
    for m in model.modules():
        if isinstance(m, AssociativeMemory):
            cache = m.cache
            saved.append((m, m.config, m.counting, cache.clock, cache.crf.copy(),
                          cache.last_tick.copy(), cache.hits.copy()))
            m.config = dataclasses.replace(m.config, insert="never")
            m.counting = False
    try:
        model.eval()
        if freeze:
            for p, _ in flags:
                p.requires_grad_(False)
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, config, counting, clock, crf, last_tick, hits in saved:
            m.config, m.counting = config, counting
            m.cache.clock, m.cache.crf, m.cache.last_tick, m.cache.hits = clock, crf, \
                last_tick, hits


# --- head importance ------------------------------------------------------------------------


@dataclass
class HeadImportance:
    """Per layer, per head: raw ``E|∂L/∂ξ_h|``, the per-layer L2-normalised score, and the
    gate value ``sigmoid(contribution)`` where the layer has head gates (None otherwise)."""

    raw: list[list[float]]
    normalised: list[list[float]]
    gates: list[list[float] | None]
    loss: float  # mean calibration loss
    rows: int

    def ranked(self) -> list[tuple[int, int, float]]:
        """Every (layer, head, normalised score), least important first."""
        entries = [(layer, head, score) for layer, scores in enumerate(self.normalised)
                   for head, score in enumerate(scores)]
        return sorted(entries, key=lambda e: (e[2], e[0], e[1]))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mask_hook(mask: torch.Tensor, heads: int) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        shaped = x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)
        return ((shaped * mask.to(x.dtype)[:, None]).reshape(x.shape), *args[1:])

    return hook


def layer_gates(model: Any, layer: int) -> list[float] | None:
    """``sigmoid(contribution)`` per head when ``layer`` has head gates, else None."""
    slot = output_slot(model, layer)
    contribution = getattr(slot, "contribution", None)
    if slot is output_projection(model, layer) or not isinstance(contribution, torch.Tensor):
        return None
    return [float(v) for v in torch.sigmoid(contribution.detach().float()).tolist()]


def head_importance(model: Any, calibration_ids: torch.Tensor, *, batch_size: int = 4
                    ) -> HeadImportance:
    """Michel et al.'s head importance of every head on ``calibration_ids`` [batch, tokens]."""
    module = unwrap(model)
    family_of(module)
    ids = _check_ids(module, calibration_ids, min_tokens=2)
    _check_positive("batch_size", batch_size)
    count = len(decoder_layers(module))
    shapes = [attention_shape(module, layer) for layer in range(count)]
    device = next(module.parameters()).device
    masks = [torch.ones(s.heads, device=device, requires_grad=True) for s in shapes]
    totals = [torch.zeros(s.heads, dtype=torch.float64) for s in shapes]
    loss_sum = 0.0
    with _untouched(module, freeze=True):
        handles = [output_slot(module, layer).register_forward_pre_hook(
            _mask_hook(mask, shapes[layer].heads)) for layer, mask in enumerate(masks)]
        try:
            with torch.enable_grad():
                for batch in _batches(ids, batch_size, device):
                    loss = module(input_ids=batch, labels=batch, use_cache=False).loss
                    grads = torch.autograd.grad(loss, masks, allow_unused=True)
                    for total, grad in zip(totals, grads, strict=True):
                        if grad is not None:
                            total += grad.detach().abs().double().cpu() * batch.shape[0]
                    loss_sum += float(loss.detach()) * batch.shape[0]
        finally:
            for handle in handles:
                handle.remove()
    raw = [total / ids.shape[0] for total in totals]
    normalised = [scores / (scores.norm(p=2) + 1e-20) for scores in raw]
    return HeadImportance([r.tolist() for r in raw], [n.tolist() for n in normalised],
                          [layer_gates(module, layer) for layer in range(count)],
                          loss_sum / ids.shape[0], int(ids.shape[0]))


def random_head_order(model: Any, seed: int) -> list[tuple[int, int]]:
    """Every (layer, head) in a random order fixed by ``seed``: a baseline for pruning."""
    module = unwrap(model)
    heads = [(layer, head) for layer in range(len(decoder_layers(module)))
             for head in range(attention_shape(module, layer).heads)]
    random.Random(seed).shuffle(heads)
    return heads


def choose_heads(ranked: Sequence[Sequence[Any]], fraction: float, *, min_per_layer: int = 1
                 ) -> dict[int, list[int]]:
    """``{layer: heads}`` to prune: ``fraction`` of all heads in ``ranked`` (every head of the
    model, least important first: ``(layer, head[, score])``), taken in order, but never a
    layer's last ``min_per_layer`` heads (those candidates are skipped)."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) \
            or not math.isfinite(fraction) or not 0 <= fraction < 1:
        raise InputError(f"fraction={fraction!r} must be in [0, 1): the share of heads to prune")
    _check_positive("min_per_layer", min_per_layer)
    pairs = [(int(entry[0]), int(entry[1])) for entry in ranked]
    if len(set(pairs)) != len(pairs):
        raise InputError("the head ranking names a head twice; give each (layer, head) once")
    sizes: dict[int, int] = {}
    for layer, _ in pairs:
        sizes[layer] = sizes.get(layer, 0) + 1
    target = int(fraction * len(pairs) + 1e-9)
    room = sum(max(0, size - min_per_layer) for size in sizes.values())
    if target > room:
        raise InputError(f"pruning {target} of {len(pairs)} heads would leave a layer fewer "
                         f"than {min_per_layer}; at most {room} can go, give a smaller fraction")
    chosen: dict[int, list[int]] = {}
    picked = 0
    for layer, head in pairs:
        if picked == target:
            break
        taken = chosen.setdefault(layer, [])
        if sizes[layer] - len(taken) > min_per_layer:
            taken.append(head)
            picked += 1
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items()) if heads}


# --- neuron usage ---------------------------------------------------------------------------


@dataclass
class NeuronUsage:
    """One dense MLP's neurons on the calibration tokens."""

    layer: int
    tokens: int
    threshold: float
    mean_abs: list[float]  # mean |activation| per neuron
    active: list[float]  # share of tokens where |activation| > threshold

    @property
    def neurons(self) -> int:
        return len(self.mean_abs)

    def never_active(self) -> list[int]:
        return [i for i, share in enumerate(self.active) if share == 0.0]

    def summary(self) -> dict[str, Any]:
        rare = sum(1 for share in self.active if share < RARE_SHARE)
        return {"layer": self.layer, "neurons": self.neurons, "tokens": self.tokens,
                "never_active_share": len(self.never_active()) / max(1, self.neurons),
                "rarely_active_share": rare / max(1, self.neurons),
                "mean_active_share": sum(self.active) / max(1, self.neurons),
                "mean_abs": sum(self.mean_abs) / max(1, self.neurons)}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


def _down_projection(model: nn.Module, layer: int) -> nn.Module | None:
    """The dense MLP's down projection, whose input is the neurons' activations."""
    name = "c_proj" if family_of(model) == "gpt2" else "down_proj"
    down = getattr(mlp_of(model, layer), name, None)
    return down if isinstance(down, nn.Module) else None


@torch.no_grad()
def mlp_usage(model: Any, calibration_ids: torch.Tensor, *, batch_size: int = 4,
              threshold: float = ACTIVE_THRESHOLD) -> dict[int, NeuronUsage]:
    """Per dense-MLP layer: each neuron's mean |activation| and share of active tokens."""
    module = unwrap(model)
    ids = _check_ids(module, calibration_ids, min_tokens=1)
    _check_positive("batch_size", batch_size)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) \
            or not math.isfinite(threshold) or threshold < 0:
        raise InputError(f"threshold={threshold!r} must be a number >= 0")
    memories = set(memory_layers(module))
    downs = {layer: down for layer in range(len(decoder_layers(module)))
             if layer not in memories and (down := _down_projection(module, layer)) is not None}
    if not downs:
        raise InputError("the model has no dense MLP layers to measure")
    sums: dict[int, torch.Tensor] = {}
    active: dict[int, torch.Tensor] = {}

    def hook_for(layer: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            a = args[0].detach().reshape(-1, args[0].shape[-1]).abs().double().cpu()
            sums[layer] = sums.get(layer, 0) + a.sum(0)
            active[layer] = active.get(layer, 0) + (a > threshold).sum(0).double()
        return hook

    tokens = int(ids.numel())
    with _untouched(module, freeze=False):
        handles = [down.register_forward_pre_hook(hook_for(layer)) for layer, down in downs.items()]
        try:
            for batch in _batches(ids, batch_size, next(module.parameters()).device):
                module(input_ids=batch, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    return {layer: NeuronUsage(layer, tokens, float(threshold), (sums[layer] / tokens).tolist(),
                               (active[layer] / tokens).tolist()) for layer in downs}


# --- memory slot usage ----------------------------------------------------------------------


@dataclass
class SlotUsage:
    """How often each slot (featural) or stored entry (associative) of a memory layer was read
    on the calibration tokens, and the summed |weight| of those reads."""

    layer: int
    kind: str  # "featural" or "associative"
    tokens: int
    reads: list[int]
    mass: list[float]

    @property
    def slots(self) -> int:
        return len(self.reads)

    @property
    def total_reads(self) -> int:
        return sum(self.reads)

    def never_read_share(self) -> float:
        return sum(1 for n in self.reads if n == 0) / self.slots if self.slots else 0.0

    def top(self, k: int = TOP_SLOTS) -> list[tuple[int, int]]:
        """The ``k`` most-read (slot, reads), most first."""
        order = sorted(range(self.slots), key=lambda i: (-self.reads[i], i))
        return [(i, self.reads[i]) for i in order[:k]]

    def summary(self, k: int = TOP_SLOTS) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "slots": self.slots,
                "tokens": self.tokens, "reads": self.total_reads,
                "never_read_share": self.never_read_share(), "top": self.top(k)}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "summary": self.summary()}


def _featural_reads(memory: FeaturalMemory, reads: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots read and their weights, flat; fact-group fillers (weight 0) are not reads."""
    slots, weights = reads.slots, reads.weights
    keep = torch.ones_like(slots, dtype=torch.bool)
    routed = memory.routed
    if routed is not None and routed.fact_groups:
        regular = slots.shape[1] - routed.fact_groups * routed.group_size
        keep[:, regular:] = weights[:, regular:] != 0
    return slots[keep], weights[keep]


@torch.no_grad()
def memory_usage(model: Any, calibration_ids: torch.Tensor, *, batch_size: int = 4
                 ) -> dict[int, SlotUsage]:
    """Per memory layer of a student: reads per slot (or entry) on ``calibration_ids``."""
    module = unwrap(model)
    modules = memory_layers(module)
    if not modules:
        raise InputError("this model has no memory layers; measure a student")
    ids = _check_ids(module, calibration_ids, min_tokens=1)
    _check_positive("batch_size", batch_size)
    sizes = {layer: m.num_slots if isinstance(m, FeaturalMemory)
             else len(m.cache) if isinstance(m, AssociativeMemory) else 0
             for layer, m in modules.items()}
    reads = {layer: torch.zeros(size, dtype=torch.long) for layer, size in sizes.items()}
    mass = {layer: torch.zeros(size, dtype=torch.float64) for layer, size in sizes.items()}
    with _untouched(module, freeze=False), memory_trace(module) as recorded:
        for batch in _batches(ids, batch_size, next(module.parameters()).device):
            module(input_ids=batch, use_cache=False)
            for layer, memory in modules.items():
                for read in recorded[layer]:
                    if isinstance(memory, FeaturalMemory):
                        slots, weights = _featural_reads(memory, read)
                    else:
                        slots, weights = read[0].reshape(-1), read[1].reshape(-1)
                    slots = slots.cpu()
                    reads[layer].index_add_(0, slots, torch.ones_like(slots))
                    mass[layer].index_add_(0, slots, weights.abs().double().cpu())
                recorded[layer].clear()
    kinds = {layer: "featural" if isinstance(m, FeaturalMemory) else "associative"
             for layer, m in modules.items()}
    return {layer: SlotUsage(layer, kinds[layer], int(ids.numel()), reads[layer].tolist(),
                             mass[layer].tolist()) for layer in modules}
