"""Which entries of a top-k merge: connected groups of keys closer than a distance."""

from __future__ import annotations

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
