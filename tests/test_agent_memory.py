"""The agent's long-term memory on real memory-store files and the real MiniLM embedder."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.agent.embedding import HiddenStateEmbedder, MiniLMEmbedder
from engine.agent.long_term import (
    DEFAULT_TABLE,
    LABEL_CHARS,
    LongTermMemory,
    NewMemory,
    RetrievalWeights,
    ScoredMemory,
)
from engine.errors import InputError
from engine.memory.store import MemoryStore
from engine.model.tiny import byte_level_tokenizer, tiny_model

HOUR = 3600.0
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    model = MiniLMEmbedder()
    model.embed(["warm up"])  # loads the model once for the module
    return model


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "memory.db"


@pytest.fixture
def store(db: Path) -> Iterator[MemoryStore]:
    with MemoryStore.open(db) as opened:
        yield opened


def cosines(embedder: MiniLMEmbedder, query: str, texts: list[str]) -> np.ndarray:
    vectors = embedder.embed([query, *texts]).astype(np.float64)
    return vectors[1:] @ vectors[0]


def min_max(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    return [0.0 if high == low else (v - low) / (high - low) for v in values]


def by_id(results: list[ScoredMemory]) -> dict[int, ScoredMemory]:
    return {r.memory.id: r for r in results}


def test_minilm_ranks_paraphrases_above_unrelated_text(embedder: MiniLMEmbedder) -> None:
    texts = ["The cat sat on the mat", "A cat was sitting on a mat",
             "Stock markets fell sharply today"]
    vectors = embedder.embed(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similar, unrelated = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert similar > 0.8
    assert similar - unrelated > 0.5
    # Padding in a batch of mixed lengths does not change a text's vector.
    alone = embedder.embed([texts[1]])[0]
    assert np.allclose(alone, vectors[1], atol=1e-5)
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(InputError):
        embedder.embed("not a list")


def test_related_memory_ranks_first(store: MemoryStore, embedder: MiniLMEmbedder) -> None:
    memory = LongTermMemory(store, embedder, clock=Clock())
    unrelated = ["The train to Lyon leaves at nine.", "Quarterly revenue grew by four percent.",
                 "Tomatoes need plenty of sunlight.", "The violin was out of tune."]
    for text in unrelated[:2]:
        memory.add(text)
    wanted = memory.add("The user's dog is a golden retriever named Biscuit.")
    for text in unrelated[2:]:
        memory.add(text)
    results = memory.search("What breed is the user's dog?", k=3)
    assert results[0].memory.id == wanted.id
    assert results[0].memory.text == wanted.text
    assert results[0].relevance == 1.0
    assert len(results) == 3
    text = memory.format(results[:1])
    assert text == f"[#{wanted.id} turn, imp 5, score {results[0].score:.2f}] {wanted.text}"
    assert memory.format([]) == "(no memories found)"


def test_scores_are_the_documented_min_max_formula(
    store: MemoryStore, embedder: MiniLMEmbedder
) -> None:
    clock = Clock()
    memory = LongTermMemory(store, embedder, clock=clock)
    specs = [("I bought a red bicycle last spring.", 3, 0.0),
             ("My bicycle has a flat tyre.", 8, 5.0),
             ("The opera started late.", 6, 20.0),
             ("Cycling to work takes twenty minutes.", 1, 47.0)]
    added = [memory.add(text, importance=imp, created=T0 + hours * HOUR)
             for text, imp, hours in specs]
    now = T0 + 50 * HOUR
    query = "How do I repair my bike?"
    weights = RetrievalWeights(recency=0.5, importance=2.0, relevance=1.5, decay_per_hour=0.9)
    results = memory.search(query, k=4, weights=weights, now=now, touch=False)
    raw_cos = cosines(embedder, query, [text for text, _, _ in specs]).tolist()
    recency = min_max([0.9 ** ((now - (T0 + h * HOUR)) / HOUR) for _, _, h in specs])
    importance = min_max([float(imp) for _, imp, _ in specs])
    relevance = min_max(raw_cos)
    parts = zip(recency, importance, relevance, strict=True)
    expected = [0.5 * r + 2.0 * i + 1.5 * v for r, i, v in parts]
    got = by_id(results)
    for index, item in enumerate(added):
        scored = got[item.id]
        assert scored.cosine == pytest.approx(raw_cos[index], abs=1e-6)
        assert scored.recency == pytest.approx(recency[index], abs=1e-9)
        assert scored.importance == pytest.approx(importance[index], abs=1e-12)
        assert scored.relevance == pytest.approx(relevance[index], abs=1e-5)
        assert scored.score == pytest.approx(expected[index], abs=1e-5)
    order = sorted(range(4), key=lambda i: -expected[i])
    assert [r.memory.id for r in results] == [added[i].id for i in order]
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)


def test_weights_change_the_ranking(store: MemoryStore, embedder: MiniLMEmbedder) -> None:
    memory = LongTermMemory(store, embedder, clock=Clock())
    first = memory.add("We talked about the weather in Oslo.", importance=9, created=T0)
    second = memory.add("The user likes green tea.", importance=2, created=T0 + HOUR)
    third = memory.add("The meeting moved to Friday.", importance=5, created=T0 + 2 * HOUR)
    query = "What does the user like to drink?"
    by_importance = memory.search(query, k=3, weights=RetrievalWeights(0, 1, 0),
                                  now=T0 + 3 * HOUR, touch=False)
    assert [r.memory.id for r in by_importance] == [first.id, third.id, second.id]
    by_recency = memory.search(query, k=3, weights=RetrievalWeights(1, 0, 0),
                               now=T0 + 3 * HOUR, touch=False)
    assert [r.memory.id for r in by_recency] == [third.id, second.id, first.id]
    # Retrieving the oldest one (touch) makes it the most recently accessed.
    memory.search("weather in Oslo", k=1, weights=RetrievalWeights(0, 0, 1), now=T0 + 4 * HOUR)
    by_recency = memory.search(query, k=3, weights=RetrievalWeights(1, 0, 0),
                               now=T0 + 5 * HOUR, touch=False)
    assert [r.memory.id for r in by_recency] == [first.id, third.id, second.id]
    # Without decay every recency is 1, normalised to 0: all scores tie, newer first.
    tied = memory.search(query, k=3, weights=RetrievalWeights(1, 0, 0, decay_per_hour=1.0),
                         now=T0 + 5 * HOUR, touch=False)
    assert [r.memory.id for r in tied] == [third.id, second.id, first.id]
    assert {r.score for r in tied} == {0.0}


def test_touch_updates_last_access_persistently(db: Path, embedder: MiniLMEmbedder) -> None:
    with MemoryStore.open(db) as store:
        memory = LongTermMemory(store, embedder, clock=Clock())
        hit = memory.add("The spare key is under the blue flowerpot.", created=T0)
        other = memory.add("Basketball practice is on Tuesdays.", created=T0)
        results = memory.search("where is the spare key", k=1, now=T0 + 7 * HOUR)
        assert [r.memory.id for r in results] == [hit.id]
        assert results[0].memory.last_access == T0  # as it was scored
        assert memory.get([hit.id])[0].last_access == T0 + 7 * HOUR
        memory.search("where is the spare key", k=2, now=T0 + 9 * HOUR, touch=False)
        # A touch never moves an access back in time.
        memory.search("where is the spare key", k=1, now=T0 + HOUR)
    with MemoryStore.open(db) as store:
        reopened = LongTermMemory(store, embedder)
        again, untouched = reopened.get([hit.id, other.id])
        assert again.last_access == T0 + 7 * HOUR
        assert untouched.last_access == T0
        row = store.table(DEFAULT_TABLE).get([hit.id])[0]
        assert row.meta["last_access"] == T0 + 7 * HOUR


def test_memories_persist_and_are_an_ordinary_table(db: Path, embedder: MiniLMEmbedder) -> None:
    long_text = "The user keeps a diary. " + "Every evening they write a page about the day. " * 8
    with MemoryStore.open(db) as store:
        memory = LongTermMemory(store, embedder, clock=Clock())
        turn = memory.add("Hello, I moved to Porto last month.", conversation_id="c1",
                          node_id="n1", importance=4)
        note = memory.add(long_text, kind="note", importance=6)
        reflection = memory.add("The user is settling into a new city.", kind="reflection",
                                importance=7, evidence=[turn.id, note.id])
    with MemoryStore.open(db) as store:
        assert DEFAULT_TABLE in store.table_names()
        memory = LongTermMemory(store, embedder)
        assert len(memory) == 3
        assert memory.get([reflection.id, turn.id]) == [reflection, turn]
        assert memory.get([reflection.id])[0].evidence == (turn.id, note.id)
        rows = {row.id: row for row in store.table(DEFAULT_TABLE).page()}
        assert rows[turn.id].label == "Hello, I moved to Porto last month."
        assert rows[turn.id].provenance == "agent" and rows[turn.id].tags == ["turn"]
        assert rows[turn.id].meta["conversation_id"] == "c1"
        assert rows[turn.id].meta["embedder"] == embedder.name
        assert rows[turn.id].value.tolist() == [4.0]
        label = rows[note.id].label or ""
        assert len(label) == LABEL_CHARS and label.endswith("…")
        assert long_text.startswith(label[:-1])
        assert rows[note.id].meta["text"] == long_text
        top = memory.search("Which city does the user live in now?", k=1, kinds=["turn"])
        assert top[0].memory == turn


def test_filters_and_recent(store: MemoryStore, embedder: MiniLMEmbedder) -> None:
    memory = LongTermMemory(store, embedder, clock=Clock())
    a = memory.add("first turn", conversation_id="a", created=T0)
    b = memory.add("second turn", conversation_id="b", created=T0 + 1)
    s = memory.add("a summary of a", kind="summary", conversation_id="a", created=T0 + 2)
    c = memory.add("third turn", conversation_id="a", created=T0 + 3)
    assert [m.id for m in memory.recent(3)] == [b.id, s.id, c.id]
    assert [m.id for m in memory.recent(10, conversation_id="a")] == [a.id, s.id, c.id]
    assert [m.id for m in memory.recent(10, kinds="summary")] == [s.id]
    found = memory.search("turn", k=10, conversation_id="a", kinds=["turn"], touch=False)
    assert {r.memory.id for r in found} == {a.id, c.id}
    assert memory.search("turn", k=5, kinds=["fact"]) == []


def test_importance_since(store: MemoryStore, embedder: MiniLMEmbedder) -> None:
    memory = LongTermMemory(store, embedder, clock=Clock())
    assert memory.importance_since(0) == 0
    one = memory.add("The user asked about trains.", importance=3)
    memory.add("The user likes travelling.", kind="reflection", importance=8, evidence=[one.id])
    three = memory.add("The user lives near the station.", kind="fact", importance=4)
    memory.add("Planted note", kind="note", importance=2)
    assert memory.importance_since(0) == 3 + 4 + 2
    assert memory.importance_since(one.id) == 4 + 2
    assert memory.importance_since(three.id) == 2
    with pytest.raises(InputError):
        memory.importance_since(-1)


BAD_ADDS: list[dict[str, Any]] = [
    {"text": ""}, {"text": "   \n"}, {"text": "x", "kind": "dream"},
    {"text": "x", "importance": 0}, {"text": "x", "importance": 11},
    {"text": "x", "importance": 5.5}, {"text": "x", "importance": True},
    {"text": "x", "evidence": [999_999]}, {"text": "x", "evidence": "12"},
    {"text": "x", "created": math.nan}, {"text": "x", "conversation_id": 3},
]


@pytest.mark.parametrize("options", BAD_ADDS)
def test_bad_memories_raise_and_write_nothing(
    store: MemoryStore, embedder: MiniLMEmbedder, options: dict[str, Any]
) -> None:
    memory = LongTermMemory(store, embedder)
    options = dict(options)
    text = options.pop("text")
    with pytest.raises(InputError) as caught:
        memory.add(text, **options)
    assert "\n" not in str(caught.value)
    with pytest.raises(InputError):
        memory.add_many([NewMemory("a good one"), NewMemory(text, **options)])
    assert len(memory) == 0 and store.table(DEFAULT_TABLE).count() == 0


@pytest.mark.parametrize("options", [
    {"k": 0}, {"k": 101}, {"k": "3"}, {"k": True}, {"query": ""},
    {"weights": RetrievalWeights(-1, 1, 1)}, {"weights": RetrievalWeights(0, 0, 0)},
    {"weights": RetrievalWeights(1, 1, math.inf)},
    {"weights": RetrievalWeights(decay_per_hour=0.0)},
    {"weights": RetrievalWeights(decay_per_hour=1.5)},
    {"kinds": ["dream"]}, {"kinds": []}, {"now": math.nan},
])
def test_bad_searches_raise(
    store: MemoryStore, embedder: MiniLMEmbedder, options: dict[str, Any]
) -> None:
    memory = LongTermMemory(store, embedder, clock=Clock())
    made = memory.add("something to find", created=T0)
    options = dict(options)
    query = options.pop("query", "something")
    with pytest.raises(InputError):
        memory.search(query, **{"now": T0 + HOUR, **options})
    assert memory.get([made.id])[0].last_access == T0  # nothing was touched


def test_large_tables_score_the_index_shortlist_plus_recent(
    store: MemoryStore, embedder: MiniLMEmbedder
) -> None:
    memory = LongTermMemory(store, embedder, clock=Clock(), full_scan_limit=4,
                            ann_candidates=3, recent_candidates=2)
    texts = ["Paris is the capital of France.", "Berlin is in Germany.", "I like pancakes.",
             "Rome has many old churches.", "The bus was late again.", "Madrid is sunny.",
             "Chess openings are hard to learn.", "The printer ran out of ink."]
    added = memory.add_many([NewMemory(t, created=T0 + i * HOUR) for i, t in enumerate(texts)])
    assert [m.text for m in added] == texts
    query = "European capital cities"
    results = memory.search(query, k=10, now=T0 + 10 * HOUR, touch=False)
    raw = cosines(embedder, query, texts)
    best = {added[i].id for i in np.argsort(-raw)[:3].tolist()}
    newest = {added[-1].id, added[-2].id}
    assert {r.memory.id for r in results} == best | newest
    for name in ("recency", "importance", "relevance"):
        values = [getattr(r, name) for r in results]
        assert min(values) == 0.0 and (max(values) in (0.0, 1.0))


def test_other_writers_are_seen(db: Path, embedder: MiniLMEmbedder) -> None:
    with MemoryStore.open(db) as first_store, MemoryStore.open(db) as second_store:
        writer = LongTermMemory(first_store, embedder, clock=Clock())
        reader = LongTermMemory(second_store, embedder, clock=Clock())
        made = writer.add("The user's sister is called Ines.", created=T0)
        assert [m.id for m in reader.recent()] == [made.id]
        reader.search("sister's name", k=1, now=T0 + HOUR)
        assert writer.get([made.id])[0].last_access == T0 + HOUR
        second_store.table(DEFAULT_TABLE).delete([made.id])
        assert len(writer) == 0


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    return tiny_model("llama"), byte_level_tokenizer()


def test_hidden_state_embedder_on_a_tiny_model(tiny: tuple[Any, Any], tmp_path: Path) -> None:
    model, tokenizer = tiny
    hidden = HiddenStateEmbedder(model, tokenizer)
    assert hidden.dim == model.config.hidden_size == 64
    assert hidden.layer == model.config.num_hidden_layers // 2
    texts = ["hello there", "a rather longer sentence about boats", "x"]
    vectors = hidden.embed(texts)
    assert vectors.shape == (3, 64) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(hidden.embed([texts[1]])[0], vectors[1], atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])
    last = HiddenStateEmbedder(model, tokenizer, layer=-1).embed(texts[:1])[0]
    assert not np.allclose(last, vectors[0])
    with pytest.raises(InputError):
        HiddenStateEmbedder(model, tokenizer, layer=9)
    with pytest.raises(InputError):
        hidden.embed([""])
    with MemoryStore.open(tmp_path / "tiny.db") as store:
        memory = LongTermMemory(store, hidden, table="agent.tiny")
        memory.add("boats and sails")
        assert store.table("agent.tiny").key_dim == 64
        with pytest.raises(InputError, match="another table name"):
            LongTermMemory(store, HiddenStateEmbedder(model, tokenizer, name="other"),
                           table="agent.tiny")
        with pytest.raises(InputError, match="64-dim keys"):
            LongTermMemory(store, MiniLMEmbedder(), table="agent.tiny")
