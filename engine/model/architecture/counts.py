"""Parameter counts per part of a model, and a before/after table for the command line.

Every unique parameter tensor is counted exactly once, in the first part that claims it, in
this order: embeddings (token and position), the language-model head, the final norm, then per
decoder layer the head gates (parameters named ``contribution`` in the attention's output
slot), the attention (query/key/value/output projections with their biases), the MLP or the
memory layer in its place, the norms and anything else in the block; then a layerwise feedback
module (``model.mindset_feedback``) and finally whatever is left (``other``). Tied weights are
one tensor: a head tied to the token embedding counts 0, and tensors that share storage count
once, so :attr:`PartCounts.total` is the model's true parameter count.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from engine.model.anatomy import decoder_layers, mlp_of, unwrap
from engine.model.architecture.attention import attention_of, output_slot
from engine.model.memory_trace import final_norm
from engine.model.surgery import memory_layers

FEEDBACK_ATTRIBUTE = "mindset_feedback"
POSITION_NAMES = ("wpe", "embed_positions")
LAYER_PARTS = ("attention", "mlp", "memory", "norms", "head_gates", "other")


@dataclass
class LayerCounts:
    """Parameters of one decoder layer, by part (``mlp`` or ``memory`` is 0)."""

    attention: int = 0
    mlp: int = 0
    memory: int = 0
    norms: int = 0
    head_gates: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, part) for part in LAYER_PARTS)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


@dataclass
class PartCounts:
    """Parameters of a whole model, by part; ``total`` is the sum of every unique tensor."""

    embeddings: int = 0
    lm_head: int = 0
    final_norm: int = 0
    feedback: int = 0
    other: int = 0
    layers: list[LayerCounts] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (self.embeddings + self.lm_head + self.final_norm + self.feedback + self.other
                + sum(layer.total for layer in self.layers))

    def layer_part(self, part: str) -> int:
        """``part`` summed over every layer."""
        return sum(getattr(layer, part) for layer in self.layers)

    def as_dict(self) -> dict[str, Any]:
        return {"embeddings": self.embeddings, "lm_head": self.lm_head,
                "final_norm": self.final_norm, "feedback": self.feedback, "other": self.other,
                "layers": [layer.as_dict() for layer in self.layers], "total": self.total}


def _key(parameter: nn.Parameter) -> Any:
    """One key per tensor: tied weights are one object, or share storage at one offset."""
    if parameter.is_meta:
        return id(parameter)
    return (parameter.device.type, parameter.untyped_storage().data_ptr(),
            parameter.storage_offset(), tuple(parameter.shape), parameter.stride())


class _Ledger:
    """Hands out each tensor's size once: the first part to claim it keeps it."""

    def __init__(self) -> None:
        self.seen: set[Any] = set()

    def claim(self, parameters: Iterable[nn.Parameter]) -> int:
        count = 0
        for parameter in parameters:
            key = _key(parameter)
            if key not in self.seen:
                self.seen.add(key)
                count += parameter.numel()
        return count


def _module_parameters(module: Any) -> Iterator[nn.Parameter]:
    if isinstance(module, nn.Module):
        yield from module.parameters()


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def _layer_counts(model: nn.Module, index: int, block: nn.Module, memories: set[int],
                  ledger: _Ledger) -> LayerCounts:
    counts = LayerCounts()
    attention = attention_of(model, index)
    gates = [p for name, p in output_slot(model, index).named_parameters()
             if name.rsplit(".", 1)[-1] == "contribution"]
    counts.head_gates = ledger.claim(gates)
    counts.attention = ledger.claim(attention.parameters())
    mlp = mlp_of(model, index)
    if index in memories:
        counts.memory = ledger.claim(mlp.parameters())
    else:
        counts.mlp = ledger.claim(mlp.parameters())
    norms = [m for m in block.modules() if _is_norm(m)]
    counts.norms = ledger.claim(p for m in norms for p in m.parameters(recurse=False))
    counts.other = ledger.claim(block.parameters())
    return counts


def parameter_counts(model: Any) -> PartCounts:
    """How many parameters each part of ``model`` (a model or ``LoadedModel``) holds."""
    module = unwrap(model)
    blocks = decoder_layers(module)
    ledger = _Ledger()
    counts = PartCounts()
    get_input: Any = getattr(module, "get_input_embeddings", None)
    get_output: Any = getattr(module, "get_output_embeddings", None)
    base = getattr(module, "base_model", module)
    positions = [getattr(base, name, None) for name in POSITION_NAMES]
    embedded = [get_input() if get_input else None, *positions]
    counts.embeddings = ledger.claim(p for m in embedded for p in _module_parameters(m))
    counts.lm_head = ledger.claim(_module_parameters(get_output() if get_output else None))
    counts.final_norm = ledger.claim(final_norm(module).parameters())
    memories = set(memory_layers(module))
    counts.layers = [_layer_counts(module, i, block, memories, ledger)
                     for i, block in enumerate(blocks)]
    counts.feedback = ledger.claim(_module_parameters(getattr(module, FEEDBACK_ATTRIBUTE, None)))
    counts.other = ledger.claim(module.parameters())
    return counts


# --- a before/after table -------------------------------------------------------------------


def _change(before: int, after: int) -> str:
    delta = after - before
    if delta == 0:
        return "no change"
    text = f"{delta:+,}"
    return f"{text}, {100 * delta / before:+.1f}%" if before else text


def _row(label: str, before: int, after: int, width: int) -> str:
    return f"{label:<{width}} {before:>14,} → {after:>14,}  ({_change(before, after)})"


MODEL_PARTS = (("embeddings", "embeddings"), ("lm head", "lm_head"),
               ("final norm", "final_norm"), ("feedback", "feedback"), ("other", "other"))
PART_LABELS = {"attention": "attention", "mlp": "mlp", "memory": "memory layers",
               "norms": "layer norms", "head_gates": "head gates", "other": "layer other"}


def format_counts(before: PartCounts, after: PartCounts) -> list[str]:
    """Lines for a command line: each part before → after with its change, then each layer
    that changed (and how), then the total. Parts empty on both sides are left out."""
    rows: list[tuple[str, int, int]] = []
    for label, name in MODEL_PARTS:
        rows.append((label, getattr(before, name), getattr(after, name)))
    for part in LAYER_PARTS:
        rows.append((f"{PART_LABELS[part]} (all layers)", before.layer_part(part),
                     after.layer_part(part)))
    rows = [row for row in rows if row[1] or row[2]]
    width = max(len(label) for label, _, _ in [*rows, ("total", 0, 0)])
    lines = [_row(label, old, new, width) for label, old, new in rows]
    empty = LayerCounts()
    for index in range(max(len(before.layers), len(after.layers))):
        old = before.layers[index] if index < len(before.layers) else empty
        new = after.layers[index] if index < len(after.layers) else empty
        if old == new:
            continue
        label = ("new" if index >= len(before.layers) else
                 "removed" if index >= len(after.layers) else "")
        parts = ", ".join(f"{PART_LABELS[p]} {getattr(new, p) - getattr(old, p):+,}"
                          for p in LAYER_PARTS if getattr(new, p) != getattr(old, p))
        suffix = f" [{label}]" if label else ""
        lines.append(f"  layer {index}{suffix}: {old.total:,} → {new.total:,} ({parts})")
    lines.append(_row("total", before.total, after.total, width))
    return lines
