"""Drop and insert whole decoder layers (GPT-2 and Llama, plain models and students).

A decoder layer adds to the residual stream: ``h ← h + attn(norm(h))``, then
``h ← h + mlp(norm(h))``. **Dropping** layer ``i`` removes its two additions. **Inserting**
adds a copy of a neighbouring layer whose attention output projection and MLP output
projection are zero (weights and biases), so both additions are exactly zero: the residual
stream passes through unchanged and the model computes what it did, in a forward pass and in
``generate`` with its KV cache. Training then gives the new layer a share.

Everything that names layers by index follows the new numbering: the config's layer count
(``num_hidden_layers``; GPT-2's ``n_layer`` is the same field) and per-layer lists such as
``layer_types``, every attention module's ``layer_idx`` (the KV cache's slot), the
architecture record in the config, and a student's memory layers (``StudentSpec.layers`` and
``layer_hparams``). A GPT-2 that scales attention by ``1 / (layer_idx + 1)``
(``scale_attn_by_inverse_layer_idx``) has the change of scale folded into its query weights,
so the model is exact now and after it is saved and rebuilt from its config.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import decoder_layers, family_of, mlp_size, unwrap
from engine.model.architecture.attention import output_projection
from engine.model.architecture.record import RECORD_KEY
from engine.model.surgery import student_spec

# Config fields holding one entry per layer, renumbered with the layers.
PER_LAYER_FIELDS = ("layer_types", "mlp_layer_types", "no_rope_layers")
FEEDBACK_ATTRIBUTE = "mindset_feedback"


# --- checks ----------------------------------------------------------------------------------


def _check_movable(model: nn.Module) -> None:
    """Refuse what this module cannot renumber faithfully."""
    config: Any = model.config
    if getattr(config, "is_heterogeneous", False):
        raise InputError("this model's config sets per-layer overrides (per_layer_config), "
                         "which dropping or inserting layers would misplace; not supported")
    if getattr(model, FEEDBACK_ATTRIBUTE, None) is not None or any(
            name.rsplit(".", 1)[-1] == FEEDBACK_ATTRIBUTE for name, _ in model.named_modules()):
        raise InputError("this model has layerwise feedback, which names layers by index; "
                         "remove it first (feedback.remove_feedback), then add it back")


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- renumbering -----------------------------------------------------------------------------


def _configs(model: nn.Module) -> list[Any]:
    """Every distinct config object the model and its modules hold (normally one)."""
    from transformers import PretrainedConfig

    found: dict[int, Any] = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            found.setdefault(id(config), config)
    return list(found.values())


def _fold_gpt2_scaling(attention: Any, new_index: int) -> None:
    """Keep a GPT-2 attention exact when its ``1 / (layer_idx + 1)`` scale changes: the query
    takes the ratio, the scale becomes what a model built from the config would use."""
    if not getattr(attention, "scale_attn_by_inverse_layer_idx", False):
        return
    old_index = int(attention.layer_idx)
    if old_index == new_index:
        return
    old_scale = float(attention.scaling)
    new_scale = old_scale * (old_index + 1) / (new_index + 1)
    ratio = old_scale / new_scale
    with torch.no_grad():
        if getattr(attention, "is_cross_attention", False):
            attention.q_attn.weight.mul_(ratio)
            attention.q_attn.bias.mul_(ratio)
        else:
            width = int(attention.split_size)
            attention.c_attn.weight[:, :width].mul_(ratio)  # Conv1D [in, 3 * width]
            attention.c_attn.bias[:width].mul_(ratio)
    attention.scaling = new_scale


def _set_layer_index(block: nn.Module, index: int) -> None:
    module: Any
    for module in block.modules():
        if _is_index(getattr(module, "layer_idx", None)):
            if hasattr(module, "scale_attn_by_inverse_layer_idx"):
                _fold_gpt2_scaling(module, index)
            module.layer_idx = index


def _renumber(model: nn.Module, origin: list[int], inserted: set[int]) -> None:
    """Bring everything that names layers up to date. ``origin[j]`` is the old layer that new
    layer ``j`` is (or, for a position in ``inserted``, was copied from)."""
    count = len(origin)
    for config in _configs(model):
        config.num_hidden_layers = count  # GPT-2 maps this to n_layer
        for name in PER_LAYER_FIELDS:
            values = getattr(config, name, None)
            if isinstance(values, list | tuple):
                setattr(config, name, type(values)(values[o] for o in origin))
        record = getattr(config, RECORD_KEY, None)
        if isinstance(record, dict) and isinstance(record.get("layers"), dict):
            old = record["layers"]
            layers = {str(j): copy.deepcopy(old[str(o)]) for j, o in enumerate(origin)
                      if str(o) in old}
            setattr(config, RECORD_KEY, {**record, "layers": layers})
    for index, block in enumerate(decoder_layers(model)):
        _set_layer_index(block, index)
    spec = student_spec(model)
    if spec is not None:  # the model's own (deep-copied) spec
        new_of = {o: j for j, o in enumerate(origin) if j not in inserted}
        spec.layers = sorted(new_of[layer] for layer in spec.layers if layer in new_of)
        spec.layer_hparams = {str(new_of[int(key)]): value
                              for key, value in spec.layer_hparams.items()
                              if int(key) in new_of}


# --- dropping --------------------------------------------------------------------------------


def drop_layer(model: Any, layer: int) -> nn.Module:
    """A copy of ``model`` without decoder layer ``layer``; later layers move down by one.
    A student's memory layer dropped this way is simply gone from its spec."""
    source = unwrap(model)
    count = len(decoder_layers(source))
    if not _is_index(layer) or not 0 <= layer < count:
        raise InputError(f"layer {layer!r} is out of range; the model has {count} layers "
                         f"(0..{count - 1})")
    if count == 1:
        raise InputError("the model has only one layer; dropping it would leave no decoder")
    _check_movable(source)
    result = copy.deepcopy(source)
    del decoder_layers(result)[layer]
    _renumber(result, [i for i in range(count) if i != layer], set())
    return result


# --- inserting -------------------------------------------------------------------------------


def _is_dense(model: nn.Module, module: nn.Module) -> bool:
    names = ("gate_proj", "up_proj", "down_proj") if family_of(model) == "llama" \
        else ("c_fc", "c_proj")
    return all(isinstance(getattr(module, name, None), nn.Module) for name in names)


def _fresh_mlp(model: nn.Module, like: nn.Module, generator: torch.Generator) -> nn.Module:
    """The family's own MLP at the config's width, input weights drawn as Hugging Face
    initialises them (normal, ``initializer_range``), for a copied layer whose MLP position
    held a memory layer."""
    config: Any = model.config
    if family_of(model) == "gpt2":
        from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

        mlp: nn.Module = GPT2MLP(mlp_size(config), config)
    else:
        from transformers.models.llama.modeling_llama import LlamaMLP

        mlp = LlamaMLP(config)
    std = float(getattr(config, "initializer_range", 0.02) or 0.02)
    with torch.no_grad():
        for name, parameter in mlp.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    reference = next(like.parameters(), None)
    if reference is None:
        reference = next(model.parameters())
    return mlp.to(dtype=reference.dtype, device=reference.device)


def _zero(module: Any) -> None:
    with torch.no_grad():
        module.weight.zero_()
        if getattr(module, "bias", None) is not None:
            module.bias.zero_()


def insert_layer(model: Any, position: int, *, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with a new decoder layer at ``position`` (0..layer count) that
    passes the residual stream through unchanged: a copy of the layer before it (the first
    layer for position 0) with zero attention and MLP output projections. Layers from
    ``position`` on move up by one. In a student the new layer holds a dense MLP (a fresh one
    when the copied layer holds a memory layer)."""
    source = unwrap(model)
    count = len(decoder_layers(source))
    if not _is_index(position) or not 0 <= position <= count:
        raise InputError(f"position {position!r} is out of range; insert at 0..{count} "
                         f"(the model has {count} layers)")
    _check_movable(source)
    neighbour = position - 1 if position > 0 else 0
    result = copy.deepcopy(source)
    blocks = decoder_layers(result)
    block: Any = copy.deepcopy(blocks[neighbour])
    generator = torch.Generator().manual_seed(seed)
    if not _is_dense(result, block.mlp):
        block.mlp = _fresh_mlp(result, block.mlp, generator)
    blocks.insert(position, block)
    origin = [*range(position), neighbour, *range(position, count)]
    _renumber(result, origin, {position})
    _zero(output_projection(result, position))
    mlp: Any = block.mlp
    _zero(mlp.down_proj if hasattr(mlp, "down_proj") else mlp.c_proj)
    return result
