"""State store fixtures: a session PostgreSQL server, and `state_spec`, a fresh empty
database per test on each backend (test ids end in [sqlite] and [postgres]).

PostgreSQL missing: the postgres cases skip, or fail when TIERED_REQUIRE_POSTGRES=1 (CI).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.state.config import StateSpec
from tests.postgres_server import PostgresServer, find_postgres_bin


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    if find_postgres_bin() is None:
        reason = "PostgreSQL is not installed (no initdb on PATH or /usr/lib/postgresql/*/bin)"
        if os.environ.get("TIERED_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"TIERED_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def state_spec(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateSpec]:
    if request.param == "sqlite":
        yield StateSpec(url=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}", connect_timeout_s=5)
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    name = f"test_{uuid.uuid4().hex}"
    url = server.create_database(name)
    yield StateSpec(url=url, connect_timeout_s=5)
    if server.running:
        server.drop_database(name)
