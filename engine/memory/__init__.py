"""The memory store: durable, batched kNN tables (SQL rows + a derived faiss index).

store = MemoryStore.open(path_or_url)
table = store.create_table("layer3", key_dim=64, value_dim=64, index="flat-l2")
ids = table.insert(keys, values)
result = table.query(queries, k=32)
"""

from engine.memory.ann import INDEX_KINDS
from engine.memory.async_store import AsyncMemoryStore
from engine.memory.records import MemoryRow, QueryResult
from engine.memory.store import MemoryStore
from engine.memory.table import MAX_K, MemoryTable

__all__ = [
    "INDEX_KINDS",
    "MAX_K",
    "AsyncMemoryStore",
    "MemoryRow",
    "MemoryStore",
    "MemoryTable",
    "QueryResult",
]
