"""Recombination: entries returned together in one top-k whose keys lie close merge into one.

Groups are the connected components of "closer than a distance" links; a group keeps its
smallest id and gets the access-weighted mean key and value (weight = accesses + 1), the summed
access count and the summed LRFU score. The memory store's tables and the associative layer's
in-process cache (whose "ids" are cache positions) both merge with these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from engine.memory.vectors import Float32Array, Int64Array


def merge_groups(ids: Int64Array, keys: Float32Array, distance: float) -> Int64Array:
    """Group label per unique id (sorted unique ids order); entries of one group merge.

    ``ids`` [B, k] (-1 = none) and their current ``keys`` [B, k, d]. Two entries returned in the
    same row whose squared L2 distance is at most ``distance`` are linked; groups are the
    connected components of those links. Returns (unique ids, group label per unique id) packed
    as a [2, U] array; the label is the smallest id of the group.
    """
    valid = ids >= 0
    sq = np.einsum("bkd,bkd->bk", keys, keys, dtype=np.float64)
    gram = np.einsum("bid,bjd->bij", keys, keys, dtype=np.float64)
    d2 = sq[:, :, None] + sq[:, None, :] - 2.0 * gram
    k = ids.shape[1]
    upper = np.triu(np.ones((k, k), dtype=bool), 1)
    linked = (d2 <= distance) & valid[:, :, None] & valid[:, None, :] & upper[None]
    rows, first, second = np.nonzero(linked)
    left, right = ids[rows, first], ids[rows, second]
    unique = np.unique(ids[valid])
    label = unique.copy()
    if len(left):
        a = np.searchsorted(unique, left)
        b = np.searchsorted(unique, right)
        # Label propagation: every linked pair takes the smaller label until nothing changes.
        while True:
            low = np.minimum(label[a], label[b])
            before = label.copy()
            np.minimum.at(label, a, low)
            np.minimum.at(label, b, low)
            label = label[np.searchsorted(unique, label)]  # follow labels to their roots
            if np.array_equal(before, label):
                break
    return np.stack([unique, label])


def group_members(packed: npt.NDArray[np.int64]) -> list[tuple[int, list[int]]]:
    """(kept id, merged-away ids) for each group of two or more."""
    unique, label = packed
    merged = unique != label
    if not merged.any():
        return []
    groups: dict[int, list[int]] = {}
    for member, root in zip(unique[merged].tolist(), label[merged].tolist(), strict=True):
        groups.setdefault(root, []).append(member)
    return sorted(groups.items())


@dataclass(frozen=True)
class MergePlan:
    """Groups laid out flat for vectorised merging: every member, group after group."""

    kept: Int64Array  # [G] the id each group keeps
    members: Int64Array  # [M] the members' ids, each group's kept id first
    group_of: Int64Array  # [M] the group of each member
    gone: Int64Array  # the merged-away ids, sorted

    @classmethod
    def of(cls, groups: list[tuple[int, list[int]]]) -> MergePlan:
        """The plan for :func:`group_members`' groups (at least one)."""
        return cls(
            kept=np.asarray([root for root, _ in groups], dtype=np.int64),
            members=np.concatenate([[root, *rest] for root, rest in groups]).astype(np.int64),
            group_of=np.concatenate(
                [[g] * (1 + len(rest)) for g, (_, rest) in enumerate(groups)]
            ).astype(np.int64),
            gone=np.asarray(sorted(m for _, rest in groups for m in rest), dtype=np.int64),
        )

    def first(self, column: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The smallest of a per-member column in each group (e.g. the oldest creation)."""
        out = np.full(len(self.kept), np.inf)
        np.minimum.at(out, self.group_of, column)
        return out

    def last(self, column: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The largest of a per-member column in each group (e.g. the newest access)."""
        out = np.full(len(self.kept), -np.inf)
        np.maximum.at(out, self.group_of, column)
        return out


@dataclass(frozen=True)
class Merged:
    """What each group becomes (aligned with ``MergePlan.kept``)."""

    key: Float32Array
    value: Float32Array
    access_count: Int64Array
    crf: npt.NDArray[np.float64]


def merge_entries(
    plan: MergePlan,
    keys: npt.NDArray[np.floating],
    values: npt.NDArray[np.floating],
    counts: Int64Array,
    crf_now: npt.NDArray[np.float64],
) -> Merged:
    """Merge per-member ``keys``, ``values``, access ``counts`` and LRFU scores already decayed
    to the current tick (all aligned with ``plan.members``)."""
    n = len(plan.kept)
    weight = (counts + 1).astype(np.float64)

    def weighted_mean(data: npt.NDArray[np.floating]) -> Float32Array:
        weighted = data.astype(np.float64) * weight[:, None]
        total = np.zeros((n, weighted.shape[1]))
        np.add.at(total, plan.group_of, weighted)
        weights = np.bincount(plan.group_of, weights=weight, minlength=n)
        return (total / weights[:, None]).astype(np.float32)

    return Merged(
        key=weighted_mean(keys),
        value=weighted_mean(values),
        access_count=np.bincount(plan.group_of, weights=counts, minlength=n).astype(np.int64),
        crf=np.asarray(np.bincount(plan.group_of, weights=crf_now, minlength=n), np.float64),
    )
