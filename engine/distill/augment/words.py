"""Whole-word swaps: homophones, commonly confused words and common misspellings.

The word lists are data, one file per language: ``data/swaps-<language>.json`` next to this
module, holding

* ``groups``: lists of words confused with one another ("their", "there", "they're"); any
  member may be swapped for any other member of any group it is in;
* ``misspellings``: a correct word -> its usual misspellings ("definitely" -> "definately");
  only the correct word is swapped (the noise goes one way).

All words are lower case letters with inner apostrophes. The rate is per listed word in the
text. A swap keeps the word's capitalisation (``Their`` -> ``There``, ``THEIR`` -> ``THERE``);
words in mixed case (``tHeir``) are not listed words. Apostrophes: ``’`` and ``'`` both match,
and a new apostrophe is written the way the text mostly writes them.
"""

from __future__ import annotations

import json
import random
import re
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable

from engine.distill.augment.base import Edit, Proposal, Transform, bernoulli, mark
from engine.errors import InputError

LANGUAGE = re.compile(r"[a-z]{2,3}(?:-[a-z0-9]{1,8})?")
LISTED_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


def _data_dir() -> Traversable:
    return resources.files("engine.distill.augment").joinpath("data")


def available_languages() -> list[str]:
    """The languages that have a word-swap list."""
    names = (entry.name for entry in _data_dir().iterdir())
    return sorted(name[len("swaps-"):-len(".json")] for name in names
                  if name.startswith("swaps-") and name.endswith(".json"))


def check_language(language: str) -> str:
    """``language`` when it has word lists, else an InputError naming the ones there are."""
    if not isinstance(language, str) or not LANGUAGE.fullmatch(language) \
            or language not in available_languages():
        raise InputError(f"no word-swap list for language {language!r}; available: "
                         f"{', '.join(available_languages())}")
    return language


@cache
def swap_table(language: str) -> dict[str, tuple[str, ...]]:
    """Lower-case word -> the words it may be swapped for, from the language's data file."""
    check_language(language)
    path = _data_dir().joinpath(f"swaps-{language}.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        groups: list[list[str]] = data["groups"]
        misspellings: dict[str, list[str]] = data["misspellings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path.name} is not a word-swap list ({exc}); reinstall mindset") \
            from exc
    pairs = [(word, other) for group in groups for word in group for other in group]
    pairs += [(word, wrong) for word, wrongs in misspellings.items() for wrong in wrongs]
    table: dict[str, dict[str, None]] = {}
    for word, other in pairs:
        for item in (word, other):
            if not isinstance(item, str) or not LISTED_WORD.fullmatch(item):
                raise InputError(f"{path.name}: {item!r} is not a lower-case word; fix the "
                                 "list")
        if other != word:
            table.setdefault(word, {})[other] = None  # a dict keeps the order, once each
    return {word: tuple(others) for word, others in table.items()}


@cache
def _words() -> re.Pattern[str]:
    # Letters with inner apostrophes, not glued to other word characters or marks.
    return re.compile(rf"(?<!\w)[^\W\d_]+(?:['’][^\W\d_]+)*(?!\w|{mark()})")


def _case_of(word: str) -> str | None:
    """``lower``, ``title`` or ``upper``; None for mixed case."""
    if word == word.lower():
        return "lower"
    if word == word.upper() and sum(char.isalpha() for char in word) > 1:
        return "upper"
    if word[0].isupper() and word[1:] == word[1:].lower():
        return "title"
    return None


def match_case(word: str, case: str) -> str:
    """Lower-case ``word`` written in ``case`` (``lower``, ``title`` or ``upper``)."""
    if case == "upper":
        return word.upper()
    if case == "title":
        return word[:1].upper() + word[1:]
    return word


class WordSwap(Transform):
    """Swaps a listed word for a homophone, a word it is confused with, or a misspelling,
    in the same capitalisation. Rate: per listed word."""

    name = "word-swap"
    unit = "listed words"
    summary = "swap a homophone or confused word, or misspell it (their -> there)"

    def __init__(self, rate: float, language: str = "en") -> None:
        super().__init__(rate, language)
        self.table = swap_table(check_language(language))

    def propose(self, text: str, rng: random.Random) -> Proposal:
        units: list[tuple[int, int, str, str]] = []
        for match in _words().finditer(text):
            word = match.group()
            case = _case_of(word)
            key = word.replace("’", "'").lower()
            if case is not None and key in self.table:
                units.append((match.start(), match.end(), key, case))
        if not units:
            return Proposal([], 0)
        apostrophe = "’" if text.count("’") > text.count("'") else "'"
        edits: list[Edit] = []
        for index in bernoulli(len(units), self.rate, rng):
            start, end, key, case = units[index]
            new = match_case(rng.choice(self.table[key]), case).replace("'", apostrophe)
            edits.append(Edit(start, end, new))
        return Proposal(edits, len(units))

