"""The architecture record: what a reshaped model's config alone cannot say.

A Hugging Face config describes uniform layers; after surgery a layer may have its own head
counts, MLP width, head gates, and the model may carry layerwise feedback. The record is read
off the modules themselves when a model is saved (nothing has to be tracked while operations
run) and stored in ``config.json`` under ``mindset_architecture``::

    {"format": 1,
     "layers": {"3": {"heads": 7, "kv_heads": 7, "mlp": 1200, "gates": true}},
     "feedback": {"rank": 32, "layers": [0, 1, 2]},
     "channels": ["content", "affect"]}

Only what differs from the config is listed. Loading builds the model from the config,
then :func:`apply_architecture` reshapes it (empty weights) so the saved tensors fit.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from engine.errors import InputError
from engine.model.anatomy import (
    config_of,
    decoder_layers,
    hidden_size,
    mlp_of,
    mlp_size,
    unwrap,
)
from engine.model.architecture.attention import (
    AttentionShape,
    attention_shape,
    empty_weights,
    write_attention,
)
from engine.model.architecture.gates import gates_of, install_gates

RECORD_KEY = "mindset_architecture"
RECORD_FORMAT = 1


def default_shape(config: Any) -> AttentionShape:
    """The attention shape every layer has in a model built from ``config``."""
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
    heads = int(get("num_attention_heads") or get("n_head") or 1)
    kv_heads = int(get("num_key_value_heads") or heads)
    head_dim = int(get("head_dim") or hidden_size(config) // heads)
    return AttentionShape(heads, kv_heads, head_dim)


def is_dense_mlp(module: nn.Module) -> bool:
    """A Hugging Face MLP (not a memory layer or a replacement)."""
    return type(module).__name__ in {"LlamaMLP", "GPT2MLP"}


def dense_width(module: nn.Module) -> int:
    linear: Any = getattr(module, "up_proj", None)
    if linear is not None:
        return int(linear.out_features)
    return int(module.c_fc.weight.shape[1])  # type: ignore[union-attr,index]


def architecture_record(model: Any) -> dict[str, Any] | None:
    """The record of ``model`` (None when it is shaped exactly as its config says)."""
    module = unwrap(model)
    config = config_of(module)
    default = default_shape(config)
    width = mlp_size(config)
    layers: dict[str, dict[str, Any]] = {}
    for index in range(len(decoder_layers(module))):
        entry: dict[str, Any] = {}
        shape = attention_shape(module, index)
        if shape != default:
            entry["heads"], entry["kv_heads"] = shape.heads, shape.kv_heads
        mlp = mlp_of(module, index)
        if is_dense_mlp(mlp) and dense_width(mlp) != width:
            entry["mlp"] = dense_width(mlp)
        if gates_of(module, index) is not None:
            entry["gates"] = True
        if entry:
            layers[str(index)] = entry
    from engine.model.architecture.feedback import feedback_settings

    feedback = feedback_settings(module)
    from engine.model.label_channels import channel_settings  # label channels

    channels = channel_settings(module)
    if not layers and feedback is None and channels is None:
        return None
    record: dict[str, Any] = {"format": RECORD_FORMAT, "layers": layers}
    if feedback is not None:
        record["feedback"] = feedback
    if channels is not None:
        record["channels"] = channels
    return record


def record_of_config(config: Any) -> dict[str, Any] | None:
    record = config.get(RECORD_KEY) if isinstance(config, dict) \
        else getattr(config, RECORD_KEY, None)
    return record if record else None


def check_record(record: Any, layer_count: int) -> dict[str, Any]:
    """The record, checked enough that building from it cannot go wrong silently."""
    def bad(why: str) -> InputError:
        return InputError(f"config.json's {RECORD_KEY} is damaged ({why}); re-save the model")

    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise bad(f"format {record.get('format') if isinstance(record, dict) else record!r}")
    layers = record.get("layers", {})
    if not isinstance(layers, dict):
        raise bad("layers is not an object")
    for key, entry in layers.items():
        if not key.isdigit() or not 0 <= int(key) < layer_count or not isinstance(entry, dict):
            raise bad(f"layer {key!r}")
        for name in ("heads", "kv_heads", "mlp"):
            value = entry.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise bad(f"layer {key} {name}={value!r}")
        if ("heads" in entry) != ("kv_heads" in entry) or \
                entry.get("heads", 1) % entry.get("kv_heads", 1):
            raise bad(f"layer {key} heads/kv_heads")
    return record


def apply_architecture(model: nn.Module, record: dict[str, Any] | None) -> None:
    """Reshape ``model`` (built from its config) in place as ``record`` says; the weights are
    zero or random until the saved ones are loaded."""
    if not record:
        return
    record = check_record(record, len(decoder_layers(model)))
    default = default_shape(config_of(model))
    gated: list[int] = []
    heads: dict[int, int] = {}
    for key, entry in record.get("layers", {}).items():
        layer = int(key)
        if "heads" in entry:
            shape = AttentionShape(entry["heads"], entry["kv_heads"], default.head_dim)
            write_attention(model, layer, empty_weights(model, layer, shape))
            heads[layer] = shape.heads
        if "mlp" in entry:
            from engine.model.architecture.mlp import build_mlp

            build_mlp(model, layer, int(entry["mlp"]))
        if entry.get("gates"):
            gated.append(layer)
    install_gates(model, gated, heads)
    if record.get("feedback"):
        from engine.model.architecture.feedback import install_feedback

        install_feedback(model, record["feedback"])
    if record.get("channels"):  # label channels
        from engine.model.label_channels import install_channels

        install_channels(model, record["channels"])


def stamp_record(model: Any) -> None:
    """Write the model's current record into its config (or clear a stale one)."""
    module = unwrap(model)
    record = architecture_record(module)
    config = module.config
    if record is None:
        if hasattr(config, RECORD_KEY):
            delattr(config, RECORD_KEY)
        return
    setattr(config, RECORD_KEY, record)
