"""Corpus transforms: seeded, composable noise for training on robust (messy) text.

``Augmenter("typo=0.02,homoglyph=0.01,word-swap=0.05", seed=0).augment(text)`` applies the
transforms left to right, each at its rate per eligible unit; ``augment_with_changes`` also
returns the spans of the output that differ from the input, for highlighting, and per-transform
counts. The same seed, key and text give the same output (:mod:`.pipeline` says how).

* :mod:`.transforms`: ``typo`` and its parts ``delete``, ``insert``, ``transpose``, ``replace``
  (QWERTY neighbours, :mod:`.keyboard`), ``replace-uniform``; ``whitespace``; ``run``.
* :mod:`.unicode_forms`: ``nfc``, ``nfd``, ``nfkc``, ``nfkd``, ``compat`` (compatibility
  variants), ``combining`` (stray marks), ``homoglyph`` (Unicode confusables).
* :mod:`.words`: ``word-swap`` (homophones, confused words, misspellings; per language, from
  ``data/swaps-<language>.json``).
* :mod:`.spec`: parsing ``NAME=RATE,...``; :mod:`.base`: the interface every transform has.
"""

from __future__ import annotations

from engine.distill.augment.base import Edit, Proposal, Transform
from engine.distill.augment.pipeline import Augmented, Augmenter, Change, Tally
from engine.distill.augment.spec import TRANSFORMS, parse_spec
from engine.distill.augment.words import available_languages

__all__ = [
    "TRANSFORMS",
    "Augmented",
    "Augmenter",
    "Change",
    "Edit",
    "Proposal",
    "Tally",
    "Transform",
    "available_languages",
    "parse_spec",
]
