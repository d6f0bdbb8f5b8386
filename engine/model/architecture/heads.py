"""Grow and prune attention heads, per layer, for GPT-2 and Llama (grouped-query aware).

Growing adds heads whose query, key and value rows are drawn from a normal distribution with
the mean and standard deviation of the layer's existing rows (per projection), and whose
columns of the output projection are zero: the layer's output is unchanged at the moment of
growth, and training gives the new heads a share.

Grouped-query attention (Llama with ``kv_heads < heads``): query heads come in groups that
read one key/value head. Growing by ``n`` adds ``n / kv_heads`` query heads to every group
(their key/value are the group's), or, with ``new_kv``, whole new groups of ``groups`` heads
with their own key/value heads. A count that fits neither is refused.

Pruning removes the named heads' weights: their query rows and output columns (GPT-2: key and
value rows too). Under grouped-query attention a group left empty loses its key/value head;
when the groups left have different sizes, each key/value head is repeated so that every
group has ``g = gcd(sizes)`` queries: Hugging Face attention repeats key/value heads evenly,
and this keeps the layer's function exact at the cost of a few duplicated rows (reported in
the parameter counts).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import config_of, decoder_layers, unwrap
from engine.model.architecture.attention import (
    AttentionShape,
    AttentionWeights,
    attention_shape,
    head_rows,
    read_attention,
    write_attention,
)
from engine.model.architecture.gates import gates_of

MAX_HEAD_FACTOR = 4  # a layer may hold at most this many times the config's heads


def config_heads(model: Any) -> int:
    config = config_of(unwrap(model))
    value = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    return int(value or 1)


def _check_layer(model: nn.Module, layer: int) -> None:
    count = len(decoder_layers(model))
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < count:
        raise InputError(f"layer {layer!r} is out of range; the model has {count} layers "
                         f"(0..{count - 1})")


# --- growing ---------------------------------------------------------------------------------


def check_growth(model: Any, layer: int, count: int, new_kv: bool = False) -> AttentionShape:
    """The shape ``layer`` would have after growing by ``count`` heads (or a clear error)."""
    source = unwrap(model)
    _check_layer(source, layer)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"grow by {count!r} heads: give a positive whole number")
    shape = attention_shape(source, layer)
    limit = MAX_HEAD_FACTOR * config_heads(source)
    if shape.heads + count > limit:
        raise InputError(f"layer {layer} would have {shape.heads + count} heads, past the "
                         f"limit of {limit} ({MAX_HEAD_FACTOR}x the config's "
                         f"{config_heads(source)}); grow by at most {limit - shape.heads}")
    if shape.kv_heads == shape.heads:  # plain multi-head attention: every head has its own kv
        return AttentionShape(shape.heads + count, shape.kv_heads + count, shape.head_dim)
    if new_kv:
        if count % shape.groups:
            raise InputError(f"layer {layer} groups {shape.groups} query heads per key/value "
                             f"head; with new key/value heads grow by a multiple of "
                             f"{shape.groups}")
        return AttentionShape(shape.heads + count, shape.kv_heads + count // shape.groups,
                              shape.head_dim)
    if count % shape.kv_heads:
        raise InputError(f"KV-group mismatch: layer {layer} has {shape.kv_heads} key/value "
                         f"groups; grow by a multiple of {shape.kv_heads} (the same number of "
                         f"query heads in each), or add whole groups with new key/value heads")
    return AttentionShape(shape.heads + count, shape.kv_heads, shape.head_dim)


def _draw(like: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    """``rows`` new rows from N(mean, std) of ``like``'s entries."""
    mean, std = like.float().mean(), like.float().std()
    if not math.isfinite(float(std)) or float(std) == 0.0:
        std = torch.tensor(0.02)
    noise = torch.randn((rows, *like.shape[1:]), generator=generator)
    return (noise * std + mean).to(like.dtype)


def _draw_bias(like: torch.Tensor | None, size: int, generator: torch.Generator
               ) -> torch.Tensor | None:
    if like is None:
        return None
    return _draw(like[:, None], size, generator)[:, 0]


def grow_heads(model: Any, layer: int, count: int, *, new_kv: bool = False,
               seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose ``layer`` has ``count`` more heads; the function is unchanged.

    Returns the new model; under grouped-query attention without ``new_kv`` the new heads
    join every group, so head indexes after the first group shift (see the module docstring).
    """
    source = unwrap(model)
    new_shape = check_growth(source, layer, count, new_kv)
    result = copy.deepcopy(source)
    old = read_attention(result, layer)
    shape = old.shape
    generator = torch.Generator().manual_seed(seed)
    hd = shape.head_dim
    added_kv = new_shape.kv_heads - shape.kv_heads
    q_new = _draw(old.q, count * hd, generator)
    k_new = _draw(old.k, added_kv * hd, generator)
    v_new = _draw(old.v, added_kv * hd, generator)
    qb_new = _draw_bias(old.q_bias, count * hd, generator)
    kb_new = _draw_bias(old.k_bias, added_kv * hd, generator)
    vb_new = _draw_bias(old.v_bias, added_kv * hd, generator)
    order = grown_order(shape, new_shape)  # new position -> old head index, or -1 for new
    old_heads = [h for h in order if h >= 0]
    fresh = iter(range(count))
    q_parts, o_parts, qb_parts = [], [], []
    o_cols = old.o.t()  # [heads * hd, hidden]: rows per head, like q
    for head in order:
        if head >= 0:
            q_parts.append(head_rows(old.q, [head], hd))
            o_parts.append(head_rows(o_cols, [head], hd))
            if old.q_bias is not None:
                qb_parts.append(head_rows(old.q_bias[:, None], [head], hd)[:, 0])
        else:
            index = next(fresh)
            q_parts.append(q_new[index * hd:(index + 1) * hd])
            o_parts.append(torch.zeros(hd, o_cols.shape[1], dtype=o_cols.dtype))
            if qb_new is not None:
                qb_parts.append(qb_new[index * hd:(index + 1) * hd])
    assert len(old_heads) == shape.heads
    weights = AttentionWeights(
        torch.cat(q_parts), torch.cat([old.k, k_new]), torch.cat([old.v, v_new]),
        torch.cat(o_parts).t().contiguous(),
        torch.cat(qb_parts) if qb_parts else None,
        None if old.k_bias is None else torch.cat([old.k_bias, kb_new]),  # type: ignore[list-item]
        None if old.v_bias is None else torch.cat([old.v_bias, vb_new]),  # type: ignore[list-item]
        old.o_bias, hd)
    write_attention(result, layer, weights)
    gates = gates_of(result, layer)
    if gates is not None:
        values = gates.contribution.detach()
        grown = torch.stack([values[h] if h >= 0 else values.new_zeros(()) for h in order])
        gates.contribution = nn.Parameter(grown)
    result.eval()
    return result


def grown_order(old: AttentionShape, new: AttentionShape) -> list[int]:
    """For each head of the grown layer, the old head it is (or -1 for a new one)."""
    if new.kv_heads != old.kv_heads or old.kv_heads == old.heads:  # new heads at the end
        return list(range(old.heads)) + [-1] * (new.heads - old.heads)
    per_group = new.groups - old.groups
    order: list[int] = []
    for group in range(old.kv_heads):
        order += list(range(group * old.groups, (group + 1) * old.groups)) + [-1] * per_group
    return order


# --- pruning ---------------------------------------------------------------------------------


def check_pruning(model: Any, heads: Mapping[int, list[int]]) -> dict[int, list[int]]:
    """``{layer: sorted head indexes}``, every index checked; no layer may lose every head."""
    source = unwrap(model)
    if not heads or not any(heads.values()):
        raise InputError("no heads named to prune; give layer:head pairs")
    checked: dict[int, list[int]] = {}
    for layer, chosen in heads.items():
        _check_layer(source, layer)
        shape = attention_shape(source, layer)
        for head in chosen:
            if isinstance(head, bool) or not isinstance(head, int) or \
                    not 0 <= head < shape.heads:
                raise InputError(f"head {head!r} is out of range: layer {layer} has "
                                 f"{shape.heads} heads (0..{shape.heads - 1})")
        if len(set(chosen)) != len(chosen):
            raise InputError(f"layer {layer}: head indexes {chosen} repeat; name each once")
        if len(chosen) >= shape.heads:
            raise InputError(f"pruning every head of layer {layer} leaves it no attention; "
                             "keep at least one, or drop the layer instead")
        if chosen:
            checked[layer] = sorted(chosen)
    return checked


def pruned_layout(shape: AttentionShape, removed: list[int]) -> tuple[list[int], list[int]]:
    """(kept query heads, the old key/value head each new key/value head copies)."""
    kept = [h for h in range(shape.heads) if h not in set(removed)]
    if shape.kv_heads == shape.heads:
        return kept, kept
    sizes: dict[int, int] = {}
    for head in kept:
        sizes[head // shape.groups] = sizes.get(head // shape.groups, 0) + 1
    group = math.gcd(*sizes.values())
    sources = [kv for kv, size in sizes.items() for _ in range(size // group)]
    return kept, sources


def pruned_shape(shape: AttentionShape, removed: list[int]) -> AttentionShape:
    kept, sources = pruned_layout(shape, removed)
    return AttentionShape(len(kept), len(sources), shape.head_dim)


def prune_heads(model: Any, heads: Mapping[int, list[int]]) -> nn.Module:
    """A copy of ``model`` without the named heads (``{layer: [head, ...]}``). The remaining
    heads keep their order, renumbered from 0."""
    source = unwrap(model)
    checked = check_pruning(source, heads)
    result = copy.deepcopy(source)
    for layer, removed in checked.items():
        old = read_attention(result, layer)
        shape = old.shape
        kept, sources = pruned_layout(shape, removed)
        hd = shape.head_dim

        weights = AttentionWeights(
            head_rows(old.q, kept, hd), head_rows(old.k, sources, hd),
            head_rows(old.v, sources, hd), head_rows(old.o.t(), kept, hd).t().contiguous(),
            bias_rows(old.q_bias, kept, hd), bias_rows(old.k_bias, sources, hd),
            bias_rows(old.v_bias, sources, hd),
            old.o_bias, hd)
        write_attention(result, layer, weights)
        gates = gates_of(result, layer)
        if gates is not None:
            gates.contribution = nn.Parameter(gates.contribution.detach()[kept].clone())
    result.eval()
    return result


def bias_rows(values: torch.Tensor | None, heads: list[int], head_dim: int
              ) -> torch.Tensor | None:
    return None if values is None else head_rows(values[:, None], heads, head_dim)[:, 0]


def parse_head_list(text: str) -> dict[int, list[int]]:
    """``"3:0,3:5,7:2"`` (layer:head pairs) as ``{3: [0, 5], 7: [2]}``."""
    out: dict[int, list[int]] = {}
    items = [item.strip() for item in str(text).split(",")]
    if not any(items):
        raise InputError("no heads given; write layer:head pairs like 3:0,3:5,7:2")
    for item in items:
        layer_text, colon, head_text = item.partition(":")
        try:
            if not colon:
                raise ValueError
            layer, head = int(layer_text), int(head_text)
        except ValueError:
            raise InputError(f"bad head {item!r}; write layer:head pairs like 3:0,3:5,7:2"
                             ) from None
        out.setdefault(layer, []).append(head)
    return out
