"""Corpus transforms: rates, determinism, valid output, composition, the tables they draw
from, spec errors, and the ``mindset augment`` command."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import unicodedata
from importlib import resources
from pathlib import Path

import pytest

from engine.distill.augment import TRANSFORMS, Augmented, Augmenter, Edit, parse_spec
from engine.distill.augment.base import bernoulli
from engine.distill.augment.keyboard import neighbours
from engine.distill.augment.pipeline import carry
from engine.distill.augment.unicode_forms import confusables
from engine.distill.augment.words import swap_table
from engine.errors import InputError

MIXED = ("Their café is definitely better than yours — it's naïve to think 東京 is far. "
         "Hello  world!\nCoffee 🎉👍🏽 e\u0301te\u0301 ﬁne Ｔ² résumé, naïve.\n")
PROSE = ("The quick brown fox jumps over the lazy dog while their friend waits by the old "
         "mill; it's there, then gone. Coffee, balloons and letters keep accumulating. ")

# A text with a few thousand eligible units for each transform.
RATE_TEXTS = {
    "run": "coffee balloon letter bookkeeper " * 200,
    "word-swap": "Their dog and your cat said its then we're there, definitely. " * 160,
    "nfc": unicodedata.normalize("NFD", "café naïve résumé élève " * 200),
    "nfd": "café naïve résumé élève " * 200,
    "nfkd": "café naïve résumé élève " * 200,
    "nfkc": "ﬁne Ｔ² ﬂat ㎏ Ａｂｃ " * 300,
}


def strip_brackets(shown: str) -> str:
    return shown.replace("[[", "").replace("]]", "")


def undo(result: Augmented) -> str:
    """The input, rebuilt from the output and its changes."""
    pieces, position = [], 0
    for change in result.changes:
        pieces += [result.text[position:change.start], change.original]
        position = change.end
    return "".join([*pieces, result.text[position:]])


def within_four_sigma(events: int, units: int, rate: float) -> bool:
    return abs(events - rate * units) <= 4 * math.sqrt(units * rate * (1 - rate))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_rate_zero_is_the_identity(name: str) -> None:
    result = Augmenter(f"{name}=0", seed=3).augment_with_changes(MIXED)
    assert result.text == MIXED
    assert result.changes == ()
    assert result.counts[0].events == 0
    assert Augmenter(f"{name}=0.0").augment(MIXED) == MIXED


def test_every_transform_at_rate_zero_together_is_the_identity() -> None:
    spec = ",".join(f"{name}=0" for name in TRANSFORMS)
    assert Augmenter(spec, seed=5).augment(MIXED) == MIXED


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_observed_rate_matches_the_requested_rate(name: str) -> None:
    rate = 0.1
    text = RATE_TEXTS.get(name, PROSE * 50)
    tally = Augmenter(f"{name}={rate}", seed=11).augment_with_changes(text).counts[0]
    assert tally.units >= 1000, tally
    assert within_four_sigma(tally.events, tally.units, rate), tally


def test_bernoulli_hits_are_independent_coins() -> None:
    rng = random.Random(0)
    hits = bernoulli(100_000, 0.03, rng)
    assert hits == sorted(set(hits)) and hits[-1] < 100_000
    assert within_four_sigma(len(hits), 100_000, 0.03)
    # The gaps are geometric: P(gap = 0) = p, P(gap = 1) = p(1 - p).
    gaps = [b - a - 1 for a, b in itertools.pairwise(hits)]
    assert within_four_sigma(sum(gap == 0 for gap in gaps), len(gaps), 0.03)
    assert within_four_sigma(sum(gap == 1 for gap in gaps), len(gaps), 0.03 * 0.97)
    assert bernoulli(5, 1.0, rng) == [0, 1, 2, 3, 4]
    assert bernoulli(5, 0.0, rng) == []


def test_the_same_seed_gives_the_same_output_and_another_seed_another() -> None:
    spec = "typo=0.05,homoglyph=0.02,word-swap=0.3,whitespace=0.05"
    first = Augmenter(spec, seed=7)
    again = Augmenter(spec, seed=7)
    other_text = PROSE.upper()
    outputs = [first.augment(PROSE), first.augment(other_text)]
    # In any order of calls, in a fresh augmenter.
    assert [again.augment(other_text), again.augment(PROSE)] == outputs[::-1]
    assert first.augment_with_changes(PROSE).text == outputs[0]
    assert Augmenter(spec, seed=8).augment(PROSE) != outputs[0]
    assert first.augment(PROSE, key=1) != outputs[0]  # a new key draws new noise
    assert first.augment(PROSE, key=1) == again.augment(PROSE, key=1)


def test_the_output_does_not_depend_on_hash_randomisation() -> None:
    spec, seed = "typo=0.1,homoglyph=0.05,compat=0.05", 4
    script = ("import sys; from engine.distill.augment import Augmenter; "
              f"sys.stdout.write(ascii(Augmenter({spec!r}, seed={seed}).augment({MIXED!r})))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, check=True, cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout == ascii(Augmenter(spec, seed=seed).augment(MIXED))


def test_the_output_is_valid_utf8_and_the_changes_undo_to_the_input() -> None:
    spec = ",".join(f"{name}=0.3" for name in TRANSFORMS)
    texts = [MIXED, "🎉" * 5 + "e\u0301" * 5 + "👍🏽ab", "a\u0301\u0302b\u0303 x", "\n \n", ""]
    for seed in range(8):
        augmenter = Augmenter(spec, seed=seed)
        for text in texts:
            result = augmenter.augment_with_changes(text)
            result.text.encode("utf-8")  # no lone surrogates
            assert result.text == augmenter.augment(text)
            assert undo(result) == text
            for change in result.changes:
                assert result.text[change.start:change.end] != change.original
            starts = [change.start for change in result.changes]
            assert starts == sorted(starts)


def test_non_utf8_input_is_refused() -> None:
    with pytest.raises(InputError, match="not valid UTF-8"):
        Augmenter("typo=0.1").augment("ab\ud800c")


def test_transforms_compose_and_keep_their_order() -> None:
    result = Augmenter("typo=0.05,homoglyph=0.05", seed=2).augment_with_changes(PROSE * 10)
    kinds = {kind for change in result.changes for kind in change.transform.split("+")}
    assert kinds == {"typo", "homoglyph"}
    assert [tally.name for tally in result.counts] == ["typo", "homoglyph"]
    # Decomposing then composing gives the input back (and no changes); the other way round
    # leaves the text decomposed.
    round_trip = Augmenter("nfd=1,nfc=1").augment_with_changes("café")
    assert round_trip.text == "café" and round_trip.changes == ()
    decomposed = Augmenter("nfc=1,nfd=1").augment_with_changes("café")
    assert decomposed.text == "cafe\u0301"
    assert [(c.start, c.end, c.transform, c.original) for c in decomposed.changes] == [
        (3, 5, "nfd", "é")]


def test_overlapping_edits_merge_into_one_change() -> None:
    original = "abcdef"
    first = "aXXcdef"  # b -> XX
    spans = carry([], [Edit(1, 2, "XX")], 0, first, original)
    second = "aXYdef"  # "Xc" -> "Y" overlaps the first change
    spans = carry(spans, [Edit(2, 4, "Y"), Edit(5, 6, "")], 1, second, original)
    assert [(s.start, s.end, s.origin_start, s.origin_end, sorted(s.steps)) for s in spans] == [
        (1, 3, 1, 3, [0, 1]), (4, 4, 4, 5, [1])]


def test_homoglyphs_come_from_the_confusables_data() -> None:
    source = resources.files("confusable_homoglyphs").joinpath("confusables.json")
    data = json.loads(source.read_text(encoding="utf-8"))
    text = PROSE * 4
    result = Augmenter("homoglyph=0.3", seed=1).augment_with_changes(text)
    assert len(result.text) == len(text)  # one character for one
    replaced = [(old, new) for old, new in zip(text, result.text, strict=True) if old != new]
    assert len(replaced) == result.counts[0].events > 50
    for old, new in replaced:
        assert new in {entry["c"] for entry in data[old]}, (old, new)
        assert new in confusables()[old]
    assert all(char not in other for char, other in confusables().items())
    assert "а" in confusables()["a"]  # Cyrillic a


def test_word_swaps_keep_capitalisation_and_touch_only_listed_words() -> None:
    table = swap_table("en")
    text = "Their THEIR their tHeir cat. Definitely your IT'S there and others then."
    result = Augmenter("word-swap=1", seed=0).augment_with_changes(text)
    old_words, new_words = text.split(), result.text.split()
    assert len(old_words) == len(new_words)
    for old, new in zip(old_words, new_words, strict=True):
        old_word, new_word = old.strip(".,"), new.strip(".,")
        if old_word.lower() in table and old_word != "tHeir":
            assert new_word.lower() in table[old_word.lower()], (old, new)
            if old_word.isupper():
                assert new_word == new_word.upper()
            elif old_word[0].isupper():
                assert new_word[0].isupper() and new_word[1:] == new_word[1:].lower()
            else:
                assert new_word == new_word.lower()
        else:
            assert new == old  # not a listed word, or in mixed case
    assert result.counts[0].units == 8
    # Typographic apostrophes are matched and kept.
    curly = Augmenter("word-swap=1").augment("it’s your dog’s")
    assert curly.startswith("its ") and "you’re" in curly


def test_word_swap_lists_are_per_language_data() -> None:
    table = swap_table("en")
    assert len(table) >= 60
    assert "definately" in table["definitely"] and "seperate" in table["separate"]
    assert set(table["their"]) == {"there", "they're"}
    assert "definitely" not in table.get("definately", ())  # misspellings go one way
    with pytest.raises(InputError, match="available: en"):
        Augmenter("word-swap=0.1", language="xx")
    with pytest.raises(InputError, match="no word-swap list"):
        Augmenter("typo=0.1", language="../en")


def test_typo_parts_do_what_they_say() -> None:
    assert set(neighbours("s")) == set("adwezx")
    assert set(neighbours("S")) == set("ADWEZX")
    text = "keyboard typing test "
    replaced = Augmenter("replace=1", seed=1).augment(text)
    for old, new in zip(text, replaced, strict=True):
        assert old == new == " " or new in neighbours(old)
    uniform = Augmenter("replace-uniform=1", seed=1).augment("abcXYZ123")
    for old, new in zip("abcXYZ123", uniform, strict=True):
        assert new != old and (new.islower(), new.isupper(), new.isdigit()) == (
            old.islower(), old.isupper(), old.isdigit())
    # A letter and its combining mark go together.
    assert Augmenter("delete=1").augment("e\u0301x, 東!") == ", !"
    assert Augmenter("transpose=1").augment("ae\u0301") == "e\u0301a"
    inserted = Augmenter("insert=1", seed=3).augment_with_changes("gh")
    assert len(inserted.text) == 4 and inserted.counts[0].events == 2
    assert Augmenter("insert=1").augment("東") == "東東"  # not on the layout: pressed twice
    transposed = Augmenter("transpose=1").augment_with_changes("abcd")
    assert transposed.text == "badc" and transposed.counts[0].units == 2  # "bc" was used up
    typo = Augmenter("typo=0.2", seed=4).augment_with_changes(PROSE * 5)
    assert undo(typo) == PROSE * 5 and typo.counts[0].events > 20


def test_whitespace_mostly_doubles_existing_whitespace() -> None:
    text = "word " * 2000 + "end"
    result = Augmenter("whitespace=1", seed=5).augment_with_changes(text)
    assert re.sub(r"\s", "", result.text) == re.sub(r"\s", "", text)  # only whitespace added
    assert len(result.text) - len(text) == result.counts[0].events == result.counts[0].units
    doubled = result.text.count("  ")
    assert within_four_sigma(doubled, 2000, 0.8)  # "end" can only be split
    crlf = Augmenter("whitespace=1", seed=1).augment("one\r\ntwo\r\nthree\r\nfour")
    assert "\r\r" not in crlf and crlf.count("\r\n") == crlf.count("\r") >= 3


def test_run_adds_or_drops_one_repeated_letter() -> None:
    result = Augmenter("run=1", seed=2).augment_with_changes("apple letter doll sheep ab")
    assert result.counts[0].units == result.counts[0].events == len(result.changes) == 4
    for change in result.changes:
        new = result.text[change.start:change.end]
        assert set(new) == set(change.original) and abs(len(new) - len(change.original)) == 1
    assert result.text.endswith(" ab")


def test_unicode_forms() -> None:
    assert Augmenter("nfkc=1").augment("ﬁne Ｔ²") == "fine T2"
    assert Augmenter("nfkd=1").augment("ﬁné") == "fine\u0301"
    assert Augmenter("nfd=1").augment("plain ascii") == "plain ascii"
    compat = Augmenter("compat=1", seed=2).augment("fine A2 'x'")
    assert compat.startswith("ﬁ") and compat != "fine A2 'x'"
    assert unicodedata.normalize("NFKC", compat) == "fine A2 'x'"
    marked = Augmenter("combining=1", seed=1).augment("ab")
    assert marked[0] == "a" and marked[2] == "b" and len(marked) == 4
    assert all(0x300 <= ord(char) <= 0x36F for char in marked[1::2])


def test_specs_parse_in_order() -> None:
    assert parse_spec(" typo=0.02, homoglyph = 0.01,word-swap=5e-2 ") == [
        ("typo", 0.02), ("homoglyph", 0.01), ("word-swap", 0.05)]
    assert Augmenter([("run", 1), ("nfd", 0.5)]).spec == "run=1.0,nfd=0.5"


@pytest.mark.parametrize(("spec", "problem"), [
    ("", "empty transform spec"),
    ("typo", "'typo' has no rate"),
    ("typo=", "has no rate"),
    ("=0.1", "names no transform"),
    ("typo=abc", "'abc' is not a number"),
    ("typo=0.1,typo=0.2", "typo appears twice"),
    ("typo=1.5", "between 0 and 1"),
    ("typo=-0.1", "between 0 and 1"),
    ("typo=nan", "between 0 and 1"),
    ("typo=inf", "between 0 and 1"),
    ("tpyo=0.1", "unknown transform 'tpyo'"),
    ("typo=0.1,,run=0.1", "empty item"),
    ("typo=0.1=0.2", "is not NAME=RATE"),
])
def test_bad_specs_say_what_is_wrong(spec: str, problem: str) -> None:
    with pytest.raises(InputError) as caught:
        Augmenter(spec)
    message = str(caught.value)
    assert problem in message and "\n" not in message
    assert "transforms: typo, delete, insert" in message and "homoglyph" in message


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(InputError, match="seed must be a whole number"):
        Augmenter("typo=0.1", seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown transform"):
        Augmenter([("nope", 0.1)])
    with pytest.raises(InputError, match="appears twice"):
        Augmenter([("run", 0.1), ("run", 0.2)])


# The command.

def test_augment_command_is_registered() -> None:
    from mindset.commands import COMMAND_MODULES

    assert "mindset.commands.augment_cmd" in COMMAND_MODULES


def test_cli_prints_the_highlighted_text(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from mindset.cli import run

    path = tmp_path / "in.txt"
    path.write_text(PROSE, encoding="utf-8")
    spec = "word-swap=0.5,typo=0.05"
    assert run(["augment", str(path), "--transforms", spec, "--seed", "3"]) == 0
    shown = capsys.readouterr().out
    assert "[[" in shown and "]]" in shown  # captured output is not a terminal
    assert strip_brackets(shown) == Augmenter(spec, seed=3).augment(PROSE) + "\n"

    assert run(["augment", str(path), "--transforms", spec, "--stats", "--seed", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("word-swap") and "observed rate" in lines[-2]
    assert lines[-1].startswith("typo") and "letters and digits" in lines[-1]

    assert run(["augment", str(path), "--transforms", spec, "--json", "--seed", "3"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = Augmenter(spec, seed=3).augment_with_changes(PROSE)
    assert data["text"] == expected.text
    assert data["changes"] == [change.as_dict() for change in expected.changes]
    assert set(data["counts"]) == {"word-swap", "typo"}


def test_cli_highlights_with_ansi_on_a_terminal() -> None:
    from mindset.commands.augment_cmd import highlight

    result = Augmenter("run=1,delete=1").augment_with_changes("ll x")
    assert result.text == " " and len(result.changes) == 2
    shown = highlight(result, ["run", "delete"], ansi=True)
    # The deletions show the deleted text struck through, in the colour of the first
    # transform that touched it.
    assert shown == "\x1b[9;31mll\x1b[0m \x1b[9;32mx\x1b[0m"
    result = Augmenter("replace=1").augment_with_changes("ab")
    shown = highlight(result, ["replace"], ansi=True)
    assert shown == f"\x1b[7;31m{result.text}\x1b[0m"
    assert highlight(result, ["replace"], ansi=False) == f"[[{result.text}]]"


@pytest.mark.parametrize(("argv", "problem"), [
    (["--transforms", "typo=2"], "between 0 and 1"),
    (["--transforms", "bogus=0.1"], "unknown transform"),
    (["--transforms", "word-swap=0.1", "--language", "zz"], "no word-swap list"),
])
def test_cli_bad_specs_exit_2_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          argv: list[str], problem: str) -> None:
    from mindset.cli import run

    path = tmp_path / "in.txt"
    path.write_text(PROSE, encoding="utf-8")
    assert run(["augment", str(path), *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("mindset: error:") and problem in error
    assert error.count("\n") == 1


def test_cli_unreadable_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mindset.cli import run

    assert run(["augment", str(tmp_path / "missing.txt"), "--transforms", "typo=0.1"]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00abc")
    assert run(["augment", str(tmp_path / "binary.txt"), "--transforms", "typo=0.1"]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_cli_lists_the_transforms(capsys: pytest.CaptureFixture[str]) -> None:
    from mindset.cli import run

    with pytest.raises(SystemExit) as caught:
        run(["augment", "--list"])
    assert caught.value.code == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in TRANSFORMS) and "languages: en" in listing
