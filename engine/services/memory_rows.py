"""Store rows as the workbench shows them (with the tokens each value promotes), and the
vectors a text gives a table's memory layer.

The model-side work runs in the runtime's model pool; torch loads on first use.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from engine.errors import MindsetError
from engine.runtime import STUDENT, TEACHER, Runtime
from engine.services.memory_mirror import (
    ASSOCIATIVE_SUFFIX,
    FEATURAL_SUFFIX,
    AssociativeTable,
    FeaturalTable,
    associative_projection,
)
from engine.views import EntryView

if TYPE_CHECKING:
    import numpy as np

    from engine.memory import MemoryRow, MemoryTable
    from engine.model.loading import LoadedModel


def entry_view(row: MemoryRow) -> EntryView:
    """One store row for display: its value's norm, and when it was last read."""
    import numpy as np

    norm = float(np.linalg.norm(np.asarray(row.value, dtype=np.float32)))
    if not row.access_count:
        last = "never"
    else:
        last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row.last_access)) \
            if row.last_access else ""
    return EntryView(
        id=int(row.id),
        label=row.label or "",
        tags=list(row.tags),
        access_count=int(row.access_count),
        last_access=last,
        norm=norm,
        source=read_source(row.meta),
    )


def read_source(meta: dict[str, Any]) -> str:
    """Where a read entry came from, e.g. ``notes/paris.md, token 112``; "" otherwise."""
    if meta.get("source") != "read":
        return ""
    return f"{meta.get('document') or 'text'}, token {meta.get('position', '?')}"


def layer_of_table(table: str) -> int | None:
    """Tables are named per layer, e.g. ``layer_15_featural``; None when the name has none."""
    match = re.search(r"(\d+)", table)
    return int(match.group(1)) if match else None


async def text_vectors(
    runtime: Runtime, loaded: LoadedModel, table: str,
    mirror: FeaturalTable | AssociativeTable | None, text: str, key_dim: int, value_dim: int,
) -> tuple[np.ndarray, np.ndarray]:
    """A key and a value for ``text``: the hidden state entering the table's layer (through
    the mirrored layer's own projections, when ``table`` mirrors one)."""
    from engine.model.inspect import hidden_vectors

    layer = mirror.layer if mirror else layer_of_table(table)
    return await runtime.in_models(
        hidden_vectors, loaded, text, layer, key_dim, value_dim,
        mirror.module if mirror else None,
    )


async def promoted_tokens(
    runtime: Runtime, table: str, rows: list[MemoryRow], featural: FeaturalTable | None,
    associative: AssociativeTable | None, top: int,
) -> list[list[str]] | None:
    """The tokens each row's value promotes most, through the loaded model (the student if
    there is one); None when no model can tell yet."""
    loaded = runtime.model(STUDENT) or runtime.model(TEACHER)
    if loaded is None or not rows:
        return None
    import numpy as np

    from engine.model import inspect

    if featural is None and table.endswith(FEATURAL_SUFFIX):
        return None  # a student's table whose student is still loading: projection unknown
    if associative is None and table.endswith(ASSOCIATIVE_SUFFIX) and runtime.student_spec \
            and runtime.model(STUDENT) is None:
        return None  # likewise; without a student it is an ordinary table of that name
    out_proj: Any = featural.module.out_proj if featural else None
    if associative is not None:
        out_proj = associative_projection(associative.module)
    elif out_proj is None and featural is None:
        out_proj = inspect.output_projection(loaded.model, layer_of_table(table))
    values = np.stack([np.asarray(row.value, dtype=np.float32) for row in rows])
    try:
        return await runtime.in_models(inspect.promoted_tokens, loaded, values, out_proj, top)
    except Exception:
        return None  # dimensions that do not map onto the residual stream: leave blank


PAGE_ORDERS = ("id", "usage", "norm")
DEAD_NORM = 1e-6  # a value this small adds nothing: a dead (or deleted) slot


class NormOrder:
    """Each table's rows by value norm, largest first, and how many are dead (norm ~ 0);
    computed once per table version (norms are not a SQL column)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[int, np.ndarray, int]] = {}

    def of(self, table: MemoryTable) -> tuple[np.ndarray, int]:
        import numpy as np

        version = table.version
        cached = self._cache.get(table.name)
        if cached is None or cached[0] != version:
            ids, _, values = table.export_arrays()
            norms = np.linalg.norm(values, axis=1) if len(values) else np.zeros(0)
            order = ids[np.argsort(-norms, kind="stable")]
            cached = (version, order, int((norms < DEAD_NORM).sum()))
            self._cache[table.name] = cached
        return cached[1], cached[2]


def page_rows(table: MemoryTable, offset: int, limit: int, order: str,
              norms: NormOrder) -> list[MemoryRow]:
    """One page of ``table`` in ``order``: by id, by reads (most first), or by value norm."""
    if order not in PAGE_ORDERS:
        raise MindsetError(f"cannot sort by {order!r}; use one of {', '.join(PAGE_ORDERS)}")
    if order == "id":
        return list(table.page(offset, limit))
    if order == "usage":
        return list(table.page(offset, limit, order_by="access_count", descending=True))
    ids = norms.of(table)[0][offset:offset + limit].tolist()
    by_id = {row.id: row for row in table.page(0, max(len(ids), 1), ids=ids)} if ids else {}
    return [by_id[i] for i in ids if i in by_id]
