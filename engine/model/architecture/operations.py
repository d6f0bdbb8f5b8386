"""Every surgery operation by name, with its parameters checked: one entry point for the CLI
(``mindset model ...``) and the workbench's Model pane.

``run_operation(model, name, params, calibration_ids=...)`` returns an :class:`Outcome`: the
new model (the original is untouched), one line per change, and the parameter counts before
and after. Parameters are plain JSON values, so a form or a command line can fill them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import num_layers, resolve_layers, unwrap
from engine.model.architecture.attention import attention_shape

OPERATIONS: dict[str, str] = {
    "add-gates": "put a learned gate on every head's output (function unchanged)",
    "grow-heads": "add attention heads to a layer (function unchanged)",
    "prune-heads": "remove attention heads, named or the least important",
    "resize": "grow or prune a layer's MLP, or resize its memory layer",
    "drop-layer": "remove a decoder layer",
    "add-layer": "insert an identity-initialised decoder layer (function unchanged)",
    "add-feedback": "feed each layer's output back into the layer below at the next step",
}
PRUNE_ORDERS = ("importance", "random", "gates")


@dataclass
class Outcome:
    model: nn.Module
    changes: list[str]
    before: Any  # PartCounts
    after: Any
    details: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        from engine.model.architecture.counts import format_counts

        return [*self.changes, *format_counts(self.before, self.after)]


def _int(params: dict[str, Any], name: str, default: int | None = None) -> int:
    value = params.get(name, default)
    if value is None:
        raise InputError(f"give {name}")
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value).strip())
        except ValueError:
            raise InputError(f"{name}={value!r} is not a whole number") from None
    return int(value)


def _float(params: dict[str, Any], name: str, default: float) -> float:
    value = params.get(name, default)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}={value!r} is not a number") from None


def _need_calibration(calibration_ids: torch.Tensor | None, what: str) -> torch.Tensor:
    if calibration_ids is None:
        raise InputError(f"{what} needs calibration text to measure importance; give some")
    return calibration_ids


def heads_to_prune(model: nn.Module, params: dict[str, Any],
                   calibration_ids: torch.Tensor | None) -> tuple[dict[int, list[int]], str]:
    """The heads a prune-heads request names: a list, or a fraction in some order."""
    from engine.model.architecture.heads import parse_head_list

    if params.get("heads"):
        named = params["heads"]
        heads = parse_head_list(named) if isinstance(named, str) else {
            int(layer): list(chosen) for layer, chosen in dict(named).items()}
        return heads, "named"
    if params.get("fraction") is None:
        raise InputError("prune-heads needs heads (layer:head pairs) or a fraction")
    fraction = _float(params, "fraction", 0.0)
    order = str(params.get("by", "importance"))
    if order not in PRUNE_ORDERS:
        raise InputError(f"by={order!r}: prune in one of these orders: "
                         f"{', '.join(PRUNE_ORDERS)}")
    from engine.model.architecture.importance import (
        choose_heads,
        head_importance,
        random_head_order,
    )

    ranked: list[tuple[int, int, float]]
    if order == "random":
        ranked = [(layer, head, 0.0) for layer, head in
                  random_head_order(model, _int(params, "seed", 0))]
    elif order == "gates":
        from engine.model.architecture.gates import gate_states

        states = gate_states(model)
        if not states:
            raise InputError("by=gates needs a model with head gates; run add-gates first")
        ranked = sorted(((s.layer, s.head, s.value) for s in states), key=lambda r: r[2])
    else:
        importance = head_importance(model, _need_calibration(calibration_ids, "by=importance"))
        ranked = importance.ranked()
    return choose_heads(ranked, fraction), order


def _prune_heads(model: nn.Module, params: dict[str, Any],
                 calibration_ids: torch.Tensor | None) -> tuple[nn.Module, list[str]]:
    from engine.model.architecture.heads import check_pruning, prune_heads

    heads, order = heads_to_prune(model, params, calibration_ids)
    heads = check_pruning(model, heads)
    result = prune_heads(model, heads)
    total = sum(len(v) for v in heads.values())
    changes = [f"pruned {total} heads ({order}):"]
    for layer, chosen in sorted(heads.items()):
        before, after = attention_shape(model, layer), attention_shape(result, layer)
        changes.append(f"  layer {layer}: heads {before.heads} -> {after.heads} "
                       f"(removed {', '.join(map(str, chosen))}; key/value heads "
                       f"{before.kv_heads} -> {after.kv_heads})")
    return result, changes


def _resize(model: nn.Module, params: dict[str, Any],
            calibration_ids: torch.Tensor | None) -> tuple[nn.Module, list[str]]:
    layer = _int(params, "layer")
    if params.get("memory") is not None:
        from engine.model.architecture.memory_size import resize_memory

        slots = _int(params, "memory")
        return resize_memory(model, layer, slots), [f"layer {layer}: memory resized to "
                                                    f"{slots} slots"]
    from engine.model.architecture.mlp import grow_mlp, mlp_width, prune_mlp

    width = _int(params, "mlp")
    current = mlp_width(model, layer)
    if width == current:
        raise InputError(f"layer {layer}'s MLP already has {current} neurons; give another "
                         "width")
    if width > current:
        result = grow_mlp(model, layer, width - current, seed=_int(params, "seed", 0))
        return result, [f"layer {layer}: MLP {current} -> {width} neurons (new neurons "
                        "start silent)"]
    if width < 1:
        raise InputError(f"mlp={width}: a layer keeps at least one neuron")
    calibration = _need_calibration(calibration_ids, "pruning an MLP")
    result = prune_mlp(model, layer, count=current - width, calibration_ids=calibration)
    return result, [f"layer {layer}: MLP {current} -> {width} neurons (the "
                    f"{current - width} least important removed)"]


def _add_gates(model: nn.Module, params: dict[str, Any], _c: Any) -> tuple[nn.Module, list[str]]:
    from engine.model.architecture.gates import insert_gates

    layers = resolve_layers(params.get("layers", "all"), model)
    init = _float(params, "init", 0.0)
    result = insert_gates(model, layers, init=init)
    return result, [f"head gates on layers {_span(layers)} (start at "
                    f"{float(torch.sigmoid(torch.tensor(init))):.3f})"]


def _grow_heads(model: nn.Module, params: dict[str, Any], _c: Any) -> tuple[nn.Module, list[str]]:
    from engine.model.architecture.heads import grow_heads

    layer, count = _int(params, "layer"), _int(params, "count")
    new_kv = bool(params.get("new_kv", False))
    before = attention_shape(model, layer)
    result = grow_heads(model, layer, count, new_kv=new_kv, seed=_int(params, "seed", 0))
    after = attention_shape(result, layer)
    return result, [f"layer {layer}: heads {before.heads} -> {after.heads}, key/value heads "
                    f"{before.kv_heads} -> {after.kv_heads} (new heads start silent)"]


def _drop_layer(model: nn.Module, params: dict[str, Any], _c: Any) -> tuple[nn.Module, list[str]]:
    from engine.model.architecture.layers import drop_layer

    layer = _int(params, "layer")
    before = num_layers(model)
    return drop_layer(model, layer), [f"dropped layer {layer}: {before} -> {before - 1} layers"]


def _add_layer(model: nn.Module, params: dict[str, Any], _c: Any) -> tuple[nn.Module, list[str]]:
    from engine.model.architecture.layers import insert_layer

    position = _int(params, "position")
    before = num_layers(model)
    result = insert_layer(model, position, seed=_int(params, "seed", 0))
    return result, [f"inserted an identity layer at {position}: {before} -> {before + 1} layers"]


def _add_feedback(model: nn.Module, params: dict[str, Any],
                  _c: Any) -> tuple[nn.Module, list[str]]:
    from engine.model.architecture.feedback import add_feedback

    rank = _int(params, "rank", 32)
    layers = params.get("layers")
    chosen = None if layers in (None, "", "all") else resolve_layers(layers, model)
    result = add_feedback(model, rank=rank, layers=chosen)
    where = "every layer" if chosen is None else f"layers {_span(chosen)}"
    return result, [f"layerwise feedback (rank {rank}) on {where}; zero until trained"]


def _span(layers: list[int]) -> str:
    return ", ".join(map(str, layers)) if len(layers) <= 6 else \
        f"{layers[0]}..{layers[-1]} ({len(layers)})"


RUNNERS: dict[str, Callable[[nn.Module, dict[str, Any], torch.Tensor | None],
                            tuple[nn.Module, list[str]]]] = {
    "add-gates": _add_gates, "grow-heads": _grow_heads, "prune-heads": _prune_heads,
    "resize": _resize, "drop-layer": _drop_layer, "add-layer": _add_layer,
    "add-feedback": _add_feedback,
}
assert set(RUNNERS) == set(OPERATIONS)


def run_operation(model: Any, name: str, params: dict[str, Any] | None = None, *,
                  calibration_ids: torch.Tensor | None = None) -> Outcome:
    """Apply operation ``name`` to a copy of ``model``; see :data:`OPERATIONS`."""
    from engine.model.architecture.counts import parameter_counts

    if name not in RUNNERS:
        raise InputError(f"unknown operation {name!r}; use one of {', '.join(OPERATIONS)}")
    source = unwrap(model)
    before = parameter_counts(source)
    result, changes = RUNNERS[name](source, dict(params or {}), calibration_ids)
    return Outcome(result, changes, before, parameter_counts(result))
