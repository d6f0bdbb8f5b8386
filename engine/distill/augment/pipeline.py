"""The augmenter: a pipeline of transforms applied to a text, with the changes it made.

Determinism: the random generator of the transform at position ``i`` of the pipeline is seeded
from SHA-256 of ``(seed, key, i, name, the text that transform is given)``. So the same seed,
key and text always give the same output, in any order of calls and in any process (nothing
depends on Python's hash randomisation), and two different texts get independent noise. Pass
a different ``key`` (an epoch number, a document index) to draw new noise for the same text.

Changes: alongside the output, :meth:`Augmenter.augment_with_changes` keeps the spans of the
output that differ from the input, each with the transform(s) that made it and the original
text it stands for. Each transform's edits are carried through the spans found so far in one
left-to-right pass:

* an edit that overlaps or touches an existing span merges with it (the span's original text
  grows to cover both, its transform becomes e.g. ``typo+homoglyph``, in pipeline order);
* every other span shifts by the growth of the edits before it;
* a span whose text comes back equal to its original (``ab`` -> ``ba`` -> ``ab``) is dropped.

Offsets outside spans map one to one onto the input, so a span's original offsets are its
offsets minus the net growth of the spans before it. Offsets count code points. Replacing
each change's span in the output by its ``original`` gives back the input exactly. A deletion
is a span with ``start == end``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.distill.augment.base import Edit, Transform, apply_edits
from engine.distill.augment.spec import build, check_steps, format_spec, parse_spec
from engine.distill.augment.words import check_language
from engine.errors import InputError
from engine.textdata import utf8_problem


@dataclass(frozen=True, slots=True)
class Change:
    """``output[start:end]`` replaced ``original`` (code-point offsets into the output)."""

    start: int
    end: int
    transform: str
    original: str

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "transform": self.transform,
                "original": self.original}


@dataclass(frozen=True, slots=True)
class Tally:
    """How often one transform fired: ``events`` hits among ``units`` eligible units."""

    name: str
    rate: float
    unit: str
    events: int
    units: int

    @property
    def observed(self) -> float | None:
        return self.events / self.units if self.units else None

    def as_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "unit": self.unit, "events": self.events,
                "units": self.units, "observed": self.observed}


@dataclass(frozen=True, slots=True)
class Augmented:
    text: str
    changes: tuple[Change, ...]
    counts: tuple[Tally, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "changes": [change.as_dict() for change in self.changes],
                "counts": {tally.name: tally.as_dict() for tally in self.counts}}


@dataclass(slots=True)
class _Span:
    start: int  # in the current text
    end: int
    origin_start: int  # in the input text
    origin_end: int
    steps: frozenset[int]  # pipeline positions of the transforms that made it

    @property
    def growth(self) -> int:
        return (self.end - self.start) - (self.origin_end - self.origin_start)


def carry(spans: list[_Span], edits: list[Edit], step: int, text: str,
          original: str) -> list[_Span]:
    """The spans of ``text`` (the text after ``edits``) given ``spans`` of the text before."""
    out: list[_Span] = []
    shift = 0  # growth of the text from the edits already passed
    lag = 0  # growth of the old spans already passed: old offset - lag = input offset
    index = 0
    group: _Span | None = None  # the span being built, in old offsets; growth kept apart
    group_growth = group_lag = 0

    def flush() -> None:
        nonlocal shift, lag, group
        assert group is not None
        span = _Span(group.start + shift, group.end + shift + group_growth,
                     group.start - lag, group.end - lag - group_lag, group.steps)
        shift += group_growth
        lag += group_lag
        if text[span.start:span.end] != original[span.origin_start:span.origin_end]:
            out.append(span)
        group = None

    for start, end, replacement in edits:
        if group is not None and start > group.end:
            flush()
        if group is None:
            while index < len(spans) and spans[index].end < start:
                old = spans[index]
                out.append(_Span(old.start + shift, old.end + shift, old.origin_start,
                                 old.origin_end, old.steps))
                lag += old.growth
                index += 1
            group = _Span(start, end, 0, 0, frozenset({step}))
            group_growth = group_lag = 0
        group.end = max(group.end, end)
        group_growth += len(replacement) - (end - start)
        while index < len(spans) and spans[index].start <= group.end:
            old = spans[index]
            group.start, group.end = min(group.start, old.start), max(group.end, old.end)
            group.steps |= old.steps
            group_lag += old.growth
            index += 1
    if group is not None:
        flush()
    out.extend(_Span(old.start + shift, old.end + shift, old.origin_start, old.origin_end,
                     old.steps) for old in spans[index:])
    return out


class Augmenter:
    """Applies a spec's transforms in order: ``Augmenter("typo=0.02").augment(text)``.

    ``spec`` is a ``NAME=RATE,...`` string (:mod:`.spec`) or a sequence of ``(name, rate)``
    pairs; ``language`` picks the word-swap lists. Everything is checked here, before any text.
    """

    def __init__(self, spec: str | Sequence[tuple[str, float]], seed: int = 0,
                 language: str = "en") -> None:
        steps = parse_spec(spec) if isinstance(spec, str) else check_steps(spec)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InputError(f"the seed must be a whole number, not {seed!r}")
        self.seed = seed
        self.language = check_language(language)
        self.steps = steps
        self.transforms: list[Transform] = build(steps, self.language)

    @property
    def spec(self) -> str:
        return format_spec(self.steps)

    def __repr__(self) -> str:
        return f"Augmenter({self.spec!r}, seed={self.seed}, language={self.language!r})"

    def _rng(self, step: int, name: str, text: str, key: int | str) -> random.Random:
        digest = hashlib.sha256(f"{self.seed}\0{key!r}\0{step}\0{name}\0".encode())
        digest.update(text.encode("utf-8"))
        return random.Random(int.from_bytes(digest.digest()[:16], "big"))

    @staticmethod
    def _check(text: str) -> None:
        if not isinstance(text, str):
            raise InputError(f"augment takes text (str), not {type(text).__name__}")
        problem = utf8_problem(text)
        if problem is not None:
            raise InputError(f"the text is not valid UTF-8 ({problem}); give UTF-8 text")

    def augment(self, text: str, key: int | str = 0) -> str:
        """``text`` with the pipeline's noise (the same as ``augment_with_changes(...).text``,
        without keeping track of the changes)."""
        self._check(text)
        for step, transform in enumerate(self.transforms):
            if transform.rate > 0.0:
                rng = self._rng(step, transform.name, text, key)
                text = apply_edits(text, transform.propose(text, rng).edits)
        return text

    def augment_with_changes(self, text: str, key: int | str = 0) -> Augmented:
        """The noised text, the spans of it that differ from ``text``, and per-transform
        counts of hits and eligible units."""
        self._check(text)
        original = current = text
        spans: list[_Span] = []
        counts: list[Tally] = []
        for step, transform in enumerate(self.transforms):
            proposal = transform.propose(current, self._rng(step, transform.name, current, key))
            counts.append(Tally(transform.name, transform.rate, transform.unit,
                                len(proposal.edits), proposal.units))
            if proposal.edits:
                current_next = apply_edits(current, proposal.edits)
                spans = carry(spans, proposal.edits, step, current_next, original)
                current = current_next
        names = [transform.name for transform in self.transforms]
        changes = tuple(
            Change(span.start, span.end, "+".join(names[step] for step in sorted(span.steps)),
                   original[span.origin_start:span.origin_end])
            for span in spans
        )
        return Augmented(current, changes, tuple(counts))
