"""A cascade: each agent step goes to a small model first, and defers to a larger one when
the small one is unsure (the proposal's "lesser models do most of the work").

Unsureness is the small model's mean token entropy over its answer, in nats, estimated from
the top log-probabilities the adapter returns (``SamplingParams.logprobs``):
``H_t = -sum_i p_i log p_i - r log p_min`` over the top alternatives ``p_i``, where the rest
of the mass ``r`` is taken to sit on tokens as likely as the least likely alternative
``p_min`` (no other token can be likelier; this is the tightest lower bound on the true
entropy that the top alternatives allow). Adapters that return no
log-probabilities are asked for their stated confidence (0 to 10) instead, and unsureness
is ``1 - confidence / 10``. Every step records which model answered.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace

from engine.errors import InputError
from engine.llm.adapter import BaseAdapter
from engine.llm.types import ChatMessage, MessageLike, SamplingParams, TokenLogprob

TOP_ALTERNATIVES = 5
# Steps an agent runs; a cascade may send only some of them to the small model first.
STEPS = ("answer", "importance", "summary", "reflection", "priority", "inner")


@dataclass(frozen=True)
class StepResult:
    """One step's answer, and who gave it."""

    step: str
    text: str
    model: str
    interaction_id: str
    deferred: bool = False
    uncertainty: float | None = None  # of the small model's answer
    measure: str = "none"  # "entropy" (nats), "stated confidence" or "none"
    small_text: str | None = None  # the small model's answer, when it deferred


@dataclass
class CascadeStats:
    calls: Counter[str] = field(default_factory=Counter)
    deferred: Counter[str] = field(default_factory=Counter)

    def rate(self, step: str | None = None) -> float:
        calls = sum(self.calls.values()) if step is None else self.calls[step]
        deferred = sum(self.deferred.values()) if step is None else self.deferred[step]
        return deferred / calls if calls else 0.0


class Cascade:
    """Answers agent steps with ``small``, deferring to ``large`` above a threshold.

    Without ``large`` every step goes to ``small`` and nothing is measured. ``steps`` limits
    the cascade to some steps; the others go straight to ``large`` when there is one.
    """

    def __init__(self, small: BaseAdapter, large: BaseAdapter | None = None, *,
                 entropy_threshold: float = 2.0, confidence_threshold: float = 0.6,
                 steps: Iterable[str] = STEPS) -> None:
        if not math.isfinite(entropy_threshold) or entropy_threshold < 0:
            raise InputError(f"the entropy threshold must be >= 0 nats, not {entropy_threshold}")
        if not 0 <= confidence_threshold <= 1:
            raise InputError("the confidence threshold must be in [0, 1], not "
                             f"{confidence_threshold}")
        self.small = small
        self.large = large
        self.entropy_threshold = entropy_threshold
        self.confidence_threshold = confidence_threshold
        self.steps = frozenset(steps)
        unknown = self.steps - set(STEPS)
        if unknown:
            raise InputError(f"unknown cascade steps {sorted(unknown)}; use some of "
                             + ", ".join(STEPS))
        self.stats = CascadeStats()

    @property
    def adapters(self) -> list[BaseAdapter]:
        return [self.small] + ([self.large] if self.large is not None else [])

    @property
    def models(self) -> list[str]:
        return [self.small.model] + ([self.large.model] if self.large is not None else [])

    async def run(self, step: str, messages: Sequence[MessageLike],
                  params: SamplingParams, *, conversation_id: str | None = None,
                  parent_id: str | None = None) -> StepResult:
        """Answer one step; the small model's answer stands unless it is unsure."""
        self.stats.calls[step] += 1
        if self.large is None:
            reply = await self.small.chat(messages, params, conversation_id=conversation_id,
                                          parent_id=parent_id)
            return StepResult(step, reply.text, self.small.model, reply.id)
        if step not in self.steps:
            reply = await self.large.chat(messages, params, conversation_id=conversation_id,
                                          parent_id=parent_id)
            return StepResult(step, reply.text, self.large.model, reply.id)
        asked = replace(params, logprobs=TOP_ALTERNATIVES)
        first = await self.small.chat(messages, asked, conversation_id=conversation_id,
                                      parent_id=parent_id)
        if first.logprobs:
            measure, uncertainty = "entropy", mean_entropy(first.logprobs)
            unsure = uncertainty > self.entropy_threshold
        else:
            confidence = await self._stated_confidence(messages, first.text, conversation_id,
                                                       first.id)
            measure = "stated confidence"
            uncertainty = 1.0 - confidence
            unsure = confidence < self.confidence_threshold
        if not unsure:
            return StepResult(step, first.text, self.small.model, first.id,
                              uncertainty=uncertainty, measure=measure)
        self.stats.deferred[step] += 1
        second = await self.large.chat(messages, params, conversation_id=conversation_id,
                                       parent_id=parent_id)
        return StepResult(step, second.text, self.large.model, second.id, deferred=True,
                          uncertainty=uncertainty, measure=measure, small_text=first.text)

    async def stream(self, step: str, messages: Sequence[MessageLike],
                     params: SamplingParams, *, conversation_id: str | None = None,
                     parent_id: str | None = None) -> AsyncIterator[str | StepResult]:
        """Text pieces as they come, then the :class:`StepResult`. A step the cascade must
        judge first arrives whole (the small model's answer is not shown until it stands)."""
        if self.large is not None and step in self.steps:
            yield await self.run(step, messages, params, conversation_id=conversation_id,
                                 parent_id=parent_id)
            return
        self.stats.calls[step] += 1
        adapter = self.large or self.small
        pieces: list[str] = []
        interaction = ""
        async for chunk in adapter.stream_chat(messages, params,
                                               conversation_id=conversation_id,
                                               parent_id=parent_id):
            interaction = chunk.id
            if chunk.text:
                pieces.append(chunk.text)
                yield chunk.text
        yield StepResult(step, "".join(pieces), adapter.model, interaction)

    async def _stated_confidence(self, messages: Sequence[MessageLike], answer: str,
                                 conversation_id: str | None, parent_id: str) -> float:
        history = [m if isinstance(m, ChatMessage) else ChatMessage(str(m["role"]),
                                                                     str(m["content"]))
                   for m in messages]
        ask = [*history, ChatMessage("assistant", answer),
               ChatMessage("user", "How confident are you in that answer, from 0 (guessing) "
                           "to 10 (certain)? Reply with one number.")]
        reply = await self.small.chat(ask, SamplingParams(max_tokens=6, temperature=0),
                                      conversation_id=conversation_id, parent_id=parent_id)
        return stated_confidence(reply.text)


def mean_entropy(tokens: Sequence[TokenLogprob]) -> float:
    """The mean over tokens of each one's entropy (nats), from its top alternatives."""
    if not tokens:
        return 0.0
    total = 0.0
    for token in tokens:
        alternatives = token.top or ((token.token, token.logprob),)
        probabilities = [math.exp(lp) for _, lp in alternatives if math.isfinite(lp)]
        probabilities = [p for p in probabilities if p > 0]
        if not probabilities:
            continue
        rest = max(0.0, 1.0 - sum(probabilities))
        total += -sum(p * math.log(p) for p in probabilities)
        if rest > 0:
            total += -rest * math.log(min(min(probabilities), rest))
    return total / len(tokens)


_DIGITS = re.compile(r"\d+(?:\.\d+)?")


def stated_confidence(text: str) -> float:
    """The first number in ``text`` read as a confidence out of 10 (or a percentage or a
    fraction), in [0, 1]; 0 when there is none (an unreadable answer is an unsure one)."""
    match = _DIGITS.search(text)
    if match is None:
        return 0.0
    value = float(match.group())
    if "%" in text[match.end():match.end() + 2] or value > 10:
        value /= 100
    elif value > 1 or "." not in match.group():
        value /= 10
    return max(0.0, min(1.0, value))
