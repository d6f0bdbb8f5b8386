"""The agent's long-term memory: turns, summaries, reflections, facts and notes, retrieved by
recency, importance and relevance (the Generative Agents scheme).

Each memory is one row of a memory-store table (default ``agent.memories``), so the
workbench's Memory pane browses it like any other table: key = the text's embedding
(``embedder.dim``, index ``flat-ip``), value = ``[importance]``, label = the text shortened
for display, tags = ``[kind]``, provenance ``agent``, and meta = ``{"kind", "text" (full),
"importance", "conversation_id", "node_id", "evidence": [ids], "embedder", "created",
"last_access"}``. ``created`` and ``last_access`` live in meta, on the agent's own clock
(the store's columns of those names are wall time, and its accesses count kNN hits).

Scoring. For each candidate i:

* recency_raw = decay_per_hour ** (hours since last access), hours = max(now - last_access,
  0) / 3600;
* importance_raw = importance (1..10);
* relevance_raw = cosine(query embedding, memory embedding).

Each raw part is min-max normalised over the candidate set: (x - min) / (max - min), and 0
when max == min. score = w_rec * recency + w_imp * importance + w_rel * relevance. The top k
by score are returned (ties: newer first, by creation time then id). With ``touch`` the
returned memories' last_access becomes ``now`` (never earlier than it was), written to their
meta; the results themselves show the state they were scored in.

Candidates are all rows passing the filters (kinds, conversation) when there are at most
``full_scan_limit`` (20,000) of them; above that, the ``ann_candidates`` (2,000) best by
relevance from the table's faiss index plus the ``recent_candidates`` (200) most recently
accessed, among those passing the filters.

Rows are read once into memory (the store's arrays and metas) and kept in step by the
table's version: this process's own writes patch the copy, anyone else's reload it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from engine.agent.embedding import Embedder
from engine.errors import InputError
from engine.memory.store import MemoryStore
from engine.memory.vectors import Float32Array, Int64Array

KINDS = ("turn", "summary", "reflection", "fact", "note")
DEFAULT_TABLE = "agent.memories"
PROVENANCE = "agent"
INDEX_KIND = "flat-ip"
LABEL_CHARS = 200
FORMAT_CHARS = 1_000
MAX_TEXT_CHARS = 100_000
MAX_K = 100  # each returned memory is touched in its own write
MAX_RECENT = 10_000
FULL_SCAN_LIMIT = 20_000
ANN_CANDIDATES = 2_000
RECENT_CANDIDATES = 200
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True)
class Memory:
    id: int
    kind: str
    text: str
    importance: int
    created: float
    last_access: float
    conversation_id: str | None
    node_id: str | None
    evidence: tuple[int, ...]


@dataclass(frozen=True)
class ScoredMemory:
    memory: Memory
    score: float  # weighted sum of the three normalised parts
    recency: float  # each min-max normalised over the candidate set, in [0, 1]
    importance: float
    relevance: float
    cosine: float  # raw cosine similarity to the query


@dataclass(frozen=True)
class RetrievalWeights:
    # The weights of Generative Agents' released code (retrieve.py: gw = [0.5, 3, 2]); the
    # paper sets all three to 1. Within one session every memory is minutes old, so min-max
    # normalised recency spans [0, 1] on differences of seconds: at equal weights it buries
    # an early fact under the latest small talk.
    recency: float = 0.5
    importance: float = 2.0
    relevance: float = 3.0
    decay_per_hour: float = 0.995  # the paper's exponential recency decay

    def validate(self) -> RetrievalWeights:
        parts = (self.recency, self.importance, self.relevance)
        if not all(_real(w) and math.isfinite(w) and w >= 0 for w in parts):
            raise InputError(f"retrieval weights must be finite numbers >= 0, got {parts}")
        if not any(parts):
            raise InputError("retrieval weights are all zero; give at least one a positive weight")
        decay = self.decay_per_hour
        if not (_real(decay) and math.isfinite(decay) and 0 < decay <= 1):
            raise InputError(f"decay_per_hour must be in (0, 1], got {decay!r}")
        return self


@dataclass(frozen=True)
class NewMemory:
    """One memory to write with :meth:`LongTermMemory.add_many`."""

    text: str
    kind: str = "turn"
    importance: int = 5
    conversation_id: str | None = None
    node_id: str | None = None
    evidence: Sequence[int] = ()
    created: float | None = None


def _real(value: object) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def _integer(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_filters(kinds: Sequence[str] | None, conversation_id: object) -> tuple[str, ...] | None:
    _check_optional_text(conversation_id, "conversation_id")
    if kinds is None:
        return None
    chosen = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    if not chosen or any(kind not in KINDS for kind in chosen):
        raise InputError(f"memory kinds must be among {', '.join(KINDS)}, got {list(chosen)}")
    return chosen


def _check_optional_text(value: object, what: str) -> None:
    if value is not None and not isinstance(value, str):
        raise InputError(f"{what} must be text or None, got {type(value).__name__}")


def _check_count(value: Any, what: str, top: int) -> int:
    if not _integer(value) or not 1 <= int(value) <= top:
        raise InputError(f"{what} must be an integer between 1 and {top}, got {value!r}")
    return int(value)


def _check_time(value: Any, what: str) -> float:
    if not _real(value) or not math.isfinite(value):
        raise InputError(f"{what} must be a finite number of seconds, got {value!r}")
    return float(value)


def shorten(text: str, limit: int) -> str:
    """``text`` on one line, cut to ``limit`` characters with an ellipsis."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def min_max(raw: np.ndarray) -> np.ndarray:
    """(x - min) / (max - min) over the array; zeros when all values are equal."""
    low, high = float(raw.min()), float(raw.max())
    if high == low:
        return np.zeros(len(raw), dtype=np.float64)
    return (raw - low) / (high - low)


def is_memory(meta: dict[str, Any]) -> bool:
    """Whether a row's meta is one this module wrote (other rows of the table are skipped)."""
    return (isinstance(meta.get("text"), str) and _real(meta.get("created"))
            and _real(meta.get("last_access")))


def memory_of(entry_id: int, meta: dict[str, Any]) -> Memory:
    """The memory a row's meta describes; fields edited into nonsense get safe defaults."""
    kind, importance, evidence = meta.get("kind"), meta.get("importance"), meta.get("evidence")
    conversation, node = meta.get("conversation_id"), meta.get("node_id")
    return Memory(
        id=entry_id, kind=kind if kind in KINDS else "note", text=meta["text"],
        importance=min(max(int(meta["importance"]), 1), 10) if _integer(importance) else 5,
        created=float(meta["created"]), last_access=float(meta["last_access"]),
        conversation_id=conversation if isinstance(conversation, str) else None,
        node_id=node if isinstance(node, str) else None,
        evidence=tuple(int(i) for i in evidence if _integer(i)) if isinstance(evidence, list)
        else (),
    )


ARRAYS = ("ids", "keys", "norms", "importance", "created", "last_access", "kinds",
          "conversations")


class _Rows:
    """The table's memories in id order, with the columns scoring reads as arrays."""

    def __init__(
        self, version: int, ids: Int64Array, keys: Float32Array,
        memories: list[Memory], metas: list[dict[str, Any]],
    ) -> None:
        self.version = version
        self.ids = ids
        self.keys = keys
        self.norms = np.linalg.norm(keys, axis=1) if len(keys) else np.zeros(0, np.float32)
        self.memories = memories
        self.metas = metas
        self.importance = np.asarray([m.importance for m in memories], dtype=np.float64)
        self.created = np.asarray([m.created for m in memories], dtype=np.float64)
        self.last_access = np.asarray([m.last_access for m in memories], dtype=np.float64)
        self.kinds = np.asarray([KINDS.index(m.kind) for m in memories], dtype=np.int8)
        self.conversations = np.asarray([m.conversation_id for m in memories], dtype=object)

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: Sequence[int] | Int64Array, table: str) -> Int64Array:
        wanted = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self.ids, wanted)
        found = pos < len(self.ids)
        found[found] = self.ids[pos[found]] == wanted[found]
        if not found.all():
            missing = wanted[~found][:5].tolist()
            raise InputError(f"no memories with ids {missing} in table {table!r}")
        return pos.astype(np.int64)

    def mask(self, kinds: tuple[str, ...] | None, conversation_id: str | None) -> np.ndarray:
        keep = np.ones(len(self), dtype=bool)
        if kinds is not None:
            keep &= np.isin(self.kinds, [KINDS.index(kind) for kind in kinds])
        if conversation_id is not None:
            keep &= self.conversations == conversation_id
        return keep

    def extended(self, version: int, ids: Int64Array, keys: Float32Array,
                 memories: list[Memory], metas: list[dict[str, Any]]) -> _Rows:
        """These rows followed by new ones (arrays joined, not rebuilt from the memories)."""
        new = _Rows(version, ids, keys, memories, metas)
        for name in ARRAYS:
            setattr(new, name, np.concatenate([getattr(self, name), getattr(new, name)]))
        new.memories, new.metas = self.memories + memories, self.metas + metas
        return new


class LongTermMemory:
    """Memories in one memory-store table; see the module docstring for the scoring."""

    def __init__(self, store: MemoryStore, embedder: Embedder, *, table: str = DEFAULT_TABLE,
                 clock: Callable[[], float] = time.time, full_scan_limit: int = FULL_SCAN_LIMIT,
                 ann_candidates: int = ANN_CANDIDATES,
                 recent_candidates: int = RECENT_CANDIDATES) -> None:
        dim = embedder.dim
        if not _integer(dim) or dim < 1:
            raise InputError(f"embedder {embedder.name!r} has no usable dimension ({dim!r})")
        self.full_scan_limit = _check_count(full_scan_limit, "full_scan_limit", 10**9)
        self.ann_candidates = _check_count(ann_candidates, "ann_candidates", 4096)
        self.recent_candidates = _check_count(recent_candidates, "recent_candidates", 10**6)
        if table in store.table_names():
            existing = store.table(table)
            shape = (existing.key_dim, existing.value_dim, existing.index_kind)
            if shape != (dim, 1, INDEX_KIND):
                raise InputError(
                    f"memory table {table!r} holds {shape[0]}-dim keys ({shape[2]}, value_dim "
                    f"{shape[1]}), but the {embedder.name} embedder needs {dim}-dim keys "
                    f"({INDEX_KIND}, value_dim 1); use another table name"
                )
        self.store = store
        self.embedder = embedder
        self.clock = clock
        self.table_name = table
        self._table = store.create_table(table, dim, 1, index=INDEX_KIND, exist_ok=True)
        self._lock = threading.RLock()
        self._rows: _Rows | None = None
        rows = self._current()
        foreign = {meta.get("embedder") for meta in rows.metas} - {None, embedder.name}
        if foreign:
            raise InputError(
                f"memory table {table!r} holds embeddings from {sorted(map(str, foreign))}, not "
                f"{embedder.name!r}; open it with that embedder or use another table name"
            )

    # ------------------------------------------------------------------------ rows
    def _current(self) -> _Rows:
        """The rows as of the table's latest commit (reloaded only when it changed)."""
        table = self._table
        table.refresh()
        if self._rows is not None and self._rows.version == table.version:
            return self._rows
        ids, keys, _values = table.export_arrays()
        version = table.version
        meta_ids, all_metas = table.metas()
        # metas() reads SQL directly and may be a commit ahead: keep the rows both saw.
        common, at_arrays, at_metas = np.intersect1d(ids, meta_ids, return_indices=True)
        metas = [all_metas[i] for i in at_metas.tolist()]
        ours = np.asarray([is_memory(meta) for meta in metas], dtype=bool)
        metas = [meta for meta, keep in zip(metas, ours.tolist(), strict=True) if keep]
        common = common[ours].astype(np.int64)
        memories = [memory_of(i, meta) for i, meta in zip(common.tolist(), metas, strict=True)]
        self._rows = _Rows(version, common, keys[at_arrays[ours]], memories, metas)
        return self._rows

    # ------------------------------------------------------------------------ writes
    def add(self, text: str, *, kind: str = "turn", importance: int = 5,
            conversation_id: str | None = None, node_id: str | None = None,
            evidence: Sequence[int] = (), created: float | None = None) -> Memory:
        """Store one memory (embedded now); returns it with its id."""
        item = NewMemory(text, kind, importance, conversation_id, node_id, evidence, created)
        return self.add_many([item])[0]

    def _check_new(self, item: NewMemory) -> NewMemory:
        text = item.text
        if not isinstance(text, str) or not text.strip():
            raise InputError("a memory needs non-empty text")
        if len(text) > MAX_TEXT_CHARS:
            raise InputError(f"memory text has {len(text):,} characters; the limit is "
                             f"{MAX_TEXT_CHARS:,}: summarise it first")
        if item.kind not in KINDS:
            raise InputError(f"unknown memory kind {item.kind!r}; use {', '.join(KINDS)}")
        if not _integer(item.importance) or not 1 <= int(item.importance) <= 10:
            raise InputError(f"importance must be an integer from 1 to 10, got {item.importance!r}")
        _check_optional_text(item.conversation_id, "conversation_id")
        _check_optional_text(item.node_id, "node_id")
        if isinstance(item.evidence, str | bytes) or not all(map(_integer, item.evidence)):
            raise InputError(f"evidence must be a list of memory ids, got {item.evidence!r}")
        created = None if item.created is None else _check_time(item.created, "created")
        return replace(item, importance=int(item.importance), created=created,
                       evidence=tuple(int(i) for i in item.evidence))

    def _meta(self, item: NewMemory, stamp: float) -> dict[str, Any]:
        return {"kind": item.kind, "text": item.text, "importance": item.importance,
                "conversation_id": item.conversation_id, "node_id": item.node_id,
                "evidence": list(item.evidence), "embedder": self.embedder.name,
                "created": stamp, "last_access": stamp}

    def add_many(self, items: Sequence[NewMemory]) -> list[Memory]:
        """Store a batch: one embedding call and one insert. All are checked before any is
        written; evidence must name memories already stored."""
        checked = [self._check_new(item) for item in items]
        if not checked:
            return []
        vectors = np.asarray(self.embedder.embed([item.text for item in checked]), np.float32)
        if vectors.shape != (len(checked), self.embedder.dim):
            raise InputError(f"embedder {self.embedder.name!r} returned shape {vectors.shape}, "
                             f"expected {(len(checked), self.embedder.dim)}")
        with self._lock:
            rows = self._current()
            cited = sorted({i for item in checked for i in item.evidence})
            if cited:
                rows.positions(cited, self.table_name)
            now = float(self.clock())
            metas = [self._meta(item, now if item.created is None else item.created)
                     for item in checked]
            ids = self._table.insert(
                vectors,
                np.asarray([[item.importance] for item in checked], dtype=np.float32),
                meta=metas,
                labels=[shorten(item.text, LABEL_CHARS) for item in checked],
                tags=[[item.kind] for item in checked],
                provenance=PROVENANCE,
            )
            memories = [memory_of(i, meta) for i, meta in zip(ids.tolist(), metas, strict=True)]
            # Patch our copy only if this insert was the one commit since it was read.
            in_order = not len(rows) or int(ids.min()) > int(rows.ids[-1])
            if (self._table.version == rows.version + 1 and in_order
                    and len(self._table) == len(rows) + len(ids)):
                self._rows = rows.extended(self._table.version, ids, vectors, memories, metas)
            else:  # another writer, an eviction or a restored id: read everything again
                self._rows = None
            return memories

    def _touch(self, rows: _Rows, positions: Int64Array, now: float) -> None:
        """Set last_access to ``now`` (never back in time) for the rows, in their meta."""
        before = rows.version
        for pos in positions.tolist():
            stamp = max(now, rows.memories[pos].last_access)
            meta = dict(rows.metas[pos], last_access=stamp)
            self._table.update([int(rows.ids[pos])], meta=meta)
            rows.metas[pos] = meta
            rows.memories[pos] = replace(rows.memories[pos], last_access=stamp)
            rows.last_access[pos] = stamp
        if self._table.version == before + len(positions):  # nobody else wrote meanwhile
            rows.version = self._table.version
        else:
            self._rows = None

    # ------------------------------------------------------------------------ reads
    def get(self, ids: Sequence[int]) -> list[Memory]:
        """Memories by id, in the order given; an unknown id is an error."""
        if isinstance(ids, str | bytes) or not all(map(_integer, ids)):
            raise InputError(f"memory ids must be integers, got {ids!r}")
        with self._lock:
            rows = self._current()
            return [rows.memories[p] for p in rows.positions(list(ids), self.table_name).tolist()]

    def recent(self, n: int = 20, *, kinds: Sequence[str] | None = None,
               conversation_id: str | None = None) -> list[Memory]:
        """The ``n`` most recently created memories passing the filters, oldest first."""
        n = _check_count(n, "n", MAX_RECENT)
        chosen = _check_filters(kinds, conversation_id)
        with self._lock:
            rows = self._current()
            where = np.flatnonzero(rows.mask(chosen, conversation_id))
            order = np.lexsort((rows.ids[where], rows.created[where]))
            return [rows.memories[p] for p in where[order[-n:]].tolist()]

    def importance_since(self, since_id: int) -> int:
        """Summed importance of the memories with id > ``since_id``, reflections excluded."""
        if not _integer(since_id) or since_id < 0:
            raise InputError(f"since_id must be an integer >= 0, got {since_id!r}")
        with self._lock:
            rows = self._current()
            keep = (rows.ids > since_id) & (rows.kinds != KINDS.index("reflection"))
            return int(rows.importance[keep].sum())

    def __len__(self) -> int:
        with self._lock:
            return len(self._current())

    # ------------------------------------------------------------------------ retrieval
    def search(self, query: str, k: int = 5, *, weights: RetrievalWeights | None = None,
               kinds: Sequence[str] | None = None, conversation_id: str | None = None,
               now: float | None = None, touch: bool = True) -> list[ScoredMemory]:
        """The ``k`` best memories for ``query`` by the documented score, best first."""
        if not isinstance(query, str) or not query.strip():
            raise InputError("a memory search needs non-empty query text")
        k = _check_count(k, "k", MAX_K)
        weights = (weights or RetrievalWeights()).validate()
        chosen = _check_filters(kinds, conversation_id)
        moment = float(self.clock()) if now is None else _check_time(now, "now")
        vector = np.asarray(self.embedder.embed([query]), dtype=np.float32).reshape(-1)
        if vector.shape != (self.embedder.dim,):
            raise InputError(f"embedder {self.embedder.name!r} returned a query vector of "
                             f"shape {vector.shape}, expected ({self.embedder.dim},)")
        with self._lock:
            rows = self._current()
            keep = rows.mask(chosen, conversation_id)
            count = int(keep.sum())
            if count == 0:
                return []
            full = count <= self.full_scan_limit
            cand = np.flatnonzero(keep) if full else self._shortlist(rows, vector, keep)
            keys = rows.keys if len(cand) == len(rows) else rows.keys[cand]
            dots = (keys @ vector).astype(np.float64)
            scale = rows.norms[cand].astype(np.float64) * float(np.linalg.norm(vector))
            cosine = np.divide(dots, scale, out=np.zeros_like(dots), where=scale > 0)
            hours = np.maximum(moment - rows.last_access[cand], 0.0) / SECONDS_PER_HOUR
            recency = min_max(np.power(weights.decay_per_hour, hours))
            importance = min_max(rows.importance[cand])
            relevance = min_max(cosine)
            score = (weights.recency * recency + weights.importance * importance
                     + weights.relevance * relevance)
            top = np.lexsort((-rows.ids[cand], -rows.created[cand], -score))[:k]
            results = [ScoredMemory(rows.memories[int(cand[i])], float(score[i]),
                                    float(recency[i]), float(importance[i]),
                                    float(relevance[i]), float(cosine[i])) for i in top.tolist()]
            if touch:
                self._touch(rows, cand[top], moment)
            return results

    def _shortlist(self, rows: _Rows, vector: Float32Array, keep: np.ndarray) -> Int64Array:
        """Positions of the index's best matches plus the most recently accessed rows."""
        wanted = min(self.ann_candidates, len(self._table))
        found = self._table.query(vector[None, :], wanted, record_access=False).ids[0]
        found = found[found >= 0]
        pos = np.searchsorted(rows.ids, found)
        known = pos < len(rows)  # ids committed since our copy was read are skipped
        known[known] = rows.ids[pos[known]] == found[known]
        hits = pos[known]
        hits = hits[keep[hits]]
        passing = np.flatnonzero(keep)
        latest = min(self.recent_candidates, len(passing))
        recent = passing[np.argsort(rows.last_access[passing], kind="stable")[-latest:]]
        return np.union1d(hits, recent).astype(np.int64)

    def format(self, results: Sequence[ScoredMemory]) -> str:
        """One line per result: ``[#12 turn, imp 7, score 2.31] text``."""
        if not results:
            return "(no memories found)"
        return "\n".join(
            f"[#{r.memory.id} {r.memory.kind}, imp {r.memory.importance}, score {r.score:.2f}] "
            f"{shorten(r.memory.text, FORMAT_CHARS)}"
            for r in results
        )
