"""Checking vector batches and turning them into float32 blobs and back, without row loops."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from engine.errors import InputError

Float32Array = npt.NDArray[np.float32]
Int64Array = npt.NDArray[np.int64]


def as_matrix(array: object, dim: int, what: str) -> Float32Array:
    """A C-contiguous float32 [B, dim] copy-free view where possible; clear errors otherwise."""
    try:
        matrix = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be a numeric array ({exc})") from exc
    if matrix.ndim == 1 and matrix.shape[0] == dim:
        matrix = matrix[None, :]
    if matrix.ndim != 2:
        raise InputError(f"{what} must be a 2-D array [batch, {dim}], got shape {matrix.shape}")
    if matrix.shape[1] != dim:
        raise InputError(f"{what} have dimension {matrix.shape[1]}, this table expects {dim}")
    if not np.isfinite(matrix).all():
        bad = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise InputError(f"{what} contain NaN or infinite values (first at row {bad})")
    return np.ascontiguousarray(matrix)


def as_ids(ids: object, what: str = "ids") -> Int64Array:
    try:
        array = np.asarray(ids)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be integers ({exc})") from exc
    if array.ndim == 0:
        array = array[None]
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{what} must be integers, got {array.dtype}")
    return np.ascontiguousarray(array.reshape(-1), dtype=np.int64)


def to_blobs(matrix: Float32Array) -> list[bytes]:
    """One bytes object per row, built in C (a void view's tolist), not a Python loop."""
    rows, dim = matrix.shape
    if rows == 0:
        return []
    view = np.ascontiguousarray(matrix, dtype=np.float32).view(np.dtype((np.void, dim * 4)))
    return view.reshape(rows).tolist()  # type: ignore[no-any-return]


def from_blobs(blobs: Sequence[bytes], dim: int) -> Float32Array:
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    joined = b"".join(blobs)
    if len(joined) != len(blobs) * dim * 4:
        raise InputError("stored vectors have the wrong size: the database is damaged")
    return np.frombuffer(joined, dtype=np.float32).reshape(len(blobs), dim).copy()
