"""LRFU scores: one number per entry between LFU (lambda = 0) and LRU (large lambda).

Each access adds 1 to an entry's combined recency-frequency value (CRF); between accesses the
CRF halves every ``1 / lambda`` ticks of a query clock (one tick per query batch or step):
``crf(now) = crf(last) * 2 ** (-lambda * (now - last))``. Scores are decayed lazily, when read
or ranked, so a tick costs nothing for the entries it does not touch.

The memory store's tables and the associative layer's in-process cache both keep their
statistics with these functions.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from engine.errors import InputError

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


def check_lambda(lam: float) -> float:
    if not np.isfinite(lam) or lam < 0:
        raise InputError(f"LRFU lambda must be a finite number >= 0, got {lam}")
    return float(lam)


def lambda_for_decay(decay: float) -> float:
    """The lambda under which a score keeps the fraction ``decay`` (0 < decay <= 1) per tick."""
    return check_lambda(0.0 - math.log2(decay))


def decayed(crf: F64, last_tick: I64, now: int, lam: float) -> F64:
    return crf * np.exp2(-lam * (now - last_tick).astype(np.float64))


def hit_counts(positions: I64, size: int) -> tuple[I64, I64]:
    """(distinct positions, reads of each) for a batch of reads among ``size`` entries."""
    if size <= 4 * len(positions):  # dense batch: counting beats sorting
        counts_all = np.bincount(positions, minlength=size)
        where = np.flatnonzero(counts_all)
        return where.astype(np.int64), counts_all[where].astype(np.int64)
    where, counts = np.unique(positions, return_counts=True)
    return where.astype(np.int64), counts.astype(np.int64)


def record_hits(crf: F64, last_tick: I64, where: I64, counts: I64, now: int, lam: float) -> None:
    """Bring the read entries' scores to tick ``now`` and add their reads (in place)."""
    crf[where] = decayed(crf[where], last_tick[where], now, lam) + counts
    last_tick[where] = now


def eviction_order(crf: F64, last_tick: I64, ids: I64, now: int, lam: float) -> I64:
    """Positions from first to last evicted: lowest score first, older (smaller) id on ties."""
    return np.lexsort((ids, decayed(crf, last_tick, now, lam))).astype(np.int64)


def eviction_count(total: int, capacity: int | None, fraction: float) -> int:
    """How many of ``total`` entries to evict: down to ``capacity`` less a slack of
    ``fraction`` of it (evicting in batches, so a full table does not evict one by one)."""
    if capacity is None or total <= capacity:
        return 0
    return min(total - capacity + int(capacity * fraction), total)


def choose_victims(
    crf: F64, last_tick: I64, ids: I64, fresh_ids: I64, count: int, now: int, lam: float
) -> I64:
    """``count`` ids to evict, sorted: the lowest-scoring of ``ids`` first, and only past
    those the just-inserted ``fresh_ids`` (oldest first)."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    order = eviction_order(crf, last_tick, ids, now, lam)
    evicted = ids[order[: min(count, len(ids))]]
    if count > len(ids):
        evicted = np.concatenate([evicted, fresh_ids[: count - len(ids)]])
    return np.sort(evicted)
