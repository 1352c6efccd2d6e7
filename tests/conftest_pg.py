"""A fresh PostgreSQL database per test, on the server at ``EDGE_TEST_POSTGRES`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, the server dev.sh sets up).

Each test gets ``CREATE DATABASE test_<random>`` and it is dropped after the test, whatever the
test did. Where no server answers, the PostgreSQL cases are skipped with the reason, except when
``EDGE_REQUIRE_POSTGRES=1`` (set by .ci/run): then they fail, so CI cannot pass without running them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

ADMIN_URL = os.environ.get("EDGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


def _url(name: str) -> str:
    """ADMIN_URL with its database replaced by ``name``."""
    base, _, _db = ADMIN_URL.partition("?")[0].rpartition("/")
    return f"{base}/{name}"


@contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database; dropped on exit (connections still open are ended)."""
    try:
        import psycopg
    except ImportError:
        _unavailable("psycopg is not installed (pip install -e '.[dev]')")
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        _unavailable(f"no PostgreSQL server at {ADMIN_URL}: {str(exc).strip()[:200]}")
    name = f"test_{uuid.uuid4().hex[:16]}"
    with admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield _url(name)
        finally:
            # FORCE (PostgreSQL 13+): a test that left a connection open must not leave a database
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _unavailable(reason: str) -> None:
    if os.environ.get("EDGE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"EDGE_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)
