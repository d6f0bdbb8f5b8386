"""Run a Llama-family model from one decoder layer up, on a hidden state captured elsewhere.

A student is its teacher below the first replaced layer, so in the end-to-end stage the hidden
state entering that layer is the same for both. The teacher's pass records it (a pre-hook on
the layer), and the student starts there: the frozen layers below are neither run again nor
back-propagated through, which is where most of distillation's extra cost over fine-tuning
would otherwise go.

Only the Llama layout (``model.layers``, ``rotary_emb``, ``norm``, ``lm_head``) is supported;
other architectures use the plain full forward (see :func:`supports_partial_forward`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from engine.model.anatomy import decoder_layers, num_layers


def supports_partial_forward(model: nn.Module) -> bool:
    inner = getattr(model, "model", None)
    return (inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList)
            and hasattr(inner, "rotary_emb") and hasattr(inner, "norm")
            and hasattr(model, "lm_head"))


@contextmanager
def capture_layer_input(model: nn.Module, start: int) -> Iterator[dict[str, torch.Tensor]]:
    """Inside the block, each forward of ``model`` records the hidden state entering layer
    ``start`` as ``captured["hidden"]``."""
    captured: dict[str, torch.Tensor] = {}
    layer: nn.Module = decoder_layers(model)[start]

    def hook(_module: nn.Module, args: Any, kwargs: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        captured["hidden"] = hidden.detach()

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def logits_from_layer(model: nn.Module, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """The logits of ``model`` for a full block (no cache, no padding) whose hidden state
    entering layer ``start`` is ``hidden`` [batch, tokens, hidden]."""
    from transformers.masking_utils import create_causal_mask

    inner: Any = model.model
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = create_causal_mask(config=inner.config, inputs_embeds=hidden, attention_mask=None,
                              cache=None, position_ids=positions)
    rotary = inner.rotary_emb(hidden, position_ids=positions)
    for layer in decoder_layers(model)[start: num_layers(model)]:
        out = layer(hidden, attention_mask=mask, position_embeddings=rotary,
                    position_ids=positions, use_cache=False)
        hidden = out[0] if isinstance(out, tuple) else out
    logits: torch.Tensor = model.lm_head(inner.norm(hidden))  # type: ignore[operator]
    return logits
