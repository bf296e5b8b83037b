"""The service's databases for its tests: SQLite in a file, and a real PostgreSQL 15
server (tests/postgres.py: started once per session, skipped where it cannot start).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa
from postgres import fresh_database

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Which database a test runs on: each test that asks runs on both."""
    return request.param


@pytest.fixture
def new_db_url(request, backend, tmp_path) -> Iterator[Callable[[], str]]:
    """Make the URL of another empty database: a SQLite file, or a fresh PostgreSQL
    database (dropped after the test)."""
    server = request.getfixturevalue("postgres_server") if backend == "postgresql" else None
    with contextlib.ExitStack() as fresh:

        def new() -> str:
            if server is None:
                return str(tmp_path / f"db-{uuid.uuid4().hex[:8]}" / "service.db")
            return fresh.enter_context(fresh_database(server))

        yield new


@pytest.fixture
def db_url(new_db_url) -> str:
    return new_db_url()


@pytest.fixture
def make_db(new_db_url) -> Iterator[Callable[[], sa.Engine]]:
    """Make an engine on another empty database with the service's tables."""
    from raygpt.service import db as service_db

    engines: list[sa.Engine] = []

    def make() -> sa.Engine:
        engines.append(service_db.connect(new_db_url()))
        return engines[-1]

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def db(make_db) -> sa.Engine:
    """An engine on an empty database with the service's tables."""
    return make_db()
