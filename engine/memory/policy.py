"""A table's eviction and merge policy: settings checks, and LRFU / recombination applied to
the rows it holds in memory (the scoring and merging themselves live in ``lrfu`` and
``recombination``, shared with the associative layer's cache)."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.errors import InputError
from engine.memory.lrfu import choose_victims, decayed, eviction_count
from engine.memory.recombination import MergePlan, group_members, merge_entries, merge_groups
from engine.memory.sync import Mirror
from engine.memory.vectors import Int64Array


def check_capacity(capacity: object) -> int | None:
    if capacity is None:
        return None
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise InputError(f"capacity must be a positive integer or None, got {capacity!r}")
    return capacity


def check_fraction(fraction: float) -> float:
    if not 0.0 <= fraction < 1.0:
        raise InputError(f"evict fraction must be in [0, 1), got {fraction}")
    return float(fraction)


def plan_eviction(
    mirror: Mirror,
    fresh_ids: Int64Array | None,
    count: int | None,
    *,
    capacity: int | None,
    fraction: float,
    clock: int,
    lam: float,
) -> Int64Array:
    """Ids to evict, sorted: lowest LRFU score first; rows being inserted (``fresh_ids``, not
    yet in the mirror) go last. ``count`` None: whatever brings the table back under its
    capacity, less the slack."""
    cols = mirror.cols
    ids = cols.col("id")
    fresh = np.zeros(0, dtype=np.int64) if fresh_ids is None else fresh_ids
    if count is None:
        count = eviction_count(len(ids) + len(fresh), capacity, fraction)
    elif fresh_ids is None:
        count = min(count, len(ids))
    return choose_victims(cols.col("crf"), cols.col("last_tick"), ids, fresh, count, clock, lam)


def recombination_groups(
    mirror: Mirror, ids: Int64Array, distance: float
) -> list[tuple[int, list[int]]]:
    """Groups to merge among a top-k's ids [batch, k] (ids no longer stored are skipped)."""
    pos, present = mirror.lookup(ids)
    ids = np.where(present, ids, -1)
    keys = (
        mirror.cols.col("key")[pos]
        if len(mirror)
        else np.zeros((*ids.shape, mirror.key_dim), np.float32)
    )
    return group_members(merge_groups(ids, keys, distance))


def merged_rows(mirror: Mirror, plan: MergePlan, clock: int, lam: float) -> dict[str, Any]:
    """The new columns of each group's kept row; CRFs are summed as of tick ``clock``.

    Besides the shared merge (means, counts, scores), a row keeps the oldest creation time and
    the newest access time of its group.
    """
    cols = mirror.cols
    pos = mirror.positions(plan.members)
    crf_now = decayed(cols.col("crf")[pos], cols.col("last_tick")[pos], clock, lam)
    merged = merge_entries(
        plan, cols.col("key")[pos], cols.col("value")[pos], cols.col("access_count")[pos], crf_now
    )
    return {
        "id": plan.kept,
        "key": merged.key,
        "value": merged.value,
        "access_count": merged.access_count,
        "created": plan.first(cols.col("created")[pos]),
        "last_access": plan.last(cols.col("last_access")[pos]),
        "crf": merged.crf,
    }
