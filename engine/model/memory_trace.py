"""Which memory entries an output used: reads recorded by the layers, ranked by influence.

While a :class:`MemoryTrace` is open, every memory layer records, in its own forward pass, the
entries it read for each token and with what weight (featural slots for flat, product and
routed keys; cache entries per head for associative memories), and computes its output from
exactly those reads. Nothing looks the entries up again from outside.

**Influence** of one read on a chosen output token ``y`` at position ``p`` is its *direct*
contribution to that token's logit, through the final norm and the output embedding:

    influence = w · (u · c)

* ``w``: the read weight (a featural slot's activation, or an associative entry's softmax
  attention weight);
* ``c``: the entry's output vector in the residual stream: the value ``v`` for flat and routed
  keys, ``W_out (v ⊙ gate)`` for product keys, ``W_out[:, head] v`` for associative entries;
* ``u``: the target's readout direction at ``p``. The final norm is linear in its input once
  its scale is fixed at the value it had: ``u = γ ⊙ W_U[y] / rms(h_p)`` for RMSNorm, and for
  LayerNorm ``u = (a − mean(a)) / σ(h_p)`` with ``a = γ ⊙ W_U[y]`` (the centring moved onto
  ``u``).

Since the logit is ``u · h_p`` plus constants, the influences of a layer's reads at ``p`` plus
its bias term (``u · out_bias``, or ``u · b_out`` for product keys; for associative memories
the token's own key-value entry and ``b_out``) sum exactly to ``u · out_p``, that layer's
direct contribution (:attr:`LayerTrace.direct`). Effects through later attention and layers
are not counted (direct logit attribution).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.memory_layers.associative import AssociativeMemory
from engine.model.memory_layers.featural import FeaturalMemory
from engine.model.surgery import memory_layers

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")


@dataclass(frozen=True)
class TracedEntry:
    """One read at the traced position, with its influence on the target logit."""

    layer: int
    kind: str  # "featural" or "associative"
    entry: int  # slot index (featural) or cache position (associative)
    head: int  # associative head, or product-key head; 0 otherwise
    weight: float
    influence: float


@dataclass
class LayerTrace:
    """Every read of one memory layer at the traced position, and the layer's direct effect."""

    layer: int
    kind: str
    entries: list[TracedEntry]
    bias: float  # the part of ``direct`` that no entry carries (biases, own entry)
    direct: float  # u · (this layer's output at the position)


@dataclass
class Trace:
    """The reads of one forward pass, and their influences on ``target`` at ``position``."""

    token_ids: list[int]
    position: int
    target: int
    target_logit: float
    layers: dict[int, LayerTrace] = field(default_factory=dict)
    reads: dict[int, Any] = field(default_factory=dict)  # layer -> recorded reads, all tokens

    def ranked(self, limit: int | None = None) -> list[TracedEntry]:
        """Every read at the position, the most promoting first (largest influence)."""
        entries = [entry for layer in self.layers.values() for entry in layer.entries]
        entries.sort(key=lambda entry: entry.influence, reverse=True)
        return entries if limit is None else entries[:limit]

    def layer_ranking(self) -> list[int]:
        """Memory layers by the summed positive influence of their reads, highest first."""
        def score(layer: int) -> float:
            return sum(max(0.0, e.influence) for e in self.layers[layer].entries)

        return sorted(self.layers, key=score, reverse=True)


@contextmanager
def memory_trace(model: nn.Module) -> Iterator[dict[int, list[Any]]]:
    """Record every memory layer's reads while open: ``{layer: [reads of each pass]}``."""
    modules = memory_layers(model)
    if not modules:
        raise InputError("this model has no memory layers to trace; load a student")
    recorded: dict[int, list[Any]] = {}
    try:
        for layer, module in modules.items():
            recorded[layer] = []
            module.trace_reads = recorded[layer]  # type: ignore[assignment]
        yield recorded
    finally:
        for module in modules.values():
            module.trace_reads = None  # type: ignore[assignment]


def final_norm(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    for name in FINAL_NORM_NAMES:
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    raise InputError(f"cannot find the final norm of {type(model).__name__}; tracing needs "
                     f"one of {', '.join(FINAL_NORM_NAMES)}")


def readout_direction(model: nn.Module, norm: nn.Module, hidden: torch.Tensor,
                      target: int) -> torch.Tensor:
    """``u`` of the module docstring for one final residual state ``hidden`` [h]."""
    head: Any = getattr(model, "get_output_embeddings")()  # noqa: B009 (nn.Module typing)
    unembed = head.weight[target].detach().float()
    gamma = getattr(norm, "weight", None)
    a = unembed * (gamma.detach().float() if gamma is not None else 1.0)
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    h = hidden.float()
    if isinstance(norm, nn.LayerNorm) or getattr(norm, "bias", None) is not None:
        return (a - a.mean()) / torch.sqrt(h.var(unbiased=False) + eps)
    return a / torch.sqrt(h.pow(2).mean() + eps)


@torch.no_grad()
def trace_ids(model: nn.Module, input_ids: torch.Tensor, *, target: int | None = None,
              position: int = -1) -> Trace:
    """Run ``input_ids`` [1, T] once, recording every read; rank the reads at ``position``
    (default: the last token) by influence on ``target`` (default: the predicted token)."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] == 0:
        raise InputError("trace one non-empty prompt at a time (input ids [1, T])")
    length = input_ids.shape[1]
    if not -length <= position < length:
        raise InputError(f"position {position} is outside the prompt's {length} tokens")
    position %= length
    norm = final_norm(model)
    captured: dict[str, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def keep_input(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured["h"] = inputs[0][0, position].detach()

    modules = memory_layers(model)
    handles = [norm.register_forward_pre_hook(keep_input)]
    for layer, module in modules.items():
        def keep_output(_m: nn.Module, _i: Any, out: torch.Tensor, layer: int = layer) -> None:
            outputs[layer] = out.reshape(-1, out.shape[-1])[position].detach()

        handles.append(module.register_forward_hook(keep_output))
    try:
        with memory_trace(model) as recorded:
            logits = model(input_ids=input_ids).logits[0, position]
    finally:
        for handle in handles:
            handle.remove()
    chosen = int(logits.argmax()) if target is None else int(target)
    vocab = logits.shape[-1]
    if not 0 <= chosen < vocab:
        raise InputError(f"target token {chosen} is outside the vocabulary (0..{vocab - 1})")
    u = readout_direction(model, norm, captured["h"], chosen)
    trace = Trace(input_ids[0].tolist(), position, chosen, float(logits[chosen]))
    for layer, module in modules.items():
        reads = recorded[layer][-1]
        trace.reads[layer] = reads
        if isinstance(module, FeaturalMemory):
            trace.layers[layer] = _featural(layer, module, reads, position, u, outputs[layer])
        elif isinstance(module, AssociativeMemory):
            trace.layers[layer] = _associative(layer, module, reads, position, u,
                                               outputs[layer])
    return trace


def _featural(layer: int, module: FeaturalMemory, reads: Any, position: int,
              u: torch.Tensor, output: torch.Tensor) -> LayerTrace:
    slots = reads.slots[position]
    weights = reads.weights[position].float()
    values = module.values.detach().float()[slots]  # [k, value_dim]
    if module.out_proj is not None:  # product keys: c = W_out (v ⊙ gate)
        readout = module.out_proj.weight.detach().float().t() @ u  # [value_dim]
        if reads.gate is not None:
            readout = readout * reads.gate[position].float()
        bias = float(module.out_proj.bias.detach().float() @ u)
        per_head = module.config.topk
    else:
        readout = u
        assert module.out_bias is not None
        bias = float(module.out_bias.detach().float() @ u)
        per_head = slots.numel()
    contributions = weights * (values @ readout)
    # Fact groups a token does not read stand in the lookup as weight-0 fillers: not reads.
    regular = slots.numel()
    if module.routed is not None and module.routed.fact_groups:
        regular -= module.routed.fact_groups * module.routed.group_size
    entries = [TracedEntry(layer, "featural", int(slot), index // per_head, float(w), float(c))
               for index, (slot, w, c) in enumerate(zip(slots.tolist(), weights.tolist(),
                                                        contributions.tolist(), strict=True))
               if index < regular or w != 0.0]
    return LayerTrace(layer, "featural", entries, bias, float(output.float() @ u))


def _associative(layer: int, module: AssociativeMemory, reads: Any, position: int,
                 u: torch.Tensor, output: torch.Tensor) -> LayerTrace:
    positions, weights = reads
    c = module.config
    rows = slice(position * c.heads, (position + 1) * c.heads)
    out_weight = module.out_proj.weight.detach().float()  # [hidden, heads·value_dim]
    entries: list[TracedEntry] = []
    for head, (head_positions, head_weights) in enumerate(
            zip(positions[rows], weights[rows], strict=True)):
        if head_positions.numel() == 0:
            continue
        readout = out_weight[:, head * c.value_dim:(head + 1) * c.value_dim].t() @ u
        values = module.cache.values[head_positions].float()
        contributions = head_weights.float() * (values @ readout)
        entries += [TracedEntry(layer, "associative", int(p), head, float(w), float(v))
                    for p, w, v in zip(head_positions.tolist(), head_weights.tolist(),
                                       contributions.tolist(), strict=True)]
    direct = float(output.float() @ u)
    return LayerTrace(layer, "associative", entries, direct - sum(e.influence for e in entries),
                      direct)
