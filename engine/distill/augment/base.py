"""The common interface of the corpus transforms, and the sampling they share.

A transform looks at a text and proposes :class:`Edit` s: sorted, non-overlapping
``(start, end, replacement)`` triples in that text's code-point offsets, each of which changes
something. It also reports how many *eligible units* it considered (characters, letter pairs,
listed words...), so that ``events / units`` is the observed rate.

Each eligible unit is hit independently with probability ``rate``. Rather than draw one
uniform number per unit, :func:`bernoulli` draws the gaps between hits, which are geometric:
``P(gap = k) = (1 - p)^k p``, so ``gap = floor(log V / log(1 - p))`` with ``V`` uniform on
``(0, 1]``. That is the same distribution as a coin per unit, at a cost proportional to the
number of hits.

Clusters: a letter followed by combining marks (``e`` + U+0301) is one unit, so that deleting
or swapping a letter takes its accents with it instead of moving them onto a neighbour. The
regular-expression class of marks is built once from :mod:`unicodedata` (planes 0, 1 and 14,
the only ones where Unicode assigns marks).
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable
from functools import cache
from typing import ClassVar, NamedTuple


class Edit(NamedTuple):
    """Replace ``text[start:end]`` by ``replacement`` (code-point offsets)."""

    start: int
    end: int
    replacement: str


class Proposal(NamedTuple):
    """What a transform would do to one text: its edits and the units it considered."""

    edits: list[Edit]
    units: int


class Transform(ABC):
    """One kind of noise at a given rate per eligible unit.

    Subclasses set ``name`` (as written in a spec), ``unit`` (what the rate is per, for the
    statistics) and ``summary`` (one line for help texts), and implement :meth:`propose`.
    """

    name: ClassVar[str]
    unit: ClassVar[str]
    summary: ClassVar[str]

    def __init__(self, rate: float, language: str = "en") -> None:
        self.rate = rate
        self.language = language

    @abstractmethod
    def propose(self, text: str, rng: random.Random) -> Proposal:
        """Sorted, non-overlapping edits of ``text``, each a real change, and the number of
        eligible units considered."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rate={self.rate})"


def bernoulli(count: int, rate: float, rng: random.Random) -> list[int]:
    """The indices in ``range(count)`` hit by independent coins of probability ``rate``."""
    if count <= 0 or rate <= 0.0:
        return []
    if rate >= 1.0:
        return list(range(count))
    log_miss = math.log1p(-rate)
    hits: list[int] = []
    index = -1
    while True:
        # 1 - random() lies in (0, 1], so the log is finite and <= 0.
        index += 1 + int(math.log(1.0 - rng.random()) / log_miss)
        if index >= count:
            return hits
        hits.append(index)


def apply_edits(text: str, edits: list[Edit]) -> str:
    """``text`` with sorted, non-overlapping ``edits`` applied."""
    if not edits:
        return text
    pieces: list[str] = []
    position = 0
    for start, end, replacement in edits:
        pieces.append(text[position:start])
        pieces.append(replacement)
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def char_class(points: Iterable[int]) -> str:
    """The body of a regex character class matching exactly the given code points, written
    as ranges (``a-z``) so that it stays short."""
    ranges: list[list[int]] = []
    for point in sorted(points):
        if ranges and ranges[-1][1] == point - 1:
            ranges[-1][1] = point
        else:
            ranges.append([point, point])
    return "".join(
        re.escape(chr(low)) if low == high else f"{re.escape(chr(low))}-{re.escape(chr(high))}"
        for low, high in ranges
    )


@cache
def _mark_tables() -> tuple[str, str]:
    """Regex fragments matching one (a) mark, category M*, or (b) character with a non-zero
    canonical combining class, the ones normalisation attaches to the preceding starter.

    Each is a BMP class with an astral class behind a cheap guard: ``re`` tests a class of
    BMP characters with a lookup table, but one that reaches past U+FFFF range by range."""
    points = [point for first, last in ((0, 0x1FFFF), (0xE0000, 0xE0FFF))
              for point in range(first, last + 1) if not 0xD800 <= point <= 0xDFFF]
    marks = [point for point in points if unicodedata.category(chr(point))[0] == "M"]
    combining = [point for point in points if unicodedata.combining(chr(point)) != 0]
    return _fragment(marks), _fragment(combining)


def _fragment(points: list[int]) -> str:
    low = char_class(point for point in points if point <= 0xFFFF)
    high = char_class(point for point in points if point > 0xFFFF)
    if not high:
        return f"[{low}]"
    return rf"(?:[{low}]|(?=[^\x00-\uffff])[{high}])"


def mark() -> str:
    """A regex fragment matching one mark (Mn, Mc, Me)."""
    return _mark_tables()[0]


def combining() -> str:
    """A regex fragment matching one character of non-zero canonical combining class."""
    return _mark_tables()[1]


@cache
def _alnum_clusters() -> re.Pattern[str]:
    return re.compile(rf"[^\W_]{mark()}*")


def alnum_clusters(text: str) -> list[tuple[int, int]]:
    """The spans of the letters and digits (``str.isalnum``) of ``text``, each with the marks
    that follow it."""
    return [match.span() for match in _alnum_clusters().finditer(text)]
