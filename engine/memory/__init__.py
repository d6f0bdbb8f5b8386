"""The memory store: durable, batched kNN tables (SQL rows + a derived faiss index).

store = MemoryStore.open(path_or_url)
table = store.create_table("layer3", key_dim=64, value_dim=64, index="flat-l2")
ids = table.insert(keys, values)
result = table.query(queries, k=32)

The names below load on first use: the model's memory layers import ``engine.memory.lrfu``
and ``engine.memory.recombination`` (plain numpy), which must not pull in SQLAlchemy and faiss.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.memory.ann import INDEX_KINDS
    from engine.memory.reader import MAX_K
    from engine.memory.records import MemoryRow, QueryResult
    from engine.memory.store import MemoryStore
    from engine.memory.table import MemoryTable

_HOMES = {
    "INDEX_KINDS": "engine.memory.ann",
    "MAX_K": "engine.memory.reader",
    "MemoryRow": "engine.memory.records",
    "MemoryStore": "engine.memory.store",
    "MemoryTable": "engine.memory.table",
    "QueryResult": "engine.memory.records",
}

__all__ = [
    "INDEX_KINDS",
    "MAX_K",
    "MemoryRow",
    "MemoryStore",
    "MemoryTable",
    "QueryResult",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(home), name)
    globals()[name] = value
    return value
