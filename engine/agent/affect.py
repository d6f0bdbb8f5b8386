"""Arousal/valence labels: parsed leniently from a reply, fed into the next prompt, pinnable.

Each reply is asked to end with a line such as ``[feeling: calm, content | arousal -0.4 |
valence 0.6]``. Small models format it loosely, so the parser accepts any order of the
fields, ``:`` or ``=``, JSON objects (``{"arousal": 0.2, "valence": -0.5}``), and words in
place of numbers ("high arousal"); values are clamped into [-1, 1]. What cannot be read is
reported as a :class:`ParseFailure` (the caller logs and shows it), never silently dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import InputError


@dataclass(frozen=True)
class Affect:
    """A feeling: arousal and valence in [-1, 1], and a word or two that names it."""

    arousal: float
    valence: float
    label: str = ""

    def __post_init__(self) -> None:
        for name in ("arousal", "valence"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) \
                    or not -1.0 <= value <= 1.0:
                raise InputError(f"{name} must be a number in [-1, 1], not {value!r}")

    def describe(self) -> str:
        """The label and numbers, as the prompt and the screen show them."""
        name = self.label or quadrant_word(self.arousal, self.valence)
        return f"{name} (arousal {self.arousal:+.1f}, valence {self.valence:+.1f})"

    def tag(self) -> str:
        """The line a reply ends with, in the format the prompt asks for."""
        name = self.label or quadrant_word(self.arousal, self.valence)
        return f"[feeling: {name} | arousal {self.arousal:+.1f} | valence {self.valence:+.1f}]"


@dataclass(frozen=True)
class ParseFailure:
    """Why a reply's feeling could not be read, with the text that was looked at."""

    reason: str
    text: str


NEUTRAL = Affect(0.0, 0.0, "neutral")

# Named states a user can pin by word (`/emotion bored`); the proposal's "bored" pushes the
# agent toward novelty: low arousal, mildly negative.
NAMED: dict[str, Affect] = {
    "neutral": NEUTRAL,
    "calm": Affect(-0.5, 0.5, "calm, positive"),
    "happy": Affect(0.5, 0.8, "happy"),
    "excited": Affect(0.8, 0.6, "excited"),
    "curious": Affect(0.4, 0.4, "curious"),
    "bored": Affect(-0.6, -0.3, "bored"),
    "sad": Affect(-0.5, -0.7, "sad"),
    "anxious": Affect(0.7, -0.6, "anxious"),
    "angry": Affect(0.8, -0.8, "angry"),
}

_WORD_VALUES = {"very high": 0.9, "high": 0.6, "medium": 0.0, "moderate": 0.0, "neutral": 0.0,
                "low": -0.6, "very low": -0.9, "positive": 0.6, "negative": -0.6}
_NUMBER = r"([-+]?\d+(?:\.\d+)?(?:\s*/\s*\d+)?)"
_FIELD = {name: re.compile(rf"\b{name}\b\s*[:=]?\s*\"?{_NUMBER}", re.IGNORECASE)
          for name in ("arousal", "valence")}
_WORD_FIELD = {name: re.compile(rf"\b(very high|very low|high|low|medium|moderate|neutral|"
                                rf"positive|negative)\s+{name}\b|\b{name}\b\s*[:=]?\s*"
                                rf"(very high|very low|high|low|medium|moderate|neutral|"
                                rf"positive|negative)\b", re.IGNORECASE)
               for name in ("arousal", "valence")}
_LABEL = re.compile(r"\b(?:feeling|emotion|mood)\b\s*[:=]\s*\"?([^|\]\n\"{},]+(?:,[^|\]\n\"{}]+)?)",
                    re.IGNORECASE)
# The tag line and anything after it are not part of what the user reads.
_TAG_START = re.compile(r"\[\s*(?:feeling|emotion|mood)\b|\{\s*\"(?:arousal|valence|feeling)\""
                        r"|\b(?:feeling|emotion|mood)\s*:", re.IGNORECASE)


def split_reply(reply: str) -> tuple[str, Affect | ParseFailure]:
    """The reply without its feeling tag, and the feeling (or why it could not be read)."""
    match = _TAG_START.search(reply)
    tail_start = match.start() if match else _last_line_start(reply)
    tail = reply[tail_start:]
    parsed = parse_affect(tail)
    if isinstance(parsed, ParseFailure) and match is None:
        # No tag at all: the whole reply may still name its feeling in passing.
        return reply.strip(), parse_affect(reply)
    visible = reply[:tail_start].rstrip() if match or not isinstance(parsed, ParseFailure) \
        else reply.strip()
    return visible or reply.strip(), parsed


def parse_affect(text: str) -> Affect | ParseFailure:
    """A feeling from loosely formatted text; clamps values into [-1, 1]."""
    snippet = text.strip()[-300:]
    values: dict[str, float] = {}
    label = ""
    parsed_json = _json_object(text)
    if parsed_json is not None:
        for name in ("arousal", "valence"):
            value = parsed_json.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool) \
                    and math.isfinite(value):
                values[name] = float(value)
        for key in ("feeling", "emotion", "label", "mood"):
            if isinstance(parsed_json.get(key), str):
                label = str(parsed_json[key]).strip()
                break
    for name in ("arousal", "valence"):
        if name in values:
            continue
        number = _FIELD[name].search(text)
        if number:
            values[name] = _number(number.group(1))
            continue
        word = _WORD_FIELD[name].search(text)
        if word:
            values[name] = _WORD_VALUES[(word.group(1) or word.group(2)).lower()]
    if not label:
        found = _LABEL.search(text)
        if found:
            label = " ".join(found.group(1).split())[:40].strip(" ,.;")
    if not values and label.split(",")[0].strip().lower() in NAMED:
        named = NAMED[label.split(",")[0].strip().lower()]
        return Affect(named.arousal, named.valence, label)
    if "arousal" not in values or "valence" not in values:
        missing = " and ".join(n for n in ("arousal", "valence") if n not in values)
        return ParseFailure(f"no {missing} in the reply's feeling tag", snippet)
    return Affect(_clamp(values["arousal"]), _clamp(values["valence"]), label)


def parse_pin(text: str) -> Affect:
    """A feeling the user pins: a name (``bored``), ``AROUSAL VALENCE`` numbers, or a tag;
    InputError with the accepted forms otherwise."""
    words = text.strip()
    if not words:
        raise InputError("name a feeling to pin: one of " + ", ".join(NAMED)
                         + ", or two numbers AROUSAL VALENCE in [-1, 1]")
    if words.lower() in NAMED:
        return NAMED[words.lower()]
    parts = words.replace(",", " ").split()
    if len(parts) >= 2:
        try:
            arousal, valence = float(parts[0]), float(parts[1])
        except ValueError:
            pass
        else:
            return Affect(arousal, valence, " ".join(parts[2:]))  # checks the range
    parsed = parse_affect(words)
    if isinstance(parsed, Affect):
        return parsed
    raise InputError(f"cannot read the feeling {words!r}: give one of " + ", ".join(NAMED)
                     + ", or two numbers AROUSAL VALENCE in [-1, 1]")


def quadrant_word(arousal: float, valence: float) -> str:
    """A word for a point of the arousal/valence plane (Russell's circumplex, coarsely)."""
    if abs(arousal) < 0.2 and abs(valence) < 0.2:
        return "neutral"
    if valence >= 0:
        return "excited" if arousal >= 0.2 else "content" if arousal <= -0.2 else "pleased"
    return "distressed" if arousal >= 0.2 else "bored" if arousal <= -0.2 else "displeased"


def _json_object(text: str) -> dict[str, object] | None:
    start = text.find("{")
    end = text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        value = json.loads(text[start:end + 1])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _number(text: str) -> float:
    if "/" in text:  # "7/10": a score out of a scale, mapped onto [-1, 1]
        top, bottom = (float(part) for part in text.split("/"))
        return 2 * top / bottom - 1 if bottom else 0.0
    value = float(text)
    return value / 10 if abs(value) > 1 and abs(value) <= 10 else value


def _clamp(value: float) -> float:
    return max(-1.0, min(1.0, value))


def _last_line_start(text: str) -> int:
    stripped = text.rstrip()
    return stripped.rfind("\n") + 1


# Poles of the two axes, for estimating a feeling from a reply's text when the model gave
# no readable tag (small models rarely follow the format): the difference of the reply's
# cosine to each pole, scaled so that a clearly emotional sentence reaches about +-1.
AROUSAL_POLES = ("I am excited, thrilled, energetic and alarmed!",
                 "I am calm, relaxed, quiet and sleepy.")
VALENCE_POLES = ("I am happy, glad, delighted and grateful.",
                 "I am sad, upset, sorry and disappointed.")
POLE_SCALE = 0.25


def estimate_affect(text: str, embed: Callable[[Sequence[str]], Any]) -> Affect:
    """A feeling estimated from the text itself, with ``embed`` (L2-normalised rows)."""
    vectors = embed([text, *AROUSAL_POLES, *VALENCE_POLES])
    cosines = [float(vectors[0] @ vectors[i]) for i in range(1, 5)]
    arousal = _clamp((cosines[0] - cosines[1]) / POLE_SCALE)
    valence = _clamp((cosines[2] - cosines[3]) / POLE_SCALE)
    return Affect(round(arousal, 2), round(valence, 2), quadrant_word(arousal, valence))
