"""Column arrays that grow by doubling, so appending a batch to a big table does not copy it."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt


class GrowableColumns:
    """Parallel numpy columns with a shared length; ``col(name)`` is a view of the used part."""

    def __init__(self, spec: dict[str, tuple[Any, tuple[int, ...]]]) -> None:
        self._spec = spec
        self._data = {
            name: np.zeros((16, *shape), dtype=dtype) for name, (dtype, shape) in spec.items()
        }
        self.size = 0

    def col(self, name: str) -> npt.NDArray[Any]:
        return self._data[name][: self.size]

    def append(self, columns: dict[str, npt.NDArray[Any]]) -> None:
        rows = len(next(iter(columns.values())))
        needed = self.size + rows
        capacity = len(next(iter(self._data.values())))
        if needed > capacity:
            new_capacity = max(needed, capacity * 2)
            for name, array in self._data.items():
                grown = np.zeros((new_capacity, *array.shape[1:]), dtype=array.dtype)
                grown[: self.size] = array[: self.size]
                self._data[name] = grown
        for name, array in self._data.items():
            array[self.size : needed] = columns[name]
        self.size = needed

    def keep(self, mask: npt.NDArray[np.bool_]) -> None:
        """Drop the rows where ``mask`` is False, keeping order."""
        kept = int(mask.sum())
        for _name, array in self._data.items():
            array[:kept] = array[: self.size][mask]
        self.size = kept

    def reorder(self, order: npt.NDArray[np.int64]) -> None:
        for _name, array in self._data.items():
            array[: self.size] = array[: self.size][order]
