"""Label channels: learned per-token label embeddings added to the input embeddings.

A channel gives every token a label and adds a learned vector for that label to the token's
input embedding, before the first decoder layer (GPT-2 adds its position embedding after)::

    x[t] = embed(token[t]) + E_content[c[t]] + W_affect a[t]

* ``content``: ``c[t]`` is 1 when token ``t`` is data the model should not take as an
  instruction (a tool result, a retrieved document, a quoted block; see
  :mod:`engine.llm.labels`), else 0. ``E_content`` is an ``nn.Embedding(2, hidden)``.
* ``affect``: ``a[t] = (arousal, valence)``, each in [-1, 1]. ``W_affect`` is an
  ``nn.Linear(2, hidden, bias=False)``, so a neutral affect (0, 0) adds nothing.

Every weight starts at zero: a model with fresh channels computes exactly what it did
before, whatever the labels, until the channels are trained. The weights live in one module
on the model, ``model.mindset_channels`` (state-dict names ``mindset_channels.content.weight``
and ``mindset_channels.affect.weight``), so they are saved with the rest and counted; the
architecture record (:mod:`engine.model.architecture.record`) lists the channels so a saved
model is rebuilt with them.

Labels are given per call, for the positions of the input::

    with labelled(model, content=flags, affect=torch.tensor([0.5, -0.2])):
        logits = model(ids).logits          # or model.generate(ids, ...)

``content`` is a [batch, T] tensor of 0/1; ``affect`` is [batch, T, 2] (per token) or [2]
(the same for every token). Label ``t`` belongs to sequence position ``t`` (the index in the
input ids, padding included). Positions past ``T`` (tokens being generated) get content 0
and the affect of position ``T - 1``, or the constant affect. Outside ``labelled`` every
token has content 0 and affect (0, 0). Inside it, the first forward must start at position
0 and cover at least the ``T`` labelled tokens (the prompt, perhaps with a continuation
after it); later forwards continue with a KV cache, or re-read everything from position 0.

How: a forward pre-hook on the base model (``model.model`` / ``model.transformer``) reads
where this forward starts (the cache's length), and a forward hook on the input embedding
(``model.get_input_embeddings()``) adds the channel vectors for the positions just embedded
(only the first embedding call of each base forward: GPT-2 embeds token types with the same
module). A pre-hook on the outer model checks the labels against the input. Not supported:
``inputs_embeds`` instead of ``input_ids`` inside ``labelled`` (refused); calling the
embedding module by hand (nothing is added). The labels live on the model while the
``with`` block runs, so one model serves one labelled call at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from engine.errors import InputError
from engine.model.anatomy import hidden_size, unwrap

ATTRIBUTE = "mindset_channels"  # the module's name on the model, hence its state-dict prefix
CHANNELS = ("content", "affect")


@dataclass
class Labels:
    """The labels of one ``labelled`` block (checked): content [b, T] long, affect [b, T, 2]
    or [2] float."""

    content: torch.Tensor | None
    affect: torch.Tensor | None
    started: bool = False  # the first forward (the prompt) has been checked

    @property
    def length(self) -> int | None:
        """T, when some label is per token."""
        if self.content is not None:
            return int(self.content.shape[1])
        if self.affect is not None and self.affect.ndim == 3:
            return int(self.affect.shape[1])
        return None

    @property
    def batch(self) -> int | None:
        if self.content is not None:
            return int(self.content.shape[0])
        if self.affect is not None and self.affect.ndim == 3:
            return int(self.affect.shape[0])
        return None


class LabelChannels(nn.Module):
    """The channel weights, and the labels and position of the forward being run.

    The runtime state is plain attributes, not buffers: it never enters the state dict.
    """

    def __init__(self, hidden: int, channels: Sequence[str]) -> None:
        super().__init__()
        self.names = tuple(name for name in CHANNELS if name in channels)
        self.content: nn.Embedding | None = None
        self.affect: nn.Linear | None = None
        if "content" in self.names:
            self.content = nn.Embedding(2, hidden)
            nn.init.zeros_(self.content.weight)
        if "affect" in self.names:
            self.affect = nn.Linear(2, hidden, bias=False)
            nn.init.zeros_(self.affect.weight)
        self.labels: Labels | None = None
        self.offset = 0  # the position the next embedded token has
        self.pending = False  # a base forward has begun and not embedded its tokens yet

    def addition(self, batch: int, steps: int, like: torch.Tensor) -> torch.Tensor | None:
        """What to add to the embeddings [batch, steps, hidden] of positions
        ``offset .. offset + steps - 1`` (None: nothing)."""
        labels = self.labels
        added: torch.Tensor | None = None
        if self.content is not None:
            weight = self.content.weight
            if labels is None or labels.content is None:
                added = weight[0].expand(1, 1, -1)  # content 0 everywhere
            else:
                flags = labels.content.to(weight.device)
                known = max(0, min(steps, flags.shape[1] - self.offset))
                ids = torch.zeros(flags.shape[0], steps, dtype=torch.long, device=weight.device)
                ids[:, :known] = flags[:, self.offset:self.offset + known]
                added = self.content(ids)
        if self.affect is not None and labels is not None and labels.affect is not None:
            weight = self.affect.weight
            affect = labels.affect.to(device=weight.device, dtype=weight.dtype)
            if affect.ndim == 1:
                values = affect.expand(1, steps, 2)
            else:  # past the labels: the last labelled position's affect
                last = affect.shape[1] - 1
                index = torch.arange(self.offset, self.offset + steps,
                                     device=weight.device).clamp(max=last)
                values = affect[:, index]
            mapped = self.affect(values)
            added = mapped if added is None else added + mapped
        if added is None:
            return None
        if added.shape[0] not in (1, batch):
            raise InputError(f"the labels are for a batch of {added.shape[0]} but the input "
                             f"has {batch}; give labels [1 or {batch}, tokens]")
        return added.to(dtype=like.dtype, device=like.device)

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy: a copy starts outside any labelled block
        state = cast("dict[str, Any]", super().__getstate__())
        state["labels"], state["offset"], state["pending"] = None, 0, False
        return state


class _BeginForward:
    """Forward pre-hook of the base model: where this forward's tokens start."""

    def __init__(self, owner: LabelChannels) -> None:
        self.owner = owner  # deepcopy rebinds owner to the copy's module

    def __call__(self, _module: nn.Module, _args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.owner.offset = _past_length(kwargs)
        self.owner.pending = True


class _EndForward:
    """Forward hook of the base model (always called): nothing more to add."""

    def __init__(self, owner: LabelChannels) -> None:
        self.owner = owner

    def __call__(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self.owner.pending = False


class _CheckInput:
    """Forward pre-hook of the outer model: the labels must fit the input."""

    def __init__(self, owner: LabelChannels) -> None:
        self.owner = owner

    def __call__(self, _module: nn.Module, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        labels = self.owner.labels
        if labels is None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            raise InputError("inside labelled() give the model input_ids (inputs_embeds "
                             "would skip the label channels)")
        if ids.ndim != 2:
            raise InputError(f"expected input ids [batch, tokens], got {tuple(ids.shape)}")
        batch, steps = int(ids.shape[0]), int(ids.shape[1])
        if labels.batch is not None and labels.batch not in (1, batch):
            raise InputError(f"the labels are for a batch of {labels.batch} but the input has "
                             f"{batch}; give labels [1 or {batch}, tokens]")
        length = labels.length
        if length is not None and not labels.started:
            past = _past_length(kwargs)
            if past != 0 or steps < length:
                raise InputError(f"the labels cover {length} tokens but the first forward "
                                 f"inside labelled() reads {steps} token(s) from position "
                                 f"{past}; give one label per prompt token")
        labels.started = True


class _AddChannels:
    """Forward hook of the input embedding: add the channel vectors of the new positions."""

    def __init__(self, owner: LabelChannels) -> None:
        self.owner = owner

    def __call__(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        owner = self.owner
        if not owner.pending or not isinstance(output, torch.Tensor) or output.ndim != 3:
            return None
        owner.pending = False  # once per base forward (GPT-2 embeds token types after)
        batch, steps = int(output.shape[0]), int(output.shape[1])
        added = owner.addition(batch, steps, output)
        owner.offset += steps
        return None if added is None else output + added


def _past_length(kwargs: dict[str, Any]) -> int:
    """Tokens already in the cache a forward was given (0 without one)."""
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    length = getattr(cache, "get_seq_length", None)
    return int(length()) if callable(length) else 0


# --- public API ------------------------------------------------------------------------------


def channel_settings(model: Any) -> list[str] | None:
    """The model's channels (``["content", "affect"]`` or a part), or None without any."""
    channels = _channels(unwrap(model))
    return None if channels is None else list(channels.names)


def add_channels(model: Any, channels: list[str]) -> nn.Module:
    """A copy of ``model`` with the label ``channels`` ("content", "affect"), zero at first
    (the copy computes exactly what ``model`` does); the original is untouched."""
    module = unwrap(model)
    _check_install(module, channels)  # before copying
    new = copy.deepcopy(module)
    install_channels(new, channels)
    return new


def install_channels(model: Any, channels: list[str]) -> None:
    """Install ``channels`` in place (zero weights). Used when loading a saved model: load
    the saved weights afterwards."""
    module = unwrap(model)
    names = _check_install(module, channels)
    embedding = module.get_input_embeddings()  # type: ignore[operator]
    base = cast("nn.Module", getattr(module, "base_model", module))
    weight = next(module.parameters())
    owner = LabelChannels(hidden_size(module), names)
    owner.to(dtype=weight.dtype, device=weight.device)
    setattr(module, ATTRIBUTE, owner)
    module.register_forward_pre_hook(_CheckInput(owner), with_kwargs=True)
    base.register_forward_pre_hook(_BeginForward(owner), with_kwargs=True)
    base.register_forward_hook(_EndForward(owner), always_call=True)
    embedding.register_forward_hook(_AddChannels(owner))


@contextmanager
def labelled(model: Any, *, content: Any = None, affect: Any = None) -> Iterator[None]:
    """Run the model with these labels inside the block (see the module docstring).

    ``content``: [batch, tokens] of 0/1 (None: all 0). ``affect``: [batch, tokens, 2] or
    [2], (arousal, valence) in [-1, 1] (None: neutral).
    """
    module = unwrap(model)
    owner = _channels(module)
    if owner is None:
        raise InputError("the model has no label channels; add them with add_channels first")
    labels = check_labels(owner.names, content, affect)
    previous = owner.labels
    owner.labels = labels
    try:
        yield
    finally:
        owner.labels = previous


def check_labels(channels: Sequence[str], content: Any = None, affect: Any = None) -> Labels:
    """The labels as tensors, or an InputError saying what is wrong with them."""
    flags = values = None
    if content is not None:
        if "content" not in channels:
            raise InputError("this model has no content channel; leave content labels out "
                             "or add the channel (add_channels)")
        flags = _as_tensor(content, "content labels")
        if flags.dtype == torch.bool:
            flags = flags.long()
        if flags.is_floating_point() or flags.is_complex():
            raise InputError(f"content labels must be whole numbers 0 or 1, got {flags.dtype}")
        if flags.ndim != 2 or 0 in flags.shape:
            raise InputError(f"content labels must be [batch, tokens], got "
                             f"{tuple(flags.shape)}")
        if bool(((flags != 0) & (flags != 1)).any()):
            raise InputError("content labels must be 0 (text) or 1 (data), got "
                             f"{sorted({int(v) for v in flags.unique()} - {0, 1})[:3]}")
        flags = flags.long()
    if affect is not None:
        if "affect" not in channels:
            raise InputError("this model has no affect channel; leave affect out or add the "
                             "channel (add_channels)")
        values = _as_tensor(affect, "affect labels")
        if values.dtype == torch.bool or values.is_complex():
            raise InputError(f"affect labels must be numbers, got {values.dtype}")
        values = values.float() if not values.is_floating_point() else values
        per_token = values.ndim == 3 and values.shape[2] == 2 and 0 not in values.shape
        if tuple(values.shape) != (2,) and not per_token:
            raise InputError(f"affect labels must be [2] or [batch, tokens, 2] (arousal, "
                             f"valence), got {tuple(values.shape)}")
        if not bool(torch.isfinite(values).all()) or bool((values.abs() > 1).any()):
            raise InputError("affect (arousal, valence) must be within [-1, 1]")
    if flags is not None and values is not None and values.ndim == 3 \
            and values.shape[:2] != flags.shape:
        raise InputError(f"the content labels are {tuple(flags.shape)} but the affect labels "
                         f"are {tuple(values.shape[:2])}; give both for the same tokens")
    return Labels(flags, values)


# --- checks ----------------------------------------------------------------------------------


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"{what} must be a tensor or nested lists of numbers "
                         f"({type(exc).__name__})") from None


def _channels(module: nn.Module) -> LabelChannels | None:
    found = getattr(module, ATTRIBUTE, None)
    return found if isinstance(found, LabelChannels) else None


def _check_install(module: nn.Module, channels: Any) -> list[str]:
    present = _channels(module)
    if present is not None:
        raise InputError(f"the model already has label channels ({', '.join(present.names)}); "
                         "add channels once, to a model without them")
    if not isinstance(channels, list | tuple) or not channels:
        raise InputError(f"channels must be a non-empty list of {', '.join(CHANNELS)}, got "
                         f"{channels!r}")
    unknown = [name for name in channels if name not in CHANNELS]
    if unknown:
        raise InputError(f"unknown channel {unknown[0]!r}; the channels are "
                         f"{', '.join(CHANNELS)}")
    if len(set(channels)) != len(channels):
        raise InputError(f"channels {list(channels)!r} name one channel twice; name each once")
    if not callable(getattr(module, "get_input_embeddings", None)):
        raise InputError(f"{type(module).__name__} has no input embedding to add channels to")
    return list(channels)
