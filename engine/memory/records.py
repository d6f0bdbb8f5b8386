"""What the store hands back: query results and browsable rows, plus tag/meta encoding."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np

from engine.errors import InputError
from engine.memory.vectors import Float32Array, Int64Array


@dataclass(frozen=True)
class QueryResult:
    """Top-k per query: ids are -1 (keys/values zero, distance inf) where fewer than k exist."""

    ids: Int64Array  # [B, k]
    distances: Float32Array  # [B, k]: squared L2, or inner product for flat-ip
    keys: Float32Array  # [B, k, key_dim]
    values: Float32Array  # [B, k, value_dim]


@dataclass(frozen=True)
class MemoryRow:
    id: int
    key: Float32Array
    value: Float32Array
    created: float
    last_access: float
    access_count: int
    label: str | None
    tags: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    provenance: str | None = None


def encode_tags(tags: Sequence[str]) -> str:
    for tag in tags:
        if not isinstance(tag, str) or not tag or "," in tag or "%" in tag or "_" in tag:
            raise InputError(f"tag {tag!r} is not allowed: tags are non-empty text without , % _")
    return "," + ",".join(sorted(set(tags))) + ("," if tags else "")


def decode_tags(text: str | None) -> list[str]:
    return [tag for tag in (text or "").split(",") if tag]


def encode_meta(meta: dict[str, Any]) -> str:
    if not isinstance(meta, dict):
        raise InputError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        return json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"meta must be JSON-serialisable ({exc})") from exc


def decode_meta(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    data = json.loads(text)
    return data if isinstance(data, dict) else {}


def per_row(value: Any, rows: int, what: str, encode: Any, shared: bool) -> Any:
    """An iterable of encoded per-row values: one shared value repeated, or one per row."""
    if value is None:
        return repeat(encode(None) if encode is not None else None, rows)
    if shared:
        return repeat(encode(value) if encode is not None else value, rows)
    if len(value) != rows:
        raise InputError(f"{what} has {len(value)} entries for {rows} rows")
    return [encode(item) if encode is not None else item for item in value]


def label_column(labels: str | Sequence[str | None] | None, rows: int) -> Any:
    if labels is not None and not isinstance(labels, str | list | tuple | np.ndarray):
        raise InputError("labels must be a string or a sequence of strings")
    return per_row(labels, rows, "labels", None, shared=isinstance(labels, str))


def tags_column(tags: Sequence[str] | Sequence[Sequence[str]] | None, rows: int) -> Any:
    shared = tags is None or len(tags) == 0 or isinstance(tags[0], str)
    return per_row(tags, rows, "tags", lambda t: encode_tags(t or []), shared=shared)


def meta_column(meta: dict[str, Any] | Sequence[dict[str, Any]] | None, rows: int) -> Any:
    return per_row(
        meta, rows, "meta", lambda m: encode_meta(m or {}), shared=isinstance(meta, dict)
    )


def provenance_column(provenance: str | Sequence[str | None] | None, rows: int) -> Any:
    return per_row(provenance, rows, "provenance", None, shared=isinstance(provenance, str))


def select_rows(value: Any, mask: np.ndarray, name: str) -> Any:
    """Keep per-row option entries where ``mask`` is set; shared values pass through."""
    if value is None or isinstance(value, str | dict):
        return value
    if name == "tags" and (len(value) == 0 or isinstance(value[0], str)):
        return value
    if len(value) != len(mask):
        raise InputError(f"{name} has {len(value)} entries for {len(mask)} rows")
    return [item for item, keep in zip(value, mask.tolist(), strict=True) if keep]


def empty_result(batch: int, k: int, key_dim: int, value_dim: int) -> QueryResult:
    return QueryResult(
        ids=np.full((batch, k), -1, dtype=np.int64),
        distances=np.full((batch, k), np.inf, dtype=np.float32),
        keys=np.zeros((batch, k, key_dim), dtype=np.float32),
        values=np.zeros((batch, k, value_dim), dtype=np.float32),
    )
