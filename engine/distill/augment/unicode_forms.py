"""Unicode noise: normal forms, compatibility variants, stray combining marks, homoglyphs.

Units (what each rate is per):

* ``nfc``, ``nfd``, ``nfkc``, ``nfkd``: per cluster (a starter and the characters of non-zero
  combining class after it) that the normal form would change. A hit rewrites that cluster in
  the form, so ``nfd`` turns ``é`` into ``e`` + U+0301 in some words and not in others, and
  ``nfkc`` turns ``ﬁ`` back into ``fi``. On ASCII text all four have nothing to do.
* ``compat``: per character or short sequence (up to 3 characters, longest first) that has a
  compatibility variant: a character whose NFKC form is that text (``ﬁ`` for ``fi``, ``Ａ`` for
  ``A``, ``²`` for ``2``, a no-break space for a space). The variants come from searching the
  inverse of NFKC over the Basic Multilingual Plane once, with :mod:`unicodedata`.
* ``combining``: per letter; a hit adds a combining mark after it, drawn uniformly from the
  Combining Diacritical Marks block (U+0300-U+036F, the characters unicodedata gives a
  non-zero combining class).
* ``homoglyph``: per character that has a confusable; a hit replaces it by a character that
  Unicode's confusables data (``confusables.json`` shipped by ``confusable-homoglyphs``) lists
  as confusable with it, one character for one. Marks, separators and control characters are
  left out on both sides: a mark would fuse with its neighbour, and spaces are the business of
  the ``whitespace`` transform.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from functools import cache
from importlib import resources
from typing import ClassVar, Literal

from engine.distill.augment.base import (
    Edit,
    Proposal,
    Transform,
    bernoulli,
    char_class,
    combining,
    mark,
)
from engine.errors import InputError

Form = Literal["NFC", "NFD", "NFKC", "NFKD"]
LONGEST_COMPAT = 3  # longer NFKC images ("rad/s", Arabic ligature phrases) are left out


@cache
def _form_candidates() -> re.Pattern[str]:
    """Clusters that could change under some normal form: a (possibly absent) starter with
    combining characters, or a non-ASCII starter."""
    ccc = combining()
    return re.compile(rf"(?:(?!{ccc}).)?{ccc}+|(?![\x00-\x7f])(?!{ccc}).{ccc}*", re.DOTALL)


class NormalForm(Transform):
    """Rewrites a cluster in the normal form ``form``. Rate: per cluster that the form
    changes."""

    form: ClassVar[Form] = "NFC"
    unit = "clusters the form changes"

    def propose(self, text: str, rng: random.Random) -> Proposal:
        if unicodedata.is_normalized(self.form, text):
            return Proposal([], 0)
        units: list[tuple[int, int, str]] = []
        for match in _form_candidates().finditer(text):
            normal = unicodedata.normalize(self.form, match.group())
            if normal != match.group():
                units.append((match.start(), match.end(), normal))
        hits = bernoulli(len(units), self.rate, rng)
        return Proposal([Edit(*units[index]) for index in hits], len(units))


class Nfc(NormalForm):
    name = "nfc"
    summary = "compose some clusters (e + U+0301 -> é)"
    form = "NFC"


class Nfd(NormalForm):
    name = "nfd"
    summary = "decompose some clusters (é -> e + U+0301)"
    form = "NFD"


class Nfkc(NormalForm):
    name = "nfkc"
    summary = "compatibility-compose some clusters (ﬁ -> fi)"
    form = "NFKC"


class Nfkd(NormalForm):
    name = "nfkd"
    summary = "compatibility-decompose some clusters (ﬁ -> fi, é -> e + U+0301)"
    form = "NFKD"


@cache
def compat_variants() -> dict[str, tuple[str, ...]]:
    """Text (up to 3 characters) -> the BMP characters whose NFKC form it is."""
    table: dict[str, list[str]] = {}
    for point in range(0x10000):
        if 0xD800 <= point <= 0xDFFF:
            continue
        char = chr(point)
        image = unicodedata.normalize("NFKC", char)
        if image != char and 0 < len(image) <= LONGEST_COMPAT:
            table.setdefault(image, []).append(char)
    return {image: tuple(chars) for image, chars in table.items()}


@cache
def _compat_starts() -> frozenset[str]:
    """First characters of the multi-character keys, to skip the longer look-ups."""
    return frozenset(image[0] for image in compat_variants() if len(image) > 1)


class Compat(Transform):
    """Replaces a character or short sequence by a compatibility variant (its NFKC form is
    the original). Rate: per character or sequence that has one, longest first."""

    name = "compat"
    unit = "characters with a compatibility variant"
    summary = "use a compatibility variant (fi -> ﬁ, A -> Ａ, 2 -> ²)"

    def propose(self, text: str, rng: random.Random) -> Proposal:
        table, starts = compat_variants(), _compat_starts()
        units: list[tuple[int, int]] = []
        position, length = 0, len(text)
        while position < length:
            sizes = range(LONGEST_COMPAT, 0, -1) if text[position] in starts else (1,)
            for size in sizes:
                piece = text[position:position + size]
                if len(piece) == size and piece in table:
                    units.append((position, position + size))
                    position += size
                    break
            else:
                position += 1
        hits = bernoulli(len(units), self.rate, rng)
        edits = [Edit(start, end, rng.choice(table[text[start:end]]))
                 for start, end in (units[index] for index in hits)]
        return Proposal(edits, len(units))


@cache
def _diacritics() -> tuple[str, ...]:
    return tuple(chr(point) for point in range(0x300, 0x370)
                 if unicodedata.combining(chr(point)) != 0)


@cache
def _letters() -> re.Pattern[str]:
    return re.compile(rf"[^\W\d_]{mark()}*")


class Combining(Transform):
    """Adds a combining diacritical mark after a letter. Rate: per letter."""

    name = "combining"
    unit = "letters"
    summary = "add a combining mark after a letter (e -> e + U+0301)"

    def propose(self, text: str, rng: random.Random) -> Proposal:
        letters = [match.span() for match in _letters().finditer(text)]
        marks = _diacritics()
        edits = [Edit(start, end, text[start:end] + rng.choice(marks))
                 for start, end in (letters[index]
                                    for index in bernoulli(len(letters), self.rate, rng))]
        return Proposal(edits, len(letters))


def _visible(char: str) -> bool:
    return unicodedata.category(char)[0] not in "MZC"


@cache
def confusables() -> dict[str, tuple[str, ...]]:
    """Character -> the single characters Unicode lists as confusable with it (not itself)."""
    try:
        source = resources.files("confusable_homoglyphs").joinpath("confusables.json")
        data = json.loads(source.read_text(encoding="utf-8"))
    except (ModuleNotFoundError, FileNotFoundError, json.JSONDecodeError) as exc:
        raise InputError("the homoglyph transform needs the confusables data of the "
                         "confusable-homoglyphs package; install it with "
                         "`pip install confusable-homoglyphs`") from exc
    table: dict[str, tuple[str, ...]] = {}
    for char, entries in data.items():
        if len(char) != 1 or not _visible(char):
            continue
        # dict.fromkeys keeps the data's order and drops repeats (it lists some twice).
        others = tuple(dict.fromkeys(
            entry["c"] for entry in entries
            if len(entry["c"]) == 1 and entry["c"] != char and _visible(entry["c"])
        ))
        if others:
            table[char] = others
    return table


@cache
def _confusable_chars() -> re.Pattern[str]:
    return re.compile(f"[{char_class(ord(char) for char in confusables())}]")


class Homoglyph(Transform):
    """Replaces a character by one that Unicode lists as confusable with it. Rate: per
    character that has a confusable."""

    name = "homoglyph"
    unit = "characters with a confusable"
    summary = "replace a character by a confusable one (a -> а, Cyrillic)"

    def propose(self, text: str, rng: random.Random) -> Proposal:
        table = confusables()
        positions = [match.start() for match in _confusable_chars().finditer(text)]
        edits = [Edit(position, position + 1, rng.choice(table[text[position]]))
                 for position in (positions[index]
                                  for index in bernoulli(len(positions), self.rate, rng))]
        return Proposal(edits, len(positions))


UNICODE_TRANSFORMS: tuple[type[Transform], ...] = (
    Nfc, Nfd, Nfkc, Nfkd, Compat, Combining, Homoglyph,
)
