"""Transform specs: ``typo=0.02,homoglyph=0.01,word-swap=0.05`` -> an ordered pipeline.

A spec is a comma-separated list of ``NAME=RATE`` items, applied left to right. Each RATE is a
probability in [0, 1] per eligible unit of that transform (see :data:`TRANSFORMS` and each
transform's ``unit``). Spaces around items, names and rates are ignored. Each name may appear
once. Every problem is an :class:`~engine.errors.InputError` of one line that names it and
lists the valid names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from engine.distill.augment.base import Transform
from engine.distill.augment.transforms import CHARACTER_TRANSFORMS
from engine.distill.augment.unicode_forms import UNICODE_TRANSFORMS
from engine.distill.augment.words import WordSwap
from engine.errors import InputError

_ALL: tuple[type[Transform], ...] = (*CHARACTER_TRANSFORMS, WordSwap, *UNICODE_TRANSFORMS)
TRANSFORMS: dict[str, type[Transform]] = {transform.name: transform for transform in _ALL}


def valid_names() -> str:
    return ", ".join(TRANSFORMS)


def _problem(message: str) -> InputError:
    return InputError(f"{message} (transforms: {valid_names()})")


def check_step(name: object, rate: object) -> tuple[str, float]:
    """One ``(name, rate)`` pair, checked: a known name and a finite rate in [0, 1]."""
    if not isinstance(name, str) or name not in TRANSFORMS:
        raise _problem(f"unknown transform {name!r}")
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise _problem(f"{name}: the rate must be a number in [0, 1], not {rate!r}")
    value = float(rate)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise _problem(f"{name}={rate}: the rate must be between 0 and 1")
    return name, value


def parse_spec(spec: str) -> list[tuple[str, float]]:
    """``"typo=0.02,homoglyph=0.01"`` -> ``[("typo", 0.02), ("homoglyph", 0.01)]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise _problem("empty transform spec; give NAME=RATE[,NAME=RATE...], e.g. typo=0.02")
    steps: list[tuple[str, float]] = []
    for item in spec.split(","):
        text = item.strip()
        if not text:
            raise _problem(f"empty item in {spec!r}; separate NAME=RATE items with one comma")
        if "=" not in text and text in TRANSFORMS:
            raise _problem(f"{text!r} has no rate; write {text}=RATE with RATE in [0, 1]")
        if text.count("=") != 1:
            raise _problem(f"{text!r} is not NAME=RATE (e.g. typo=0.02)")
        name, rate_text = (part.strip() for part in text.split("="))
        if not name:
            raise _problem(f"{text!r} names no transform; write NAME=RATE")
        if name not in TRANSFORMS:
            raise _problem(f"unknown transform {name!r} in {text!r}")
        if not rate_text:
            raise _problem(f"{text!r} has no rate; write {name}=RATE with RATE in [0, 1]")
        try:
            rate = float(rate_text)
        except ValueError:
            raise _problem(f"{text!r}: {rate_text!r} is not a number; give a rate in "
                           "[0, 1]") from None
        if any(existing == name for existing, _ in steps):
            raise _problem(f"{name} appears twice in {spec!r}; give each transform once")
        steps.append(check_step(name, rate))
    return steps


def check_steps(steps: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """Already-split ``(name, rate)`` pairs, checked like a spec's items."""
    if isinstance(steps, str) or not steps:
        raise _problem("no transforms; give (NAME, RATE) pairs or a NAME=RATE,... spec")
    checked: list[tuple[str, float]] = []
    for step in steps:
        if not isinstance(step, tuple | list) or len(step) != 2:
            raise _problem(f"{step!r} is not a (NAME, RATE) pair")
        name, rate = check_step(*step)
        if any(existing == name for existing, _ in checked):
            raise _problem(f"{name} appears twice; give each transform once")
        checked.append((name, rate))
    return checked


def build(steps: Sequence[tuple[str, float]], language: str) -> list[Transform]:
    """The transforms of checked steps, in order."""
    return [TRANSFORMS[name](rate, language) for name, rate in steps]


def format_spec(steps: Sequence[tuple[str, float]]) -> str:
    """The canonical spec text of ``steps`` (``typo=0.02,homoglyph=0.01``)."""
    return ",".join(f"{name}={rate}" for name, rate in steps)
