"""Looking inside a loaded model for the workbench: its structure as a display tree, the
hidden state a text produces at a layer, and the tokens a memory value promotes.

Imports torch at module level: import this module inside the functions that need it, so a
front end's first frame stays free of torch.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.model.anatomy import decoder_layers
from engine.model.loading import LoadedModel
from engine.views import ModelNode


def count_params(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def describe_model(model: nn.Module, *, title: str) -> ModelNode:
    """A display tree: embeddings, each layer (attention heads, MLP or memory), head."""
    config: Any = model.config
    root = ModelNode(title, count_params(model), f"{type(model).__name__}")
    layers = decoder_layers(model)
    layer_param_ids = {id(p) for layer in layers for p in layer.parameters()}
    embedding_params = 0
    for name, parameter in model.named_parameters():
        if (id(parameter) not in layer_param_ids and "emb" in name) or name.startswith(
            ("transformer.wte", "transformer.wpe")
        ):
            embedding_params += parameter.numel()
    root.children.append(
        ModelNode("embeddings", embedding_params, f"vocab {config.vocab_size}")
    )
    for index, layer in enumerate(layers):
        layer_node = ModelNode(f"layer {index}", count_params(layer), kind="layer", layer=index)
        for name, child in layer.named_children():
            params = count_params(child)
            kind = type(child).__name__
            node = ModelNode(name, params, kind, layer=index)
            if "attn" in name:
                node.kind = "attention"
                node.children = head_nodes(model, index, params)
            elif "mlp" in name or "memory" in kind.lower():
                node.kind = "memory" if "Memory" in kind else "mlp"
                node.detail = memory_detail(child) or kind
            layer_node.children.append(node)
        root.children.append(layer_node)
    for attribute, label in (("mindset_feedback", "layerwise feedback"),
                             ("mindset_channels", "label channels")):
        extra = getattr(model, attribute, None)
        if isinstance(extra, nn.Module):
            root.children.append(ModelNode(label, count_params(extra), type(extra).__name__,
                                           kind=attribute.removeprefix("mindset_")))
    return root


def head_nodes(model: nn.Module, layer: int, params: int) -> list[ModelNode]:
    """One node per query head of ``layer`` (its share of the attention's parameters), with
    its gate value when the layer has head gates."""
    from engine.model.architecture.attention import attention_shape
    from engine.model.architecture.gates import gates_of

    shape = attention_shape(model, layer)
    gates = gates_of(model, layer)
    values = gates.gates().detach().tolist() if gates is not None else None
    nodes = []
    for head in range(shape.heads):
        detail = f"gate {values[head]:.3f}" if values is not None else ""
        if head == 0 and shape.kv_heads != shape.heads:
            detail = (detail + "  " if detail else "") + \
                f"{shape.groups} per key/value head ({shape.kv_heads} kv heads)"
        nodes.append(ModelNode(f"head {head}", params // shape.heads, detail, kind="head",
                               layer=layer, head=head))
    return nodes


def memory_detail(module: nn.Module) -> str:
    """Slot usage for memory layers that report it; empty for plain MLPs."""
    kind = type(module).__name__
    if "Memory" not in kind:
        return ""
    for attribute in ("slot_usage", "usage"):
        usage = getattr(module, attribute, None)
        if callable(usage):
            with contextlib.suppress(Exception):
                value = usage()
                if isinstance(value, dict):
                    return f"{kind} " + ", ".join(f"{k} {v}" for k, v in value.items())
                return f"{kind} slots used {value}"
    slots = getattr(module, "num_slots", None) or getattr(module, "n_slots", None)
    return f"{kind} {slots} slots" if slots else kind


def hidden_vectors(
    loaded: LoadedModel, text: str, layer: int | None, key_dim: int, value_dim: int,
    memory: nn.Module | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean hidden state entering ``layer`` for ``text``, cut or padded to each width; for
    a featural layer with product keys the key is its query (first head); for an
    associative layer the key is its query and the value its value (first head), what the
    layer itself would search with and store."""
    encoded = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        output = loaded.model(**encoded, output_hidden_states=True)
    states = output.hidden_states
    index = 0 if layer is None else min(layer, len(states) - 1)
    hidden = states[index][0].mean(dim=0).float()
    query = hidden
    query_proj = getattr(memory, "query_proj", None)
    if query_proj is not None:
        with torch.no_grad():
            query = query_proj(hidden)[:key_dim]
    value = hidden
    value_proj = getattr(memory, "value_proj", None)
    if value_proj is not None:
        with torch.no_grad():
            value = value_proj(hidden)[:value_dim]

    def fit(source: np.ndarray, width: int) -> np.ndarray:
        out = np.zeros(width, dtype=np.float32)
        out[: min(width, source.shape[0])] = source[:width]
        return out

    return fit(query.detach().numpy(), key_dim), fit(value.detach().numpy(), value_dim)


def output_projection(model: nn.Module, layer: int | None) -> nn.Module | None:
    """The output projection of a memory layer at ``layer`` (None when there is none)."""
    layers = decoder_layers(model)
    if layer is None or not 0 <= layer < len(layers):
        return None
    mlp = getattr(layers[layer], "mlp", None)
    for name in ("out_proj", "output_proj", "w_out"):
        candidate = getattr(mlp, name, None)
        if candidate is not None:
            return candidate  # type: ignore[no-any-return]
    return None


def promoted_tokens(
    loaded: LoadedModel, values: np.ndarray, out_proj: Any, top: int
) -> list[list[str]]:
    """Tokens each value pushes up most: through the layer's output projection when the
    value lives before it (weights only: the bias is the same for every slot), then the LM
    head. ``out_proj`` is anything with a ``weight`` [hidden, value_dim], or None."""
    model = loaded.model
    vectors = torch.as_tensor(values, dtype=torch.float32)
    with torch.no_grad():
        if out_proj is not None and vectors.shape[-1] == out_proj.weight.shape[1]:
            vectors = vectors @ out_proj.weight.float().T
        head = model.get_output_embeddings()
        logits = head(vectors.to(head.weight.dtype))
    indices = logits.topk(top, dim=-1).indices.tolist()
    tokenizer = loaded.tokenizer
    return [[token_text(tokenizer.decode([i])) for i in row] for row in indices]


def token_text(text: str) -> str:
    """A token as printable text: stripped, or its repr when blank or unprintable."""
    stripped = text.strip()
    return stripped if stripped and stripped.isprintable() and "\ufffd" not in stripped else (
        repr(text)
    )
