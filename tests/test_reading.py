"""Learning by reading: the associative recipe's read entries, on a tiny Llama."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import InputError
from engine.evaluation import perplexity
from engine.model.loading import load_model, load_student
from engine.model.reading import read_chunk, read_text, reading_layers
from engine.model.student import save_student
from engine.model.surgery import convert

LAYER = 1


def text_ids(seed: int, count: int = 96) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (count,), generator=generator).tolist()


@pytest.fixture(scope="module")
def teacher() -> Any:
    return load_model("tiny-llama")


def student(teacher: Any, **hparams: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return convert(teacher, [LAYER], "associative", **hparams)


def loss(model: Any, ids: list[int]) -> float:
    with torch.inference_mode():
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0, :-1].float()
        return float(torch.nn.functional.cross_entropy(logits, x[0, 1:]))


def test_the_recipe_starts_as_the_teacher_and_an_empty_memory_reads_nothing(teacher: Any
                                                                            ) -> None:
    model = student(teacher)
    module = reading_layers(model)[LAYER]
    assert len(module.cache) == 0 and module.base is not None
    ids = torch.tensor([text_ids(1)])
    with torch.inference_mode():
        want = teacher.model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_an_inserted_entry_is_returned_by_its_own_query(teacher: Any) -> None:
    model = student(teacher)
    module = reading_layers(model)[LAYER]
    ids = text_ids(2)
    report = read_chunk(model, teacher.tokenizer, ids, document="planted")
    assert report.added[LAYER] == len(module.cache) > 0
    with torch.no_grad():
        keys = module.cache.keys
        distances, positions = module.cache.search(keys, 1)
    assert torch.equal(positions[:, 0], torch.arange(len(keys)))
    assert float(distances.max()) < 1e-3
    note = module.cache.notes[0]
    assert note is not None and note["document"] == "planted" and note["source"] == "read"
    assert note["position"] >= 3  # the first contexts are too short to write an entry


def test_inserts_happen_only_above_the_novelty_threshold(teacher: Any) -> None:
    model = student(teacher)
    module = reading_layers(model)[LAYER]
    ids = text_ids(3)
    first = read_chunk(model, teacher.tokenizer, ids)
    assert first.entries_added == len(ids) - 1 - 3  # every context but the first three
    again = read_chunk(model, teacher.tokenizer, ids)  # every query at distance 0
    assert again.entries_added == 0
    # A threshold above every distance to the stored keys: nothing new is novel.
    strict = student(teacher, novelty_threshold=1e9)
    read_chunk(strict, teacher.tokenizer, ids)
    assert read_chunk(strict, teacher.tokenizer, text_ids(4)).entries_added == 0
    assert len(reading_layers(strict)[LAYER].cache) == first.entries_added
    assert len(module.cache) == first.entries_added


def test_a_second_read_of_a_planted_sequence_has_lower_loss(teacher: Any) -> None:
    model = student(teacher)
    ids = text_ids(5)
    unrelated = text_ids(6)
    before, unrelated_before = loss(model, ids), loss(model, unrelated)
    read_chunk(model, teacher.tokenizer, ids)
    after = loss(model, ids)
    assert after < before - 0.5, (before, after)  # perplexity down by 40% or more
    assert math.isclose(loss(model, unrelated), unrelated_before, rel_tol=0.02)


def test_eviction_keeps_the_capacity_and_drops_the_least_used_first(teacher: Any) -> None:
    model = student(teacher, capacity=200, topk=4)
    module = reading_layers(model)[LAYER]
    read_text(model, teacher.tokenizer, "", document="empty")  # nothing to read: nothing added
    assert len(module.cache) == 0
    a, b, c = text_ids(7, 80), text_ids(8, 80), text_ids(9, 80)
    read_chunk(model, teacher.tokenizer, a, document="a")
    read_chunk(model, teacher.tokenizer, b, document="b")
    for _ in range(3):  # a is read again and again, b never
        loss(model, a)
    read_chunk(model, teacher.tokenizer, c, document="c")
    assert len(module.cache) <= 200
    documents = [note["document"] for note in module.cache.notes if note]
    assert documents.count("c") == 76 and documents.count("a") == 76  # c is new, a is used
    assert documents.count("b") == 200 - 152  # the unused document made room


def test_reading_mode_off_leaves_outputs_bit_identical(teacher: Any) -> None:
    model = student(teacher)
    read_chunk(model, teacher.tokenizer, text_ids(10))
    module = reading_layers(model)[LAYER]
    size = len(module.cache)
    probe = torch.tensor([text_ids(11)])
    with torch.inference_mode():
        before = model(input_ids=probe).logits.clone()
    text = teacher.tokenizer.decode(text_ids(12, 300))
    result = perplexity(model, teacher.tokenizer, text, window=64)  # learn=False
    assert result.entries_added is None and len(module.cache) == size
    with torch.inference_mode():
        assert torch.equal(model(input_ids=probe).logits, before)
    learned = perplexity(model, teacher.tokenizer, text, window=64, learn=True)
    assert learned.entries_added and len(module.cache) == size + learned.entries_added


def test_read_entries_and_their_sources_survive_save_and_load(teacher: Any, tmp_path: Path
                                                             ) -> None:
    model = student(teacher)
    read_chunk(model, teacher.tokenizer, text_ids(13), document="notes/a.md")
    module = reading_layers(model)[LAYER]
    directory = save_student(model, tmp_path / "student", teacher.tokenizer)
    loaded = load_student(directory)
    again = reading_layers(loaded.model)[LAYER]
    assert torch.equal(again.cache.keys, module.cache.keys)
    assert torch.equal(again.cache.values, module.cache.values)
    assert again.cache.notes == module.cache.notes
    ids = torch.tensor([text_ids(13)])
    with torch.inference_mode():
        assert torch.allclose(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("hparams, message", [
    ({"novelty_threshold": float("nan")}, "novelty_threshold=nan must be a finite number"),
    ({"novelty_threshold": -1.0}, "novelty_threshold=-1.0 must be a number >= 0"),
    ({"capacity": 4, "topk": 8}, "topk=8 exceeds capacity=4"),
    ({"heads": 2}, "read entries use one head"),
    ({"insert": "always"}, "entries are written by reading"),
    ({"base": "routed"}, "base='routed' must be one of none, flat"),
    ({"read_sharpness": 0.0}, "must be >= 0 and > 0"),
])
def test_bad_reading_settings_are_refused_before_any_work(teacher: Any, hparams: dict[str, Any],
                                                          message: str) -> None:
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        convert(teacher, [LAYER], "associative", **hparams)


def test_reading_needs_a_reading_memory(teacher: Any) -> None:
    with pytest.raises(InputError, match="no associative memory that learns by reading"):
        read_chunk(teacher.model, teacher.tokenizer, text_ids(14))
    legacy = convert(teacher, [LAYER], "associative", base="none", key_dim=8, value_dim=8,
                     topk=4, capacity=64)
    with pytest.raises(InputError, match="distill one with"):
        perplexity(legacy, teacher.tokenizer, "some text to read " * 10, window=32, learn=True)
