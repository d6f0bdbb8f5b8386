"""Layerwise feedback: decoder layer i at position t also reads layer i+1's output at t-1.

With feedback installed on layers ``S`` of a model with ``L`` decoder layers, the input of
layer ``i`` in ``S`` at position ``t`` becomes

    x_i[t] + up_i(down_i(f_i[t])),   f_i[t] = stopgrad(y_{i+1}[t-1])   (i < L-1)
                                     f_i[t] = h                       (i = L-1)

where ``y_j[t]`` is what decoder layer ``j`` outputs at position ``t`` (computed with feedback
itself) and ``h`` is an optional external signal [batch, hidden] given with
:func:`set_higher_feedback` (nothing is added when it is unset, nor at position 0, which has
no previous position). Per step the state moves as ``feedback = outputs[1:] + [higher]``.
``down`` (hidden -> rank) starts small and random and ``up`` (rank -> hidden) at zero, so a
freshly installed model computes exactly what the base model does. The feedback is detached:
training needs no backpropagation through time, only the ordinary in-step graph (which still
reaches earlier positions through the attention keys and values).

Because position t needs position t-1's outputs, positions run one at a time: a forward of T
tokens makes T single-token passes through the Hugging Face model with a ``DynamicCache``
(a forward pre-hook on each chosen layer adds its feedback, a forward hook records each source
layer's output). The last position's outputs are stored on the cache, so ``generate`` (greedy
or sampling, with the cache) and ``model(ids, past_key_values=cache)`` continue exactly where
the cache left off; a training forward without a cache still returns logits for every
position and gradients for every weight. The price is speed: T sequential steps.

Supported: batches of equal-length sequences (an attention mask, if given, must be all ones),
a ``DynamicCache`` built by this model. Refused with an ``InputError``: padding, other cache
types, a cache not built (or cropped) by this model, beam search and assisted decoding,
``output_attentions`` / ``output_hidden_states``, and gradient checkpointing in training.
Calling the inner base model directly (``model.model(...)``) bypasses feedback. The step
state lives on the model while a forward runs, so one model serves one forward at a time.
"""

from __future__ import annotations

import copy
import types
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep

from engine.errors import InputError
from engine.model.anatomy import decoder_layers, hidden_size, resolve_layers, unwrap

ATTRIBUTE = "mindset_feedback"  # the module's name on the model, hence its state-dict prefix
CACHE_ATTRIBUTE = "mindset_feedback_state"
DEFAULT_RANK = 32
DOWN_INIT_STD = 0.02


class LowRankMap(nn.Module):
    """``up(down(f))``: hidden -> rank -> hidden, no biases (zero feedback adds zero)."""

    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)
        nn.init.normal_(self.down.weight, std=DOWN_INIT_STD)
        nn.init.zeros_(self.up.weight)

    def forward(self, feedback: torch.Tensor) -> torch.Tensor:
        return cast("torch.Tensor", self.up(self.down(feedback)))


class FeedbackProjections(nn.Module):
    """The feedback weights (``maps[str(layer)]``) and the state of the step being run.

    The runtime state is plain attributes, not buffers: it never enters the state dict.
    """

    def __init__(self, hidden: int, rank: int, layers: list[int], num_layers: int) -> None:
        super().__init__()
        self.hidden, self.rank, self.num_layers = hidden, rank, num_layers
        self.chosen = tuple(layers)
        self.maps = nn.ModuleDict({str(layer): LowRankMap(hidden, rank) for layer in layers})
        # layer j's output is a source when layer j-1 receives feedback
        self.sources = tuple(layer + 1 for layer in layers if layer + 1 < num_layers)
        self.higher: torch.Tensor | None = None
        self.incoming: dict[int, torch.Tensor] | None = None  # set only while a step runs
        self.recorded: dict[int, torch.Tensor] = {}

    def settings(self) -> dict[str, Any]:
        return {"rank": self.rank, "layers": list(self.chosen)}

    def begin_step(self, state: list[torch.Tensor | None] | None,
                   higher: torch.Tensor | None) -> None:
        incoming: dict[int, torch.Tensor] = {}
        for layer in self.chosen:
            source = higher if layer + 1 == self.num_layers else (
                state[layer + 1] if state is not None else None)
            if source is not None:
                incoming[layer] = source
        self.incoming, self.recorded = incoming, {}

    def end_step(self) -> list[torch.Tensor | None]:
        state = [self.recorded.get(layer) for layer in range(self.num_layers)]
        self.incoming, self.recorded = None, {}
        return state

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy: drop the step state; keep the external signal, detached (a tensor with
        # a graph cannot be deep-copied)
        state = cast("dict[str, Any]", super().__getstate__())
        state["incoming"], state["recorded"] = None, {}
        if state.get("higher") is not None:
            state["higher"] = state["higher"].detach()
        return state


class _AddFeedback:
    """Forward pre-hook of decoder layer ``layer``: add its projected feedback to the input."""

    def __init__(self, owner: FeedbackProjections, layer: int) -> None:
        self.owner, self.layer = owner, layer  # deepcopy rebinds owner to the copy's module

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        incoming = self.owner.incoming
        if incoming is None or self.layer not in incoming:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        mapped = self.owner.maps[str(self.layer)]
        signal = incoming[self.layer].to(dtype=hidden.dtype, device=hidden.device)
        added = hidden + mapped(signal).unsqueeze(1)  # [batch, 1, hidden]: one position
        if args:
            return (added, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": added}


class _RecordOutput:
    """Forward hook of a source layer: keep its output (detached: no BPTT) for the next step."""

    def __init__(self, owner: FeedbackProjections, layer: int) -> None:
        self.owner, self.layer = owner, layer

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if self.owner.incoming is None:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        self.owner.recorded[self.layer] = hidden[:, -1, :].detach()


@dataclass
class _CacheState:
    """What a cache carries besides keys and values: the outputs of its last position."""

    length: int
    outputs: list[torch.Tensor | None]


# --- public API ------------------------------------------------------------------------------


def feedback_settings(model: Any) -> dict[str, Any] | None:
    """``{"rank": r, "layers": [...]}`` of the model's feedback (JSON-ready), or None."""
    projections = _projections(unwrap(model))
    return None if projections is None else projections.settings()


def add_feedback(model: Any, *, rank: int = DEFAULT_RANK,
                 layers: str | int | list[int] | None = None) -> nn.Module:
    """A copy of ``model`` with layerwise feedback on ``layers`` (default all), of ``rank``.

    The new weights start as an exact no-op (``up`` is zero); the original is untouched.
    """
    module = unwrap(model)
    chosen = resolve_layers("all" if layers is None else layers, len(decoder_layers(module)))
    settings = {"rank": rank, "layers": chosen}
    _check_install(module, settings)  # before copying
    new = copy.deepcopy(module)
    install_feedback(new, settings)
    return new


def install_feedback(model: Any, settings: dict[str, Any]) -> None:
    """Install feedback in place, as ``settings`` (from :func:`feedback_settings`) describe.

    Used when loading a saved model: the parameters get the recorded shapes (fresh values);
    load the saved weights afterwards with ``load_state_dict``.
    """
    module = unwrap(model)
    rank, layers = _check_install(module, settings)
    blocks = decoder_layers(module)
    weight = next(module.parameters())
    projections = FeedbackProjections(hidden_size(module), rank, layers, len(blocks))
    projections.to(dtype=weight.dtype, device=weight.device)
    setattr(module, ATTRIBUTE, projections)
    for layer in projections.chosen:
        blocks[layer].register_forward_pre_hook(_AddFeedback(projections, layer),
                                                with_kwargs=True)
    for layer in projections.sources:
        blocks[layer].register_forward_hook(_RecordOutput(projections, layer))
    # on the instance: other models of the class keep the plain forward
    patched = cast("Any", module)
    patched.forward = types.MethodType(_feedback_forward, module)
    patched.generate = types.MethodType(_feedback_generate, module)


def remove_feedback(model: Any) -> nn.Module:
    """A copy of ``model`` without its feedback (the base model again); the original stays."""
    module = unwrap(model)
    if _projections(module) is None:
        raise InputError("the model has no layerwise feedback to remove")
    new = copy.deepcopy(module)
    for block in decoder_layers(new):
        _drop_hooks(block)
    for name in ("forward", "generate"):
        new.__dict__.pop(name, None)
    delattr(new, ATTRIBUTE)
    return new


def set_higher_feedback(model: Any, signal: torch.Tensor | None) -> None:
    """Feed ``signal`` [batch, hidden] (or [1, hidden], broadcast) to the top decoder layer at
    every position from now on; None stops it. It is used as given (not detached), so what
    produces it can be trained through it."""
    projections = _require(unwrap(model))
    top = projections.num_layers - 1
    if signal is None:
        projections.higher = None
        return
    if top not in projections.chosen:
        raise InputError(f"the top layer ({top}) has no feedback; add feedback with layers "
                         f"including {top} to feed it a higher signal")
    if not isinstance(signal, torch.Tensor) or signal.ndim != 2 \
            or signal.shape[1] != projections.hidden or not signal.is_floating_point():
        shape = tuple(signal.shape) if isinstance(signal, torch.Tensor) else type(signal).__name__
        raise InputError(f"the higher feedback must be a float tensor [batch, "
                         f"{projections.hidden}], got {shape}")
    projections.higher = signal


# --- checks ----------------------------------------------------------------------------------


def _projections(module: nn.Module) -> FeedbackProjections | None:
    found = getattr(module, ATTRIBUTE, None)
    return found if isinstance(found, FeedbackProjections) else None


def _require(module: nn.Module) -> FeedbackProjections:
    projections = _projections(module)
    if projections is None:
        raise InputError("the model has no layerwise feedback; add it with add_feedback first")
    return projections


def _check_install(module: nn.Module, settings: Any) -> tuple[int, list[int]]:
    if _projections(module) is not None:
        raise InputError("the model already has layerwise feedback; remove it first")
    if "forward" in module.__dict__ or "generate" in module.__dict__:
        raise InputError("the model's forward is already replaced on this instance; "
                         "layerwise feedback needs the plain Hugging Face forward")
    if not isinstance(settings, dict) or set(settings) != {"rank", "layers"}:
        raise InputError(f"feedback settings must be {{'rank': ..., 'layers': [...]}}, "
                         f"got {settings!r}")
    rank = settings["rank"]
    hidden = hidden_size(module)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= hidden:
        raise InputError(f"feedback rank {rank!r} must be a whole number from 1 to the hidden "
                         f"size {hidden}")
    if not isinstance(settings["layers"], list) or not settings["layers"]:
        raise InputError(f"feedback layers {settings['layers']!r} must be a non-empty list")
    layers = resolve_layers(settings["layers"], len(decoder_layers(module)))
    return rank, layers


def _check_mask(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.ndim != 2 or tuple(mask.shape) != (batch, length):
        raise InputError(f"with layerwise feedback the attention mask must be 2-D [batch, "
                         f"past + new tokens] = [{batch}, {length}], got {tuple(mask.shape)}")
    if not bool(mask.bool().all()):
        raise InputError("layerwise feedback does not support padding; give a batch of "
                         "equal-length sequences (an all-ones attention mask)")
    return mask


def _cache_state(cache: Any, batch: int) -> tuple[int, list[torch.Tensor | None] | None]:
    """(tokens already in the cache, the feedback state to continue from)."""
    if not isinstance(cache, DynamicCache):
        raise InputError(f"layerwise feedback needs a DynamicCache, got {type(cache).__name__}")
    past = cache.get_seq_length()
    if past == 0:
        return 0, None
    state = getattr(cache, CACHE_ATTRIBUTE, None)
    if not isinstance(state, _CacheState) or state.length != past:
        raise InputError("this cache was not built by the feedback model (or was cropped "
                         "since); start from an empty cache")
    rows = {t.shape[0] for t in state.outputs if t is not None}
    if rows and rows != {batch}:
        raise InputError(f"the cache holds a batch of {rows.pop()} but the input has {batch}; "
                         "continue a cache with the same batch")
    return past, state.outputs


def _higher_for(projections: FeedbackProjections, batch: int) -> torch.Tensor | None:
    higher = projections.higher
    if higher is None or projections.num_layers - 1 not in projections.chosen:
        return None
    if higher.shape[0] not in (1, batch):
        raise InputError(f"the higher feedback has a batch of {higher.shape[0]} but the "
                         f"input has {batch}; give [1 or {batch}, hidden]")
    return higher.expand(batch, -1)


# --- the stepping forward and generate -------------------------------------------------------


def _step_slice(value: torch.Tensor | None, step: int) -> torch.Tensor | None:
    return None if value is None else value[..., step:step + 1]


def _feedback_forward(
    self: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    **kwargs: Any,
) -> Any:
    """The model's forward with feedback: one position at a time through the class forward."""
    projections = _require(self)
    config: Any = self.config
    legacy = kwargs.pop("past_key_values", None)
    if legacy is not None:
        if cache is not None:
            raise InputError("give the cache once: cache= or past_key_values=, not both")
        cache = legacy
    return_dict = kwargs.pop("return_dict", None)
    for flag in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(flag, None):
            raise InputError(f"{flag} is not supported with layerwise feedback")
    if (input_ids is None) == (inputs_embeds is None):
        raise InputError("give exactly one of input_ids and inputs_embeds")
    if self.training and getattr(self, "is_activation_checkpointing", False):
        raise InputError("gradient checkpointing drops the cache that layerwise feedback "
                         "steps through; disable it to train a model with feedback")
    tokens = cast("torch.Tensor", input_ids if input_ids is not None else inputs_embeds)
    if tokens.ndim != (2 if input_ids is not None else 3) or tokens.shape[1] == 0:
        raise InputError(f"expected a batch of token sequences [batch, tokens], got a tensor "
                         f"of shape {tuple(tokens.shape)}")
    batch, steps = int(tokens.shape[0]), int(tokens.shape[1])
    use_cache = bool(config.use_cache) if use_cache is None else use_cache
    if cache is None:
        cache = DynamicCache(config=config)
    past, state = _cache_state(cache, batch)
    mask = _check_mask(attention_mask, batch, past + steps)
    token_types = kwargs.pop("token_type_ids", None)
    higher = _higher_for(projections, batch)

    base_forward = type(self).forward
    logits = []
    last: list[torch.Tensor | None] = []
    for step in range(steps):
        projections.begin_step(state, higher)
        try:
            out = base_forward(
                self,
                input_ids=_step_slice(input_ids, step),
                inputs_embeds=None if inputs_embeds is None
                else inputs_embeds[:, step:step + 1],
                attention_mask=None if mask is None else mask[:, :past + step + 1],
                position_ids=_step_slice(position_ids, step),
                cache=cache,
                use_cache=True,
                return_dict=True,
                **({} if token_types is None
                   else {"token_type_ids": token_types[..., step:step + 1]}),
                **kwargs,
            )
        finally:
            state = last = projections.end_step()
        logits.append(out.logits)
    setattr(cache, CACHE_ATTRIBUTE, _CacheState(past + steps, last))

    all_logits = slice_logits_to_keep(torch.cat(logits, dim=1), logits_to_keep)
    loss = None
    if labels is not None:
        loss_function: Any = self.loss_function
        loss = loss_function(logits=all_logits, labels=labels, vocab_size=config.vocab_size,
                             **kwargs)
    output = CausalLMOutputWithPast(loss=loss, logits=all_logits,
                                    cache=cache if use_cache else None)
    if return_dict is None:
        return_dict = bool(getattr(config, "return_dict", True))
    return output if return_dict else output.to_tuple()


_UNSUPPORTED_GENERATION = ("assistant_model", "prompt_lookup_num_tokens")


def _feedback_generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``generate`` that refuses what would reorder or crop the cache behind the feedback."""
    options = kwargs.get("generation_config") or getattr(self, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(options, "num_beams", 1)) or 1
    if beams > 1:
        raise InputError("beam search is not supported with layerwise feedback; use greedy "
                         "decoding or sampling (num_beams=1)")
    for name in _UNSUPPORTED_GENERATION:
        if kwargs.get(name) is not None or getattr(options, name, None) is not None:
            raise InputError(f"{name} (assisted decoding) is not supported with layerwise "
                             "feedback")
    generate: Any = type(self).generate  # type: ignore[attr-defined]
    return generate(self, *args, **kwargs)


def _drop_hooks(block: nn.Module) -> None:
    """Remove this module's feedback hooks from ``block`` (by type: handles don't survive
    a deepcopy)."""
    for hooks in (block._forward_pre_hooks, block._forward_hooks):
        for key, hook in list(hooks.items()):
            if isinstance(hook, _AddFeedback | _RecordOutput):
                del hooks[key]
                block._forward_pre_hooks_with_kwargs.pop(key, None)
                block._forward_hooks_with_kwargs.pop(key, None)
                block._forward_hooks_always_called.pop(key, None)
