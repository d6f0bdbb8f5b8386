"""SQL rows of the memory store: the source of truth the ANN index is derived from.

Vectors are float32 blobs. Tags are stored as ``,a,b,`` so a tag filter is a plain LIKE that
works the same on SQLite and PostgreSQL; metadata is JSON text.
"""

from __future__ import annotations

from sqlalchemy import Column, Index, LargeBinary
from sqlmodel import Field, SQLModel

STORE_MAGIC = "mindset-memory-store"
SCHEMA_VERSION = 1


class StoreInfo(SQLModel, table=True):
    """One row that marks a database as a memory store and hands out entry ids."""

    __tablename__ = "mindset_store_info"

    id: int = Field(default=1, primary_key=True)
    magic: str
    schema_version: int
    next_entry_id: int = 1


class MemoryTableRow(SQLModel, table=True):
    """A named table of entries with fixed key/value dimensions and an index kind."""

    __tablename__ = "mindset_memory_table"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True)
    key_dim: int
    value_dim: int
    index_kind: str
    capacity: int | None = None
    # LRFU: 0 behaves like LFU, larger values weigh recency more (LRU as it grows).
    lrfu_lambda: float = 0.1
    # When full, evict this fraction of the capacity at once so inserts do not evict one by one.
    evict_fraction: float = 0.05
    # Bumped by every committed batch that changes keys, values or membership; readers in
    # other processes compare it to catch up, and the saved index records it.
    version: int = 0
    created: float


class MemoryEntry(SQLModel, table=True):
    """One stored key/value pair with its access statistics."""

    __tablename__ = "mindset_memory_entry"
    __table_args__ = (Index("ix_entry_table_version", "table_id", "version"),)

    id: int = Field(primary_key=True)
    table_id: int  # indexed through (table_id, version)
    key: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    value: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created: float
    last_access: float
    access_count: int = 0
    # LRFU: combined recency/frequency value as of ``last_tick`` (the table's query clock).
    crf: float = 0.0
    last_tick: int = 0
    label: str | None = None
    tags: str = ","
    meta: str = "{}"
    provenance: str | None = None
    version: int = 0


class MemoryTombstone(SQLModel, table=True):
    """An entry removed at a table version, so other processes drop it from their index."""

    __tablename__ = "mindset_memory_tombstone"
    __table_args__ = (Index("ix_tombstone_table_version", "table_id", "version"),)

    id: int = Field(primary_key=True)
    table_id: int
    version: int
