"""Learning by reading: a student's associative layers write entries while it reads text.

For each chunk of tokens, every reading layer (an associative memory of the recipe's form)
computes the key of each context from its MLP input. Contexts whose nearest stored key is
farther than the layer's ``novelty_threshold`` get a new entry; the chunk's entries are
added together (LRFU eviction past capacity) and their values are fitted by Adam steps on
the chunk's next-token loss with everything else frozen, until every written position's
next token costs under ``RECALLED_NATS`` (or ``FIT_STEPS`` run out), so each entry carries
what the model should produce after the context that wrote it. Reading the same text again then
finds those entries at distance zero; unrelated text finds none within the read radius.

Layers below a reading layer are untouched by it, so the keys a chunk writes are exactly
the queries its second read will make. Callers hold the model's lock: reading changes the
caches every later forward pass reads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from engine.errors import InputError
from engine.model.memory_layers.associative import AssociativeMemory
from engine.model.partial_forward import (
    capture_layer_input,
    logits_from_layer,
    supports_partial_forward,
)

FIT_STEPS = 12  # at most; the fit stops once every written position is recalled
FIT_LR = 1.0
RECALLED_NATS = 0.5  # a written position's loss below this: its next token is the likeliest
CHUNK_TOKENS = 256
CONTEXT_CHARS = 48  # of the context shown beside a read entry in the Memory pane
# A context of fewer tokens (a chunk's first few) is too common to be worth an entry: it
# would fire wherever a text starts the same way.
MIN_CONTEXT = 4


@dataclass
class ReadReport:
    """What one read added: entries per layer, tokens read, and how long it took."""

    tokens: int = 0
    documents: int = 0
    added: dict[int, int] = field(default_factory=dict)
    evicted: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def entries_added(self) -> int:
        return sum(self.added.values())

    def merge(self, other: ReadReport) -> None:
        self.tokens += other.tokens
        self.documents += other.documents
        self.seconds += other.seconds
        for target, source in ((self.added, other.added), (self.evicted, other.evicted)):
            for layer, count in source.items():
                target[layer] = target.get(layer, 0) + count

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "documents": self.documents,
                "entries_added": self.entries_added,
                "added": {str(k): v for k, v in sorted(self.added.items())},
                "evicted": {str(k): v for k, v in sorted(self.evicted.items())},
                "seconds": round(self.seconds, 3),
                "entries_per_s": round(self.entries_added / self.seconds, 1)
                if self.seconds > 0 else None}


def reading_layers(model: nn.Module) -> dict[int, AssociativeMemory]:
    """The associative layers that learn by reading, by layer index."""
    from engine.model.surgery import memory_layers

    return {layer: module for layer, module in memory_layers(model).items()
            if isinstance(module, AssociativeMemory) and module.base is not None}


def require_reading_layers(model: nn.Module) -> dict[int, AssociativeMemory]:
    layers = reading_layers(model)
    if not layers:
        raise InputError("this model has no associative memory that learns by reading; "
                         "distill one with: mindset distill --memory associative")
    return layers


def _capture_keys(model: nn.Module, input_ids: torch.Tensor, layers: dict[int, AssociativeMemory]
                  ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Each reading layer's keys for the chunk and, where the model allows starting from a
    layer, the hidden state entering the lowest one (the fit then runs from there up)."""
    keys: dict[int, torch.Tensor] = {}
    handles = []
    for layer, module in layers.items():
        def hook(mod: AssociativeMemory, inputs: tuple[torch.Tensor, ...],
                 layer: int = layer) -> None:
            keys[layer] = mod.read_keys(inputs[0][0]).detach()

        handles.append(module.register_forward_pre_hook(hook))
    start = min(layers)
    partial = supports_partial_forward(model)
    try:
        with torch.no_grad(), not_counting(layers), ExitStack() as stack:
            captured = stack.enter_context(capture_layer_input(model, start)) if partial else {}
            model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    return keys, captured.get("hidden")


@contextmanager
def not_counting(layers: dict[int, AssociativeMemory]) -> Iterator[None]:
    """Reads made while writing are not uses: they leave the LRFU statistics alone."""
    for module in layers.values():
        module.counting = False
    try:
        yield
    finally:
        for module in layers.values():
            module.counting = True


def _notes(tokenizer: Any, ids: list[int], positions: list[int], document: str,
           offset: int) -> list[dict[str, Any] | None]:
    notes: list[dict[str, Any] | None] = []
    for position in positions:
        context = tokenizer.decode(ids[max(0, position - 15):position + 1])
        notes.append({"source": "read", "document": document, "position": offset + position,
                      "text": " ".join(context.split())[-CONTEXT_CHARS:],
                      "next": tokenizer.decode([ids[position + 1]]).strip() or "␣"})
    return notes


def read_chunk(model: nn.Module, tokenizer: Any, ids: list[int], *, document: str = "",
               offset: int = 0, steps: int = FIT_STEPS, lr: float = FIT_LR) -> ReadReport:
    """Read one chunk of token ids (at most the model's context): insert novel contexts and
    fit their values. ``offset``: the chunk's first token's position in its document."""
    layers = require_reading_layers(model)
    started = time.perf_counter()
    report = ReadReport(tokens=len(ids))
    if len(ids) < 2:
        return report
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    keys, hidden = _capture_keys(model, input_ids, layers)
    fitted: dict[int, tuple[AssociativeMemory, int]] = {}
    written = torch.zeros(len(ids) - 1, dtype=torch.bool)
    for layer, module in layers.items():
        cache = module.cache
        candidates = keys[layer][:-1]  # the last token has no next token to write
        novel = torch.ones(len(candidates), dtype=torch.bool, device=candidates.device)
        novel[:MIN_CONTEXT - 1] = False
        if len(cache):
            nearest = cache.search(candidates.to(cache.keys.dtype), 1)[0][:, 0]
            novel &= nearest > module.config.novelty_threshold
        positions = novel.nonzero().flatten().tolist()
        before = len(cache)
        uids = cache.add(candidates[novel], torch.zeros(len(positions), module.config.value_dim),
                         _notes(tokenizer, ids, positions, document, offset))
        report.added[layer] = len(uids)
        written |= novel.cpu()
        report.evicted[layer] = before + len(positions) - len(cache)
        if len(uids):
            fitted[layer] = (module, len(uids))
    if fitted:
        _fit_values(model, input_ids, hidden, fitted, written, steps, lr)
    report.seconds = time.perf_counter() - started
    return report


def _fit_values(model: nn.Module, input_ids: torch.Tensor, hidden: torch.Tensor | None,
                fitted: dict[int, tuple[AssociativeMemory, int]], written: torch.Tensor,
                steps: int, lr: float) -> None:
    """Fit the values of the newest entries of each layer on the chunk's next-token loss
    (from the lowest reading layer up when ``hidden``, its input, is known) until the
    ``written`` positions are recalled."""
    start = min(reading_layers(model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    olds: dict[int, torch.Tensor] = {}
    news: dict[int, torch.Tensor] = {}
    for layer, (module, count) in fitted.items():
        values = module.cache.values.detach()
        olds[layer] = values[:-count]
        news[layer] = torch.zeros_like(values[-count:], requires_grad=True)
    optimizer = torch.optim.Adam(list(news.values()), lr=lr)
    was_training = model.training
    model.eval()
    layers = {layer: module for layer, (module, _count) in fitted.items()}
    try:
        with not_counting(layers):
            for _ in range(steps):
                for layer, module in layers.items():
                    module.cache.values = torch.cat([olds[layer], news[layer]])
                if hidden is not None:
                    logits = logits_from_layer(model, hidden, start)[0, :-1].float()
                else:
                    logits = model(input_ids=input_ids).logits[0, :-1].float()
                losses = nn.functional.cross_entropy(logits, input_ids[0, 1:], reduction="none")
                if float(losses.detach()[written.to(losses.device)].max()) < RECALLED_NATS:
                    break
                loss = losses.mean()
                if not math.isfinite(float(loss.detach())):
                    break
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        for layer, module in layers.items():
            module.cache.values = torch.cat([olds[layer], news[layer].detach()])
        for parameter in trainable:
            parameter.requires_grad_(True)
        model.train(was_training)


def read_text(model: nn.Module, tokenizer: Any, text: str, *, document: str = "",
              chunk_tokens: int = CHUNK_TOKENS, steps: int = FIT_STEPS) -> ReadReport:
    """Read a whole text in chunks of ``chunk_tokens`` (each sees what the earlier ones
    wrote); reading it again in the same chunks finds every entry at distance zero."""
    if not isinstance(text, str):
        raise InputError("the text to read must be a string")
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    report = ReadReport(documents=1)
    for start in range(0, len(ids), chunk_tokens):
        part = read_chunk(model, tokenizer, ids[start:start + chunk_tokens],
                          document=document, offset=start, steps=steps)
        report.merge(part)
    report.documents = 1
    return report
