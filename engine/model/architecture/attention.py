"""Attention blocks as per-head weights: read them, and write reshaped ones back.

GPT-2 keeps its query, key and value projections in one ``Conv1D`` (``c_attn``, weights
[in, out]) and Llama in three ``nn.Linear`` (weights [out, in]); both end in an output
projection (``c_proj`` / ``o_proj``). :class:`AttentionWeights` is the one form every
operation here works on: rows per head ([heads * head_dim, hidden]) for the query, key and
value, columns per head ([hidden, heads * head_dim]) for the output. Writing weights back
builds projections of the new shape and updates the attributes the attention's forward reads
(GPT-2's ``split_size``, Llama's ``num_key_value_groups``), so Hugging Face ``forward`` and
``generate`` with its KV cache run the reshaped layer unchanged.

Grouped-query attention: query head ``h`` reads key/value head ``h // groups``; the queries
of one group are contiguous. A layer keeps ``heads == kv_heads * groups`` always.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import decoder_layers, family_of, unwrap


@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


@dataclass
class AttentionWeights:
    """One layer's attention, per head: q/k/v rows [n * head_dim, hidden], o [hidden, ...]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    o_bias: torch.Tensor | None
    head_dim: int

    @property
    def shape(self) -> AttentionShape:
        return AttentionShape(self.q.shape[0] // self.head_dim, self.k.shape[0] // self.head_dim,
                              self.head_dim)


def attention_of(model: Any, layer: int) -> nn.Module:
    """The attention module of decoder layer ``layer`` (checked to exist)."""
    blocks = decoder_layers(model)
    if not 0 <= layer < len(blocks):
        raise InputError(f"unknown layer {layer}: the model has {len(blocks)} layers "
                         f"(0..{len(blocks) - 1})")
    block = blocks[layer]
    module = getattr(block, "self_attn", None) or getattr(block, "attn", None)
    if not isinstance(module, nn.Module):
        raise InputError(f"layer {layer} has no attention module this tool knows")
    return module


def _output_name(model: Any) -> str:
    return "c_proj" if family_of(unwrap(model)) == "gpt2" else "o_proj"


def output_slot(model: Any, layer: int) -> nn.Module:
    """What sits in the output projection's place: the projection, or gates wrapping it."""
    module = getattr(attention_of(model, layer), _output_name(model))
    assert isinstance(module, nn.Module)
    return module


def output_projection(model: Any, layer: int) -> nn.Module:
    """The output projection itself (inside the head gates, when the layer has them)."""
    slot = output_slot(model, layer)
    inner = getattr(slot, "proj", None)
    return inner if isinstance(inner, nn.Module) else slot


def attention_shape(model: Any, layer: int) -> AttentionShape:
    """Heads, key/value heads and head width of ``layer``, read from its weights."""
    attention: Any = attention_of(model, layer)
    head_dim = int(attention.head_dim)
    if family_of(unwrap(model)) == "gpt2":
        heads = int(attention.split_size) // head_dim
        return AttentionShape(heads, heads, head_dim)
    q_proj: Any = attention.q_proj
    k_proj: Any = attention.k_proj
    return AttentionShape(q_proj.out_features // head_dim, k_proj.out_features // head_dim,
                          head_dim)


def read_attention(model: Any, layer: int) -> AttentionWeights:
    """Copies of ``layer``'s attention weights in per-head form."""
    attention: Any = attention_of(model, layer)
    out: Any = output_projection(model, layer)
    head_dim = int(attention.head_dim)
    with torch.no_grad():
        if family_of(unwrap(model)) == "gpt2":
            width = int(attention.split_size)
            weight = attention.c_attn.weight.detach().t()  # [3 * width, hidden]
            bias = attention.c_attn.bias.detach()
            q, k, v = (weight[i * width:(i + 1) * width].clone() for i in range(3))
            qb, kb, vb = (bias[i * width:(i + 1) * width].clone() for i in range(3))
            return AttentionWeights(q, k, v, out.weight.detach().t().clone(), qb, kb, vb,
                                    out.bias.detach().clone(), head_dim)

        def bias_of(linear: Any) -> torch.Tensor | None:
            return None if linear.bias is None else linear.bias.detach().clone()

        return AttentionWeights(
            attention.q_proj.weight.detach().clone(), attention.k_proj.weight.detach().clone(),
            attention.v_proj.weight.detach().clone(), out.weight.detach().clone(),
            bias_of(attention.q_proj), bias_of(attention.k_proj), bias_of(attention.v_proj),
            bias_of(out), head_dim)


def check_weights(weights: AttentionWeights) -> None:
    shape = weights.shape
    if shape.heads < 1 or shape.kv_heads < 1:
        raise InputError("a layer needs at least one attention head")
    if shape.heads % shape.kv_heads:
        raise InputError(f"{shape.heads} query heads do not split evenly over "
                         f"{shape.kv_heads} key/value heads")
    if weights.o.shape[1] != weights.q.shape[0]:
        raise InputError("the output projection does not match the query heads")


def write_attention(model: Any, layer: int, weights: AttentionWeights) -> None:
    """Replace ``layer``'s projections by ones holding ``weights`` (any head counts).

    Head gates in the output slot stay; their size is the caller's to match.
    """
    check_weights(weights)
    attention: Any = attention_of(model, layer)
    slot = output_slot(model, layer)
    shape = weights.shape
    reference = attention.q_proj.weight if hasattr(attention, "q_proj") else attention.c_attn.weight
    factory = {"dtype": reference.dtype, "device": reference.device}
    hidden = weights.q.shape[1]
    if family_of(unwrap(model)) == "gpt2":
        from transformers.pytorch_utils import Conv1D

        width = shape.heads * shape.head_dim
        c_attn = Conv1D(3 * width, hidden).to(**factory)
        c_proj = Conv1D(hidden, width).to(**factory)
        with torch.no_grad():
            c_attn.weight.copy_(torch.cat([weights.q, weights.k, weights.v]).t())
            biases = [b if b is not None else torch.zeros(width)
                      for b in (weights.q_bias, weights.k_bias, weights.v_bias)]
            c_attn.bias.copy_(torch.cat(biases))
            c_proj.weight.copy_(weights.o.t())
            c_proj.bias.copy_(weights.o_bias if weights.o_bias is not None
                              else torch.zeros(hidden))
        attention.c_attn = c_attn
        attention.split_size = width
        attention.num_heads = shape.heads
        attention.embed_dim = width
        projection: nn.Module = c_proj
    else:
        def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
            layer_ = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                               **factory)
            with torch.no_grad():
                layer_.weight.copy_(weight)
                if bias is not None:
                    layer_.bias.copy_(bias)
            return layer_

        attention.q_proj = linear(weights.q, weights.q_bias)
        attention.k_proj = linear(weights.k, weights.k_bias)
        attention.v_proj = linear(weights.v, weights.v_bias)
        projection = linear(weights.o, weights.o_bias)
        attention.num_key_value_groups = shape.groups
    name = _output_name(model)
    if slot is not output_projection(model, layer):  # gated: the gates keep their place
        slot.proj = projection
    else:
        setattr(attention, name, projection)


def empty_weights(model: Any, layer: int, shape: AttentionShape) -> AttentionWeights:
    """Zero weights of ``shape`` for ``layer`` (a skeleton to load saved weights into)."""
    current = read_attention(model, layer)
    hidden = current.q.shape[1]
    width, kv_width = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim

    def bias(value: torch.Tensor | None, size: int) -> torch.Tensor | None:
        return None if value is None else torch.zeros(size, dtype=value.dtype)

    dtype = current.q.dtype
    return AttentionWeights(
        torch.zeros(width, hidden, dtype=dtype), torch.zeros(kv_width, hidden, dtype=dtype),
        torch.zeros(kv_width, hidden, dtype=dtype), torch.zeros(hidden, width, dtype=dtype),
        bias(current.q_bias, width), bias(current.k_bias, kv_width),
        bias(current.v_bias, kv_width), bias(current.o_bias, hidden), shape.head_dim)


def head_rows(tensor: torch.Tensor, heads: list[int], head_dim: int) -> torch.Tensor:
    """The rows of the chosen heads, in the order given ([len(heads) * head_dim, ...])."""
    index = torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)],
                         dtype=torch.long)
    return tensor.index_select(0, index)
