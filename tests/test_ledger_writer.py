"""The batched ledger writer on both backends: batches, what it remembers, a database
outage (every record lands exactly once), and what `stop` reports."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from typing import Any

import pytest
from sqlalchemy import event

from deployments.state.config import StateSpec
from deployments.state.ledger import Ledger
from deployments.state.store import StateStore
from deployments.state.writer import LedgerWriter
from tests.postgres_server import PostgresServer
from tests.state_fixtures import postgres_server, state_spec  # noqa: F401
from tests.state_helpers import ledger_count, rec, run


# ---- the writer ------------------------------------------------------------------------
def test_writer_batches_and_remembers(state_spec: StateSpec) -> None:  # noqa: F811
    now = [1000.0]

    async def go() -> tuple[int, int, int, set[str], set[str], set[str], int]:
        store = await StateStore.open(state_spec)
        inserts = [0]

        @event.listens_for(store.engine.sync_engine, "before_cursor_execute")
        def count(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
            inserts[0] += statement.lstrip().upper().startswith("INSERT INTO LEDGER")

        ledger = Ledger(store)
        await ledger.write([rec("old-1")])  # committed by an earlier process
        writer = LedgerWriter(ledger, clock=lambda: now[0], remember_s=600)
        writer.start()
        try:
            for i in range(2000):
                writer.add(rec(f"w{i}"))
            await writer.flush(timeout_s=30)
            n = await ledger_count(store)
            assert writer.pending == 0
            ids = await writer.committed_ids(["w0", "w1999", "old-1", "never"])
            now[0] += 601  # forgotten locally: the database still answers
            later = await writer.committed_ids(["w0", "never"])
            forgotten = set(writer._committed)
            left = await writer.stop(timeout_s=10)
        finally:
            await store.close()
        return inserts[0] - 1, writer.batches, n, ids, later, forgotten, left

    statements, batches, n, ids, later, forgotten, left = run(go())
    assert n == 2001 and left == 0
    assert batches == 4 and statements == 4  # 2000 / batch_size 500
    assert ids == {"w0", "w1999", "old-1"}
    assert later == {"w0"} and forgotten == set()


def test_writer_survives_outage(
    state_spec: StateSpec, request: pytest.FixtureRequest,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL: the server is stopped while records arrive, then started again.
    SQLite: another process holds the write lock (BEGIN EXCLUSIVE), so writes fail with
    "database is locked" after the busy timeout, until it lets go. Either way every
    record must land exactly once, with one warning for the outage."""
    caplog.set_level(logging.WARNING, logger="deployments.state")
    postgres = state_spec.url.startswith("postgresql")
    spec = state_spec.model_copy(update={"connect_timeout_s": 0.2 if not postgres else 2})
    server: PostgresServer | None = request.getfixturevalue("postgres_server") if postgres else None
    blocker: sqlite3.Connection | None = None

    def outage_begins() -> None:
        nonlocal blocker
        if server is not None:
            server.stop("immediate")
        else:
            path = spec.url.removeprefix("sqlite+aiosqlite:///")
            blocker = sqlite3.connect(path, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")

    def outage_ends() -> None:
        if server is not None:
            server.start()
        elif blocker is not None:
            blocker.execute("ROLLBACK")
            blocker.close()

    async def go() -> tuple[int, int, int]:
        store = await StateStore.open(spec)
        writer = LedgerWriter(Ledger(store))
        writer.start()
        try:
            for i in range(100):
                writer.add(rec(f"pre{i}"))
            await writer.flush(timeout_s=30)
            await asyncio.to_thread(outage_begins)
            try:
                for i in range(300):
                    writer.add(rec(f"out{i}"))
                    if i % 100 == 0:
                        await asyncio.sleep(0.3)
                with pytest.raises(TimeoutError):
                    await writer.flush(timeout_s=1.5)
                stuck = writer.pending
            finally:
                await asyncio.to_thread(outage_ends)
            await writer.flush(timeout_s=30)
            assert await writer.stop(timeout_s=10) == 0
            return stuck, await ledger_count(store), writer.pending
        finally:
            await store.close()

    stuck, n, pending = run(go(), timeout_s=120)
    assert stuck == 300 and n == 400 and pending == 0
    failing = [r for r in caplog.records if "failing" in r.getMessage()]
    assert len(failing) == 1
    assert [r for r in caplog.records if "recovered" in r.getMessage()]
    assert "out1" not in caplog.text  # no record contents in the logs


def test_stop_reports_unwritten(tmp_path: Any) -> None:
    """A database that stays down past stop's deadline: stop returns what is left."""
    spec = StateSpec(url=f"sqlite+aiosqlite:///{tmp_path / 's.db'}", connect_timeout_s=0.2)

    async def go() -> tuple[int, float]:
        store = await StateStore.open(spec)
        blocker = sqlite3.connect(str(tmp_path / "s.db"), isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            writer = LedgerWriter(Ledger(store))
            writer.start()
            writer.add(rec("x"))
            t0 = time.monotonic()
            left = await writer.stop(timeout_s=1.0)
            return left, time.monotonic() - t0
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
            await store.close()

    left, took = run(go())
    assert left == 1 and took < 3.0
