"""``mindset augment``: noise a text file with corpus transforms and show what changed.

The output is the noised text with the changed spans marked: in reverse video, one colour per
transform, on a terminal (a deletion shows the deleted text struck through); between ``[[``
and ``]]`` with ``--plain``, when the output is not a terminal, or when ``NO_COLOR`` is set
(removing the brackets gives the noised text exactly; a deletion is an empty ``[[]]``).
``--stats`` adds per-transform counts and the observed rate; ``--json`` prints one object
with the text, the changes and the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mindset.commands.common import whole_number

if TYPE_CHECKING:
    from engine.distill.augment import Augmented, Tally

# ANSI foreground colours for the transforms of a pipeline, in order.
COLOURS = (31, 32, 33, 34, 35, 36)
RESET = "\x1b[0m"


class ListTransforms(argparse.Action):
    """``--list``: print the transforms and exit, like ``--version`` (before the required
    arguments are checked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from engine.distill.augment import TRANSFORMS, available_languages

        width = max(map(len, TRANSFORMS))
        lines = [f"{name:<{width}}  {kind.summary} (rate per: {kind.unit})"
                 for name, kind in TRANSFORMS.items()]
        lines.append(f"word-swap languages: {', '.join(available_languages())}")
        print("\n".join(lines))
        parser.exit(0)


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "augment",
        help="add seeded noise (typos, homoglyphs, word swaps...) to a text file",
        description="Apply corpus transforms to a text file, left to right, each at its rate "
        "per eligible unit, and print the result with the changes marked. The same seed "
        "gives the same output.",
    )
    parser.add_argument("data", metavar="FILE", help="a UTF-8 text file")
    parser.add_argument("--transforms", required=True, metavar="SPEC",
                        help="NAME=RATE,... e.g. typo=0.02,homoglyph=0.01,word-swap=0.05 "
                        "(see --list)")
    parser.add_argument("--seed", type=whole_number, default=0,
                        help="random seed (default 0)")
    parser.add_argument("--language", default="en",
                        help="language of the word-swap lists (default en)")
    parser.add_argument("--plain", action="store_true",
                        help="mark changes with [[...]] even on a terminal")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object: text, changes, counts")
    parser.add_argument("--stats", action="store_true",
                        help="also print per-transform counts and observed rates")
    parser.add_argument("--list", action=ListTransforms,
                        help="list the transforms and what their rates are per, and exit")
    parser.set_defaults(handler=run)


def highlight(result: Augmented, names: Sequence[str], ansi: bool) -> str:
    """The noised text with its changed spans marked (ANSI or ``[[...]]``)."""
    text = result.text
    pieces: list[str] = []
    position = 0
    for change in result.changes:
        pieces.append(text[position:change.start])
        span = text[change.start:change.end]
        if not ansi:
            pieces.append(f"[[{span}]]")
        else:
            first = change.transform.split("+")[0]
            colour = COLOURS[names.index(first) % len(COLOURS)] if first in names else 37
            # A deletion has nothing left to reverse: strike the deleted text through.
            pieces.append(f"\x1b[7;{colour}m{span}{RESET}" if span
                          else f"\x1b[9;{colour}m{change.original}{RESET}")
        position = change.end
    pieces.append(text[position:])
    return "".join(pieces)


def stats_lines(counts: Sequence[Tally]) -> list[str]:
    width = max((len(tally.name) for tally in counts), default=0)
    lines = []
    for tally in counts:
        observed = "-" if tally.observed is None else f"{tally.observed:.4f}"
        lines.append(f"{tally.name:<{width}}  {tally.events} of {tally.units} {tally.unit}, "
                     f"observed rate {observed} (asked {tally.rate:g})")
    return lines


def _use_ansi(args: argparse.Namespace) -> bool:
    return not args.plain and "NO_COLOR" not in os.environ and sys.stdout.isatty()


def run(args: argparse.Namespace) -> int:
    from engine.distill.augment import Augmenter
    from engine.textdata import read_text_file

    augmenter = Augmenter(args.transforms, seed=args.seed, language=args.language)
    text = read_text_file(args.data)
    result = augmenter.augment_with_changes(text)
    if args.json:
        print(json.dumps({"transforms": augmenter.spec, "seed": augmenter.seed,
                          "language": augmenter.language, **result.as_dict()}))
        return 0
    names = [transform.name for transform in augmenter.transforms]
    shown = highlight(result, names, _use_ansi(args))
    print(shown, end="" if shown.endswith("\n") else "\n")
    if args.stats:
        print()
        print("\n".join(stats_lines(result.counts)))
    return 0
