"""LRFU scores: one number per entry between LFU (lambda = 0) and LRU (large lambda).

Each access adds 1 to an entry's combined recency-frequency value (CRF); between accesses the
CRF halves every ``1 / lambda`` ticks of the table's query clock (one tick per query batch):
``crf(now) = crf(last) * 2 ** (-lambda * (now - last))``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from engine.errors import InputError

F64 = npt.NDArray[np.float64]


def check_lambda(lam: float) -> float:
    if not np.isfinite(lam) or lam < 0:
        raise InputError(f"LRFU lambda must be a finite number >= 0, got {lam}")
    return float(lam)


def decayed(crf: F64, last_tick: npt.NDArray[np.int64], now: int, lam: float) -> F64:
    return crf * np.exp2(-lam * (now - last_tick).astype(np.float64))


def eviction_order(
    crf: F64, last_tick: npt.NDArray[np.int64], ids: npt.NDArray[np.int64], now: int, lam: float
) -> npt.NDArray[np.int64]:
    """Positions from first to last evicted: lowest score first, older (smaller) id on ties."""
    return np.lexsort((ids, decayed(crf, last_tick, now, lam))).astype(np.int64)
