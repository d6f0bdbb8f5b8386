"""Character noise: typos, stray whitespace, and doubled or undoubled letters.

Units (what each rate is per):

* ``delete``, ``insert``, ``typo``: per letter or digit (``str.isalnum``; a letter with its
  combining marks counts once and moves as one).
* ``transpose``: per pair of adjacent, different letters/digits. A swapped pair uses up the
  next pair (they share a letter), so the pair after a swap is not counted as considered.
* ``replace``, ``replace-uniform``: per ASCII letter or digit (the keys of the layout).
  ``replace`` picks a key next to it on a QWERTY keyboard (:mod:`.keyboard`); ``replace-uniform``
  another letter of the same case, or another digit, uniformly.
* ``whitespace``: per word (a run of non-space characters). A hit doubles the whitespace
  character after the word 80% of the time and splits the word with a space 20% of the time
  (always the one that is possible, when only one is).
* ``run``: per run of a repeated letter (``ll`` in "hello"); a hit adds one letter or drops
  one, with even odds.

``insert`` adds a key next to the letter (before or after it, with even odds); a letter that is
not on the layout (``é``, CJK) is doubled instead, like a key pressed twice. ``typo`` picks one
of delete, insert, transpose and replace (keyboard) uniformly among those possible at the hit
letter (transpose needs a different letter right after it, replace an ASCII letter or digit).
"""

from __future__ import annotations

import random
import re
import string
import unicodedata
from functools import cache
from typing import ClassVar

from engine.distill.augment.base import (
    Edit,
    Proposal,
    Transform,
    alnum_clusters,
    bernoulli,
    mark,
)
from engine.distill.augment.keyboard import neighbours

ASCII_ALNUM = re.compile(r"[A-Za-z0-9]")
WORDS = re.compile(r"\S+")


@cache
def _letter_runs() -> re.Pattern[str]:
    # A run must not end in a letter carrying a mark: "ee" + U+0301 is not "ee".
    return re.compile(rf"([^\W\d_])\1+(?!{mark()})")


def _is_mark(char: str) -> bool:
    return unicodedata.category(char)[0] == "M"


def _swappable(text: str, clusters: list[tuple[int, int]], index: int) -> bool:
    """Whether cluster ``index`` and the next one touch and differ."""
    if index + 1 >= len(clusters):
        return False
    (start, end), (next_start, next_end) = clusters[index], clusters[index + 1]
    return end == next_start and text[start:end] != text[next_start:next_end]


def _uniform_key(char: str, rng: random.Random) -> str:
    if char.isdigit():
        pool = string.digits
    elif char.isupper():
        pool = string.ascii_uppercase
    else:
        pool = string.ascii_lowercase
    choice = rng.choice(pool[:-1])  # one fewer than the pool: skip the char itself
    return pool[-1] if choice == char else choice


def _delete(span: tuple[int, int]) -> Edit:
    return Edit(span[0], span[1], "")


def _insert(text: str, span: tuple[int, int], rng: random.Random) -> Edit:
    cluster = text[span[0]:span[1]]
    keys = neighbours(cluster[0])
    extra = rng.choice(keys) if keys else cluster
    joined = extra + cluster if rng.random() < 0.5 else cluster + extra
    return Edit(span[0], span[1], joined)


def _transpose(text: str, first: tuple[int, int], second: tuple[int, int]) -> Edit:
    return Edit(first[0], second[1], text[second[0]:second[1]] + text[first[0]:first[1]])


def _replace(text: str, position: int, rng: random.Random, uniform: bool) -> Edit:
    char = text[position]
    new = _uniform_key(char, rng) if uniform else rng.choice(neighbours(char))
    return Edit(position, position + 1, new)


class Delete(Transform):
    """Drops a letter or digit, with its marks. Rate: per letter or digit."""

    name = "delete"
    unit = "letters and digits"
    summary = "drop a letter or digit"

    def propose(self, text: str, rng: random.Random) -> Proposal:
        clusters = alnum_clusters(text)
        hits = bernoulli(len(clusters), self.rate, rng)
        return Proposal([_delete(clusters[index]) for index in hits], len(clusters))


class Insert(Transform):
    """Adds a neighbouring key before or after a letter or digit (a letter off the layout
    is doubled). Rate: per letter or digit."""

    name = "insert"
    unit = "letters and digits"
    summary = "add a neighbouring key next to a letter or digit"

    def propose(self, text: str, rng: random.Random) -> Proposal:
        clusters = alnum_clusters(text)
        hits = bernoulli(len(clusters), self.rate, rng)
        return Proposal([_insert(text, clusters[index], rng) for index in hits], len(clusters))


class Transpose(Transform):
    """Swaps two adjacent, different letters or digits. Rate: per such pair, not counting
    the pair right after a swap (it shares the swapped letter)."""

    name = "transpose"
    unit = "pairs of adjacent letters"
    summary = "swap two adjacent letters or digits"

    def propose(self, text: str, rng: random.Random) -> Proposal:
        clusters = alnum_clusters(text)
        pairs = [index for index in range(len(clusters) - 1)
                 if _swappable(text, clusters, index)]
        edits: list[Edit] = []
        blocked = 0
        last = -2
        for hit in bernoulli(len(pairs), self.rate, rng):
            index = pairs[hit]
            if index == last + 1:  # shares a letter with the previous swap
                continue
            edits.append(_transpose(text, clusters[index], clusters[index + 1]))
            last = index
            if hit + 1 < len(pairs) and pairs[hit + 1] == index + 1:
                blocked += 1
        return Proposal(edits, len(pairs) - blocked)


class Replace(Transform):
    """Replaces an ASCII letter or digit by a key next to it on a QWERTY keyboard. Rate: per
    ASCII letter or digit."""

    name = "replace"
    unit = "ASCII letters and digits"
    summary = "replace a letter or digit by a neighbouring key (QWERTY)"
    uniform: ClassVar[bool] = False

    def propose(self, text: str, rng: random.Random) -> Proposal:
        positions = [match.start() for match in ASCII_ALNUM.finditer(text)]
        hits = bernoulli(len(positions), self.rate, rng)
        edits = [_replace(text, positions[index], rng, self.uniform) for index in hits]
        return Proposal(edits, len(positions))


class ReplaceUniform(Replace):
    """Replaces an ASCII letter by another of the same case, or a digit by another digit,
    uniformly. Rate: per ASCII letter or digit."""

    name = "replace-uniform"
    summary = "replace a letter or digit by another, uniformly"
    uniform = True


class Typo(Transform):
    """Delete, insert, transpose or replace (keyboard), one picked uniformly among those
    possible at each hit. Rate: per letter or digit, not counting one used up by a swap."""

    name = "typo"
    unit = "letters and digits"
    summary = "one of delete, insert, transpose, replace per hit"

    def propose(self, text: str, rng: random.Random) -> Proposal:
        clusters = alnum_clusters(text)
        edits: list[Edit] = []
        blocked = 0
        taken = -1  # the last cluster used by a swap
        for index in bernoulli(len(clusters), self.rate, rng):
            if index <= taken:
                continue  # already counted as blocked
            start, end = clusters[index]
            kinds = ["delete", "insert"]
            if end - start == 1 and ASCII_ALNUM.match(text, start):
                kinds.append("replace")
            if _swappable(text, clusters, index):
                kinds.append("transpose")
            kind = rng.choice(kinds)
            if kind == "delete":
                edits.append(_delete(clusters[index]))
            elif kind == "insert":
                edits.append(_insert(text, clusters[index], rng))
            elif kind == "replace":
                edits.append(_replace(text, start, rng, uniform=False))
            else:
                edits.append(_transpose(text, clusters[index], clusters[index + 1]))
                taken = index + 1
                blocked += 1
        return Proposal(edits, len(clusters) - blocked)


class Whitespace(Transform):
    """Doubles the whitespace after a word (80%) or splits the word with a space (20%).
    Rate: per word."""

    name = "whitespace"
    unit = "words"
    summary = "double the space after a word (80%) or split the word with a space (20%)"

    @staticmethod
    def _split_points(text: str, start: int, end: int) -> list[int]:
        """Places inside a word between a letter (or its mark) and a following letter."""
        return [point for point in range(start + 1, end)
                if text[point].isalnum() and (text[point - 1].isalnum()
                                              or _is_mark(text[point - 1]))]

    def propose(self, text: str, rng: random.Random) -> Proposal:
        words = [match.span() for match in WORDS.finditer(text)]
        if words and words[-1][1] == len(text) and not self._split_points(text, *words[-1]):
            words.pop()  # the last word has neither a space after it nor a place to split
        edits: list[Edit] = []
        for index in bernoulli(len(words), self.rate, rng):
            start, end = words[index]
            double = rng.random() < 0.8
            points = [] if double and end < len(text) else self._split_points(text, start, end)
            if end < len(text) and (double or not points):
                # A Windows line end is doubled whole, never into "\r\r\n".
                after = 2 if text.startswith("\r\n", end) else 1
                edits.append(Edit(end, end + after, text[end:end + after] * 2))
            else:
                point = rng.choice(points)
                edits.append(Edit(point - 1, point, text[point - 1] + " "))
        return Proposal(edits, len(words))


class Run(Transform):
    """Adds or drops one letter of a run of a repeated letter. Rate: per run."""

    name = "run"
    unit = "runs of a repeated letter"
    summary = "add or drop one letter of a doubled letter (ll -> lll or l)"

    def propose(self, text: str, rng: random.Random) -> Proposal:
        runs = [match.span() for match in _letter_runs().finditer(text)]
        edits: list[Edit] = []
        for index in bernoulli(len(runs), self.rate, rng):
            start, end = runs[index]
            length = end - start + (1 if rng.random() < 0.5 else -1)
            edits.append(Edit(start, end, text[start] * length))
        return Proposal(edits, len(runs))


CHARACTER_TRANSFORMS: tuple[type[Transform], ...] = (
    Typo, Delete, Insert, Transpose, Replace, ReplaceUniform, Whitespace, Run,
)
