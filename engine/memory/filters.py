"""Browsing rows in SQL: paging and filtering by id range, tags, label text, access counts."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.engine import Connection, Row

from engine.errors import InputError
from engine.memory.records import MemoryRow, decode_meta, decode_tags, encode_tags
from engine.memory.schema import MemoryEntry
from engine.memory.vectors import from_blobs

ENTRY = MemoryEntry.__table__  # type: ignore[attr-defined]
ORDERABLE = ("id", "access_count", "last_access", "created")
MAX_PAGE = 10_000
ROW_COLUMNS = (
    "id",
    "key",
    "value",
    "created",
    "last_access",
    "access_count",
    "label",
    "tags",
    "meta",
    "provenance",
)


def filter_clause(
    table_id: int,
    *,
    ids: list[int] | None = None,
    id_min: int | None = None,
    id_max: int | None = None,
    tag: str | None = None,
    label_contains: str | None = None,
    min_access: int | None = None,
    max_access: int | None = None,
) -> Any:
    """WHERE clause: ids in a list, id range (inclusive), a tag, label substring, accesses."""
    clause = ENTRY.c.table_id == table_id
    if ids is not None:
        clause &= ENTRY.c.id.in_(ids)
    if id_min is not None:
        clause &= ENTRY.c.id >= id_min
    if id_max is not None:
        clause &= ENTRY.c.id <= id_max
    if tag is not None:
        clause &= ENTRY.c.tags.like("%" + encode_tags([tag]) + "%")
    if label_contains:
        escaped = label_contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        clause &= func.lower(ENTRY.c.label).like("%" + escaped.lower() + "%", escape="\\")
    if min_access is not None:
        clause &= ENTRY.c.access_count >= min_access
    if max_access is not None:
        clause &= ENTRY.c.access_count <= max_access
    return clause


def page_statement(
    table_id: int,
    *,
    offset: int = 0,
    limit: int = 50,
    order_by: str = "id",
    descending: bool = False,
    **filters: Any,
) -> Select[Any]:
    if not isinstance(offset, int) or offset < 0:
        raise InputError(f"page offset must be an integer >= 0, got {offset!r}")
    if not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InputError(f"page limit must be an integer between 1 and {MAX_PAGE}, got {limit!r}")
    if order_by not in ORDERABLE:
        raise InputError(f"cannot order by {order_by!r}: choose one of {', '.join(ORDERABLE)}")
    _check_filters(filters)
    column = ENTRY.c[order_by]
    order = [column.desc() if descending else column.asc()]
    if order_by != "id":
        order.append(ENTRY.c.id.asc())
    return (
        select(*[ENTRY.c[name] for name in ROW_COLUMNS])
        .where(filter_clause(table_id, **filters))
        .order_by(*order)
        .offset(offset)
        .limit(limit)
    )


def count_statement(table_id: int, **filters: Any) -> Select[Any]:
    _check_filters(filters)
    return select(func.count()).select_from(ENTRY).where(filter_clause(table_id, **filters))


def _check_filters(filters: dict[str, Any]) -> None:
    allowed = {"ids", "id_min", "id_max", "tag", "label_contains", "min_access", "max_access"}
    unknown = sorted(set(filters) - allowed)
    if unknown:
        raise InputError(f"unknown filter {unknown[0]!r}: use one of {', '.join(sorted(allowed))}")


def decode_row(row: Row[Any], key_dim: int, value_dim: int) -> MemoryRow:
    return MemoryRow(
        id=int(row.id),
        key=from_blobs([row.key], key_dim)[0],
        value=from_blobs([row.value], value_dim)[0],
        created=float(row.created),
        last_access=float(row.last_access),
        access_count=int(row.access_count),
        label=row.label,
        tags=decode_tags(row.tags),
        meta=decode_meta(row.meta),
        provenance=row.provenance,
    )


def fetch_rows(
    conn: Connection, table_id: int, key_dim: int, value_dim: int, **options: Any
) -> list[MemoryRow]:
    if "ids" in options:
        wanted = list(options["ids"])
        rows: list[Any] = []
        for start in range(0, len(wanted), 10_000):  # stay under SQL parameter limits
            rows.extend(
                conn.execute(
                    select(*[ENTRY.c[name] for name in ROW_COLUMNS]).where(
                        filter_clause(table_id, ids=wanted[start : start + 10_000])
                    )
                ).all()
            )
    else:
        rows = list(conn.execute(page_statement(table_id, **options)).all())
    return [decode_row(row, key_dim, value_dim) for row in rows]


def count_rows(conn: Connection, table_id: int, **filters: Any) -> int:
    return int(conn.execute(count_statement(table_id, **filters)).scalar_one())
