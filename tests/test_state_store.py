"""The state store on both backends (every test runs as [sqlite] and [postgres]):
migrations at open, the ledger's idempotent writes and sums, URL checking without
leaking secrets (the batched writer: test_ledger_writer.py)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from pydantic import ValidationError
from sqlalchemy import inspect, text

from deployments.state.config import (
    StateSpec,
    default_state_url,
    redact,
    resolve_state_spec,
)
from deployments.state.errors import StateError
from deployments.state.ledger import Ledger
from deployments.state.schema import LedgerRow
from deployments.state.store import StateStore, alembic_config
from deployments.state.types import ReservationSeconds, UsageAggregate, UsageQuery
from deployments.tenancy.types import UsageRecord
from tests.postgres_server import PostgresServer
from tests.state_fixtures import postgres_server, state_spec  # noqa: F401
from tests.state_helpers import DAY1, HEAD, ledger_count, rec, revision, run


# ---- open and migrations ---------------------------------------------------------------
def test_open_migrates_empty_then_reopen_is_noop(
    state_spec: StateSpec, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    caplog.set_level(logging.INFO, logger="deployments.state")

    async def go() -> tuple[list[str], set[str], str, list[str]]:
        store = await StateStore.open(state_spec)
        try:
            rev = await revision(store)
            async with store.engine.connect() as conn:
                tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
            dialect = store.dialect
        finally:
            await store.close()
        first = [r.getMessage() for r in caplog.records if "applied migrations" in r.message]
        caplog.clear()
        again = await StateStore.open(state_spec)
        await again.close()
        assert not [r for r in caplog.records if "applied migrations" in r.message]
        return rev, tables, dialect, first

    rev, tables, dialect, applied = run(go())
    assert rev == [HEAD]
    assert {"ledger", "reservation_seconds", "alembic_version"} <= tables
    assert dialect == ("sqlite" if state_spec.url.startswith("sqlite") else "postgresql")
    assert len(applied) == 1 and f"base (empty) -> {HEAD}" in applied[0]


def test_concurrent_opens_migrate_once(state_spec: StateSpec) -> None:  # noqa: F811
    """Several replicas starting at once on an empty database: one migrates, all open."""

    async def go() -> list[str]:
        stores = await asyncio.gather(*(StateStore.open(state_spec) for _ in range(4)))
        rev = await revision(stores[0])
        for s in stores:
            await s.close()
        return rev

    assert run(go()) == [HEAD]


def test_open_waits_out_a_write_lock_on_a_fresh_sqlite_file(tmp_path: Path) -> None:
    """SQLite answers `PRAGMA journal_mode = WAL` with "database is locked" at once, busy
    timeout or not, while another connection holds the write lock on a file not yet in WAL
    (as a sibling replica migrating does): open must wait that out within its deadline."""
    db = tmp_path / "fresh.db"
    spec = StateSpec(url=f"sqlite+aiosqlite:///{db}", connect_timeout_s=5.0)
    held, release = threading.Event(), threading.Event()

    def hold_write_lock() -> None:
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        other.execute("CREATE TABLE squatter (x)")
        held.set()
        release.wait(10)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold_write_lock)
    holder.start()
    held.wait(10)
    threading.Timer(1.0, release.set).start()
    try:
        async def go() -> list[str]:
            store = await StateStore.open(spec)
            try:
                return await revision(store)
            finally:
                await store.close()

        assert run(go()) == [HEAD]
    finally:
        release.set()
        holder.join(10)


def test_migrate_false_on_empty_db_refuses(state_spec: StateSpec) -> None:  # noqa: F811
    spec = state_spec.model_copy(update={"migrate": False})
    with pytest.raises(StateError) as err:
        run(StateStore.open(spec))
    msg = str(err.value)
    assert "state.migrate: true" in msg and "base (empty)" in msg and HEAD in msg


def test_alembic_command_upgrades_then_migrate_false_opens(
    state_spec: StateSpec,  # noqa: F811
) -> None:
    """The operator's path for `migrate: false`: alembic's own upgrade (as the CLI runs
    it, no connection handed in), then the store opens without migrating."""
    command.upgrade(alembic_config(state_spec.url), "head")

    async def go() -> list[str]:
        store = await StateStore.open(state_spec.model_copy(update={"migrate": False}))
        try:
            return await revision(store)
        finally:
            await store.close()

    assert run(go()) == [HEAD]


def test_unknown_revision_refuses(state_spec: StateSpec) -> None:  # noqa: F811
    async def stamp_future() -> None:
        store = await StateStore.open(state_spec)
        async with store.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
        await store.close()

    run(stamp_future())
    with pytest.raises(StateError, match="revision f00d, which this Tiered does not know"):
        run(StateStore.open(state_spec))


# ---- URLs and errors -------------------------------------------------------------------
def test_bad_urls_never_echo_secrets() -> None:
    with pytest.raises(ValueError) as err:
        StateSpec(url="mysql://u:secret@h/db")
    assert "unsupported database driver 'mysql'" in str(err.value)
    assert "secret" not in str(err.value)
    assert isinstance(err.value, ValidationError)
    with pytest.raises(ValueError) as err:
        StateSpec(url="not a url")
    assert "not a database URL" in str(err.value) and "not a url" not in str(err.value)
    with pytest.raises(ValueError) as err:
        StateSpec(url="postgresql://u:secret@h:notaport/db")
    assert "secret" not in str(err.value)


def test_urls_normalised_to_async_drivers() -> None:
    assert StateSpec(url="sqlite:////tmp/x.db").url == "sqlite+aiosqlite:////tmp/x.db"
    assert StateSpec(url="postgres://u:p@h/db").url == "postgresql+psycopg://u:p@h/db"
    assert StateSpec(url="postgresql://u@h:5/db").url == "postgresql+psycopg://u@h:5/db"
    assert redact("postgresql+psycopg://u:hunter2@h/db") == "postgresql+psycopg://u:***@h/db"


def test_refused_connection_fails_fast_without_password() -> None:
    spec = StateSpec(url="postgresql+psycopg://u:hunter2@127.0.0.1:1/db", connect_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(StateError) as err:
        run(StateStore.open(spec), timeout_s=30)
    elapsed = time.monotonic() - t0
    msg = str(err.value)
    assert elapsed < spec.connect_timeout_s + 5
    assert "hunter2" not in msg
    assert msg.startswith("state.url: cannot connect to postgresql+psycopg://u:***@127.0.0.1:1/db"
                          " within 2s: ")
    assert "\n" not in msg


def test_missing_database_error_without_password(
    postgres_server: PostgresServer,  # noqa: F811
) -> None:
    url = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{postgres_server.port}/no_such_db"
    with pytest.raises(StateError) as err:
        run(StateStore.open(StateSpec(url=url, connect_timeout_s=5)))
    assert "hunter2" not in str(err.value)
    assert 'database "no_such_db" does not exist' in str(err.value)


def test_migration_log_is_redacted(
    postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    caplog.set_level(logging.INFO, logger="deployments.state")
    postgres_server.create_database("redacted_log")
    url = f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{postgres_server.port}/redacted_log"

    async def go() -> None:
        store = await StateStore.open(StateSpec(url=url))
        await store.close()

    try:
        run(go())
    finally:
        postgres_server.drop_database("redacted_log")
    assert "postgres:***@" in caplog.text and "hunter2" not in caplog.text


def test_env_overrides_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("TIERED_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("TIERED_STATE_URL", raising=False)
    assert default_state_url() == f"sqlite+aiosqlite:///{tmp_path}/tiered.db"
    assert StateSpec().url == f"sqlite+aiosqlite:///{tmp_path}/tiered.db"
    spec = StateSpec(url="sqlite:////tmp/a.db", migrate=False)
    assert resolve_state_spec(spec) is spec
    monkeypatch.setenv("TIERED_STATE_URL", "postgres://u:p@db.example/tiered")
    resolved = resolve_state_spec(spec)
    assert resolved.url == "postgresql+psycopg://u:p@db.example/tiered"
    assert resolved.migrate is False
    assert resolve_state_spec(None).url == "postgresql+psycopg://u:p@db.example/tiered"
    monkeypatch.setenv("TIERED_STATE_URL", "mysql://u:secret@h/db")
    with pytest.raises(ValueError, match=r"^TIERED_STATE_URL: unsupported database driver") as e:
        resolve_state_spec(spec)
    assert "secret" not in str(e.value)


# ---- the ledger ------------------------------------------------------------------------
def test_write_is_idempotent_and_committed(state_spec: StateSpec) -> None:  # noqa: F811
    first = [rec(f"r{i}") for i in range(100)]
    new = [rec(f"n{i}") for i in range(10)]

    async def go() -> tuple[int, int, int, int, set[str], set[str]]:
        store = await StateStore.open(state_spec)
        ledger = Ledger(store)
        try:
            a = await ledger.write(first)
            b = await ledger.write(first + new)
            dup = await ledger.write([rec("d1"), rec("d1", p=99)])  # repeated within a batch
            n = await ledger_count(store)
            some = await ledger.committed(["r0", "n9", "d1", "nope", "r0"])
            many = await ledger.committed([f"r{i}" for i in range(1200)])  # 3 IN chunks
        finally:
            await store.close()
        return a, b, dup, n, some, many

    a, b, dup, n, some, many = run(go())
    assert (a, b, dup, n) == (100, 10, 1, 111)
    assert some == {"r0", "n9", "d1"}
    assert many == {f"r{i}" for i in range(100)}


def test_rows_read_back_through_a_session(state_spec: StateSpec) -> None:  # noqa: F811
    """The ORM view of a written row: UTC-aware times, NULL adapter, server-set
    recorded_at."""
    ended = datetime(2025, 3, 10, 23, 59, 59, 250_000, tzinfo=UTC)

    async def go() -> LedgerRow | None:
        store = await StateStore.open(state_spec)
        try:
            await Ledger(store).write([rec("orm", "t", "m", "shared", True, 5, 2, 9, ended,
                                           "client_disconnect")])
            async with store.session() as session:
                return await session.get(LedgerRow, "orm")
        finally:
            await store.close()

    row = run(go())
    assert row is not None
    assert (row.tenant, row.model, row.tier, row.spill, row.status, row.adapter) == (
        "t", "m", "shared", True, "client_disconnect", None)
    assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (5, 2, 9)
    assert row.ended_at == ended and row.ended_at.tzinfo is not None
    assert row.ended_at.utcoffset() == timedelta(0)
    assert row.started_at == ended - timedelta(seconds=1)
    assert abs((row.recorded_at - datetime.now(UTC)).total_seconds()) < 60


def dataset() -> list[UsageRecord]:
    d2, d3 = DAY1 + timedelta(days=1), DAY1 + timedelta(days=2)
    h = timedelta(hours=1)
    return [
        rec("r1", "a", "m1", "dedicated", False, 10, 1, 100, DAY1 + 12 * h),
        rec("r2", "a", "m1", "shared", True, 20, 2, 200, DAY1 + 13 * h),
        rec("r3", "a", "m2", "shared", False, 30, 3, 300, d2 + 9 * h),
        rec("r4", "b", "m1", "shared", False, 40, 4, 400, DAY1 + 12.5 * h),
        rec("r5", "b", "m2", "shared", False, 50, 5, 500, d2 + 10 * h),
        rec("r6", "b", "m2", "dedicated", False, 60, 6, 600, d3, "error"),
    ]


def rows(aggs: list[UsageAggregate]) -> list[tuple[dict[str, str], int, int, int, int]]:
    return [({str(k): v for k, v in a.key.items()}, a.requests, a.prompt_tokens,
             a.cached_tokens, a.completion_tokens) for a in aggs]


def test_aggregate(state_spec: StateSpec) -> None:  # noqa: F811
    d2, d3 = DAY1 + timedelta(days=1), DAY1 + timedelta(days=2)
    queries = {
        "total": UsageQuery(),
        "tenant": UsageQuery(group_by=("tenant",)),
        "tier": UsageQuery(group_by=("tier",)),
        "model": UsageQuery(group_by=("model",)),
        "day": UsageQuery(group_by=("day",)),
        "spill": UsageQuery(group_by=("spill",)),
        "tenant_day": UsageQuery(group_by=("tenant", "day")),
        "tier_model_spill": UsageQuery(group_by=("tier", "model", "spill")),
        "day2_only": UsageQuery(start=d2, end=d3, group_by=("tenant",)),
        "from_day3": UsageQuery(start=d3),
        "tenant_a": UsageQuery(tenant="a", group_by=("model",)),
        "empty": UsageQuery(start=d3 + timedelta(days=5), group_by=("tenant",)),
    }

    async def go() -> dict[str, list[UsageAggregate]]:
        store = await StateStore.open(state_spec)
        ledger = Ledger(store)
        try:
            assert await ledger.write(dataset()) == 6
            return {name: await ledger.aggregate(q) for name, q in queries.items()}
        finally:
            await store.close()

    got = {name: rows(aggs) for name, aggs in run(go()).items()}
    assert got["total"] == [({}, 6, 210, 21, 2100)]
    assert got["tenant"] == [({"tenant": "a"}, 3, 60, 6, 600), ({"tenant": "b"}, 3, 150, 15, 1500)]
    assert got["tier"] == [({"tier": "dedicated"}, 2, 70, 7, 700),
                           ({"tier": "shared"}, 4, 140, 14, 1400)]
    assert got["model"] == [({"model": "m1"}, 3, 70, 7, 700), ({"model": "m2"}, 3, 140, 14, 1400)]
    assert got["day"] == [({"day": "2025-03-10"}, 3, 70, 7, 700),
                          ({"day": "2025-03-11"}, 2, 80, 8, 800),
                          ({"day": "2025-03-12"}, 1, 60, 6, 600)]
    assert got["spill"] == [({"spill": "false"}, 5, 190, 19, 1900),
                            ({"spill": "true"}, 1, 20, 2, 200)]
    assert got["tenant_day"] == [
        ({"tenant": "a", "day": "2025-03-10"}, 2, 30, 3, 300),
        ({"tenant": "a", "day": "2025-03-11"}, 1, 30, 3, 300),
        ({"tenant": "b", "day": "2025-03-10"}, 1, 40, 4, 400),
        ({"tenant": "b", "day": "2025-03-11"}, 1, 50, 5, 500),
        ({"tenant": "b", "day": "2025-03-12"}, 1, 60, 6, 600),
    ]
    assert got["tier_model_spill"] == [
        ({"tier": "dedicated", "model": "m1", "spill": "false"}, 1, 10, 1, 100),
        ({"tier": "dedicated", "model": "m2", "spill": "false"}, 1, 60, 6, 600),
        ({"tier": "shared", "model": "m1", "spill": "false"}, 1, 40, 4, 400),
        ({"tier": "shared", "model": "m1", "spill": "true"}, 1, 20, 2, 200),
        ({"tier": "shared", "model": "m2", "spill": "false"}, 2, 80, 8, 800),
    ]
    # [start, end): r6 ended exactly at the end bound, so it is out, and in from it on.
    assert got["day2_only"] == [({"tenant": "a"}, 1, 30, 3, 300), ({"tenant": "b"}, 1, 50, 5, 500)]
    assert got["from_day3"] == [({}, 1, 60, 6, 600)]
    assert got["tenant_a"] == [({"model": "m1"}, 2, 30, 3, 300), ({"model": "m2"}, 1, 30, 3, 300)]
    assert got["empty"] == []


def test_day_grouping_across_utc_midnight(state_spec: StateSpec) -> None:  # noqa: F811
    """On PostgreSQL the session runs in Asia/Tokyo (UTC+9), where both records fall on
    the same local day: the day key must still be the UTC day."""
    spec = state_spec
    if spec.url.startswith("postgresql"):
        spec = StateSpec(url=spec.url + "?options=-c%20timezone%3DAsia/Tokyo")
    midnight = DAY1 + timedelta(days=1)
    records = [rec("before", ended=midnight - timedelta(seconds=0.5), p=7),
               rec("at", ended=midnight, p=11),
               rec("after", ended=midnight + timedelta(seconds=0.5), p=13)]

    async def go() -> list[UsageAggregate]:
        store = await StateStore.open(spec)
        try:
            await Ledger(store).write(records)
            return await Ledger(store).aggregate(UsageQuery(group_by=("day",)))
        finally:
            await store.close()

    assert rows(run(go())) == [({"day": "2025-03-10"}, 1, 7, 0, 1),
                               ({"day": "2025-03-11"}, 2, 24, 0, 2)]


def test_reservation_seconds_upsert_adds(state_spec: StateSpec) -> None:  # noqa: F811
    h0 = DAY1 + timedelta(hours=10)
    h1, h2 = h0 + timedelta(hours=1), h0 + timedelta(hours=2)

    async def go() -> list[dict[str, float]]:
        store = await StateStore.open(state_spec)
        ledger = Ledger(store)
        try:
            await ledger.add_reservation_seconds([
                ReservationSeconds("a", "m1", "r1", h0, 100.0),
                ReservationSeconds("a", "m1", "r1", h0, 50.0),  # same key in one batch
                ReservationSeconds("a", "m1", "r2", h1, 3600.0),
                ReservationSeconds("b", "m2", "r9", h2, 10.5),
            ])
            await ledger.add_reservation_seconds([ReservationSeconds("a", "m1", "r1", h0, 25.0)])
            qs = [UsageQuery(), UsageQuery(start=h1), UsageQuery(end=h1),
                  UsageQuery(tenant="b"), UsageQuery(start=h0 + timedelta(minutes=30))]
            return [await ledger.reservation_seconds(q) for q in qs]
        finally:
            await store.close()

    assert run(go()) == [{"a": 3775.0, "b": 10.5}, {"a": 3600.0, "b": 10.5}, {"a": 175.0},
                         {"b": 10.5}, {"a": 3600.0, "b": 10.5}]


def test_types_reject_naive_and_unaligned() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        UsageQuery(start=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match="unknown group keys"):
        UsageQuery(group_by=("week",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="start of an hour"):
        ReservationSeconds("a", "m", "r", DAY1 + timedelta(minutes=1), 1.0)
