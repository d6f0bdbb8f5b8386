"""Fixtures for the memory store tests: a store URL for SQLite and, when available, PostgreSQL.

PostgreSQL tests use MINDSET_TEST_POSTGRES_URL (started by .ci/postgres.sh), each test in a
fresh schema. Without the URL they skip, unless MINDSET_REQUIRE_POSTGRES=1 makes that a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest

POSTGRES_URL_ENV = "MINDSET_TEST_POSTGRES_URL"


def postgres_base_url() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        if os.environ.get("MINDSET_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"MINDSET_REQUIRE_POSTGRES=1 but {POSTGRES_URL_ENV} is not set")
        pytest.skip(f"{POSTGRES_URL_ENV} not set (source .ci/postgres.sh to run these)")
    return url


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    import psycopg

    base = postgres_base_url()
    schema = "t_" + uuid.uuid4().hex[:12]
    try:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as exc:
        if os.environ.get("MINDSET_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL at {base} is not reachable: {exc}")
        pytest.skip(f"PostgreSQL at {base} is not reachable")
    separator = "&" if "?" in base else "?"
    yield f"{base}{separator}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on a SQLite file and on PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "memory.db")
    return str(request.getfixturevalue("postgres_url"))


def random_rows(
    count: int, key_dim: int, value_dim: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(count, key_dim)).astype(np.float32),
        rng.normal(size=(count, value_dim)).astype(np.float32),
    )


def brute_force_l2(keys: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact squared-L2 top-k positions and distances, computed in float64."""
    d2 = ((queries[:, None, :].astype(np.float64) - keys[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d2, order, axis=1)
