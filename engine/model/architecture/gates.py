"""Hydra attention: a learned gate per head on each attention layer's output.

A layer with gates computes ``o_proj(concat_h(sigmoid(c_h) · head_h))``: head ``h``'s output
is scaled by ``sigmoid(c_h)`` before the output projection mixes the heads. The gates sit in
the output projection's place (:class:`HeadGates` wraps it as ``.proj``), so the Hugging Face
attention forward, its KV cache and ``generate`` run unchanged, for GPT-2 and for Llama with
grouped-query attention (gates are per query head: each has its own slice of the output).

Inserting gates leaves the function unchanged: the contributions start at ``init`` and each
head's columns of the output projection are divided by ``sigmoid(init)``, so
``sigmoid(c) / sigmoid(init) = 1`` until training moves ``c``. With the default ``init=0`` a
gate starts at 0.5 and may grow to twice the head's original share (gate 1.0) or close it.

A gate near its top (``sigmoid(c) ≥ saturation``) marks a head that wants more than it can
give: a candidate to grow heads beside it. A gate near 0 marks a head to prune.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import decoder_layers, family_of, resolve_layers, unwrap
from engine.model.architecture.attention import (
    attention_of,
    attention_shape,
    output_projection,
    output_slot,
)

SATURATED = 0.95  # gate value at or above which a head counts as overloaded
CLOSED = 0.05  # at or below: the head contributes almost nothing
MAX_INIT = 8.0  # sigmoid(8) = 0.9997: no headroom left above it


class HeadGates(nn.Module):
    """The output projection of one attention layer, with a gate per head before it."""

    def __init__(self, proj: nn.Module, heads: int, head_dim: int, init: float = 0.0) -> None:
        super().__init__()
        self.proj = proj
        self.head_dim = head_dim
        reference = next(proj.parameters())
        self.contribution = nn.Parameter(torch.full((heads,), float(init),
                                                    dtype=reference.dtype,
                                                    device=reference.device))

    @property
    def heads(self) -> int:
        return int(self.contribution.shape[0])

    def gates(self) -> torch.Tensor:
        return torch.sigmoid(self.contribution)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shaped = hidden_states.view(*hidden_states.shape[:-1], self.heads, self.head_dim)
        gated = shaped * self.gates().to(hidden_states.dtype)[:, None]
        return self.proj(gated.reshape(hidden_states.shape))  # type: ignore[no-any-return]


def gates_of(model: Any, layer: int) -> HeadGates | None:
    slot = output_slot(model, layer)
    return slot if isinstance(slot, HeadGates) else None


def gated_layers(model: Any) -> list[int]:
    return [i for i in range(len(decoder_layers(model))) if gates_of(model, i) is not None]


def scale_head_inputs(model: Any, layer: int, factors: torch.Tensor) -> None:
    """Multiply each head's columns of ``layer``'s output projection by ``factors[h]``."""
    projection: Any = output_projection(model, layer)
    head_dim = attention_shape(model, layer).head_dim
    per_column = factors.repeat_interleave(head_dim).to(projection.weight.dtype)
    with torch.no_grad():
        if family_of(unwrap(model)) == "gpt2":  # Conv1D: weight [in, out]
            projection.weight.mul_(per_column[:, None])
        else:  # Linear: weight [out, in]
            projection.weight.mul_(per_column[None, :])


def insert_gates(model: Any, layers: Any = "all", *, init: float = 0.0) -> nn.Module:
    """A copy of ``model`` with head gates on ``layers``; its function is unchanged."""
    source = unwrap(model)
    family_of(source)
    chosen = resolve_layers(layers, source)
    if not math.isfinite(init) or abs(init) > MAX_INIT:
        raise InputError(f"init={init} is outside [-{MAX_INIT}, {MAX_INIT}]; gates start "
                         "there so that training can still move them")
    already = [i for i in chosen if gates_of(source, i) is not None]
    if already:
        raise InputError(f"layers {', '.join(map(str, already))} already have head gates; "
                         "choose other layers")
    result = copy.deepcopy(source)
    start = 1.0 / torch.sigmoid(torch.tensor(float(init)))
    for layer in chosen:
        shape = attention_shape(result, layer)
        scale_head_inputs(result, layer, torch.full((shape.heads,), float(start)))
        attention = attention_of(result, layer)
        name = "c_proj" if family_of(result) == "gpt2" else "o_proj"
        setattr(attention, name, HeadGates(getattr(attention, name), shape.heads,
                                           shape.head_dim, init))
    result.eval()
    return result


def remove_gates(model: Any, layers: Any = "all") -> nn.Module:
    """A copy of ``model`` with the gates of ``layers`` folded into the output projections:
    the same function, plain Hugging Face modules again."""
    source = unwrap(model)
    chosen = [i for i in resolve_layers(layers, source) if gates_of(source, i) is not None]
    if not chosen:
        raise InputError("the model has no head gates on those layers")
    result = copy.deepcopy(source)
    for layer in chosen:
        gates = gates_of(result, layer)
        assert gates is not None
        scale_head_inputs(result, layer, gates.gates().detach())
        name = "c_proj" if family_of(result) == "gpt2" else "o_proj"
        setattr(attention_of(result, layer), name, gates.proj)
    result.eval()
    return result


def install_gates(model: nn.Module, layers: list[int], heads: dict[int, int]) -> None:
    """Put gates (weights to be loaded) on ``layers`` in place: used when loading a model."""
    for layer in layers:
        attention = attention_of(model, layer)
        name = "c_proj" if family_of(model) == "gpt2" else "o_proj"
        shape = attention_shape(model, layer)
        setattr(attention, name, HeadGates(getattr(attention, name), heads.get(layer, shape.heads),
                                           shape.head_dim))


@dataclass(frozen=True)
class GateState:
    layer: int
    head: int
    value: float  # sigmoid(contribution)
    state: str  # "saturated", "closed" or "open"


def gate_states(model: Any, *, saturated: float = SATURATED, closed: float = CLOSED
                ) -> list[GateState]:
    """Every gate's value and what it says: saturated (overloaded), closed, or open."""
    out: list[GateState] = []
    for layer in gated_layers(model):
        gates = gates_of(model, layer)
        assert gates is not None
        for head, value in enumerate(gates.gates().detach().tolist()):
            state = "saturated" if value >= saturated else "closed" if value <= closed \
                else "open"
            out.append(GateState(layer, head, float(value), state))
    return out


def saturated_heads(model: Any, threshold: float = SATURATED) -> list[tuple[int, int]]:
    """(layer, head) of every gate at or above ``threshold``: heads to grow beside."""
    return [(g.layer, g.head) for g in gate_states(model, saturated=threshold)
            if g.state == "saturated"]
