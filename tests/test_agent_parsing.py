"""What the agent reads out of model text: feelings, ratings, questions, citations, tool
calls, stated confidence, and the entropy estimate the cascade judges by."""

from __future__ import annotations

import math

import pytest

from engine.agent.affect import NAMED, Affect, ParseFailure, parse_pin, split_reply
from engine.agent.agent import HoldBack
from engine.agent.cascade import mean_entropy, stated_confidence
from engine.agent.prompts import cited_ids, find_tool_call, first_rating, questions
from engine.errors import InputError
from engine.llm.types import TokenLogprob


@pytest.mark.parametrize(("reply", "visible", "arousal", "valence"), [
    ("Hello!\n[feeling: calm, content | arousal -0.4 | valence 0.6]", "Hello!", -0.4, 0.6),
    ('Sure. {"arousal": 0.3, "valence": -0.2, "feeling": "uneasy"}', "Sure.", 0.3, -0.2),
    ("Fine. Feeling: curious | arousal: 5/10 | valence: high", "Fine.", 0.0, 0.6),
    ("Ok [emotion: tense, valence=-3, arousal=7]", "Ok", 0.7, -0.3),  # out of 10
    ("Hi [feeling: x | arousal 4 | valence -9]", "Hi", 0.4, -0.9),
])
def test_feeling_tags_are_read_leniently(reply: str, visible: str, arousal: float,
                                         valence: float) -> None:
    text, parsed = split_reply(reply)
    assert text == visible
    assert isinstance(parsed, Affect)
    assert (parsed.arousal, parsed.valence) == pytest.approx((arousal, valence))


def test_an_unreadable_tag_is_a_failure_with_its_reason() -> None:
    text, parsed = split_reply("Just an answer with no feeling in it.")
    assert text == "Just an answer with no feeling in it."
    assert isinstance(parsed, ParseFailure) and "arousal and valence" in parsed.reason
    assert isinstance(split_reply("Hm [feeling: odd | arousal 0.2]")[1], ParseFailure)


def test_pins_take_names_numbers_and_refuse_the_rest() -> None:
    assert parse_pin("bored") == NAMED["bored"]
    assert parse_pin("0.2 -0.4 tense") == Affect(0.2, -0.4, "tense")
    for bad in ("", "2 0", "nan 0", "whatever"):
        with pytest.raises(InputError):
            parse_pin(bad)


def test_ratings_questions_citations_and_tool_calls() -> None:
    assert first_rating("Rating: 7/10") == 7 and first_rating("10") == 10
    assert first_rating("none") is None and first_rating("0 or 11") is None
    assert questions("1. What does the user like?\n2) Who is Alice\n- ok\n", 3) == [
        "What does the user like?", "Who is Alice?"]
    assert cited_ids("Alice [#3], [#12] and #3") == [3, 12]
    assert find_tool_call('I will check. <tool name="python">2+2</tool>') == (
        "python", "2+2", 14)
    assert find_tool_call("<tool>sql: SELECT 1</tool>")[:2] == ("sql", "SELECT 1")  # type: ignore[index]
    assert find_tool_call("no call here") is None


def test_stated_confidence_reads_scales() -> None:
    assert stated_confidence("8") == 0.8
    assert stated_confidence("I'd say 0.35") == 0.35
    assert stated_confidence("90%") == 0.9
    assert stated_confidence("no idea") == 0.0  # an unreadable answer is an unsure one


def test_entropy_estimate_from_top_alternatives() -> None:
    sure = TokenLogprob("a", 0.0, (("a", 0.0),))
    assert mean_entropy([sure]) == 0.0
    # Uniform over 256 tokens, seen through its top 5: the unseen mass sits on tokens as
    # likely as the fifth, so the estimate is the true entropy, ln 256.
    p = math.log(1 / 256)
    flat = TokenLogprob("a", p, tuple((str(i), p) for i in range(5)))
    assert mean_entropy([flat]) == pytest.approx(math.log(256), rel=1e-6)
    assert mean_entropy([sure, flat]) == pytest.approx(math.log(256) / 2, rel=1e-6)


def test_streaming_holds_back_a_feeling_tag_and_a_tool_call() -> None:
    held = HoldBack()
    shown = "".join(piece for chunk in ["Hello the", "re! [feel", "ing: calm]"]
                    for piece in held.push(chunk))
    assert shown == "Hello there! "
    held = HoldBack()
    shown = "".join(piece for chunk in ["Let me look", " <tool name=", '"sql">x</tool>']
                    for piece in held.push(chunk))
    assert shown == "Let me look "
