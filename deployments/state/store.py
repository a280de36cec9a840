"""The one owner of the database: engine, sessions and the schema's migration state.

Everything durable (the ledger now; responses, files and jobs later) goes through one
StateStore per process. `open` refuses to hand out a store the code cannot use: one it
cannot reach in time, or whose schema is not the revision this code was written for.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import StaticPool

from deployments.state.config import StateSpec, parse_url, redact
from deployments.state.errors import StateError

log = logging.getLogger(__name__)

MIGRATION_LOCK = 0x7469_6572_6564  # pg advisory lock key ("tiered"): one migrator at once
MIGRATION_LOCK_TIMEOUT_S = 60.0


def alembic_config(url: str | None = None) -> Config:
    """Alembic's config in code: the scripts ship inside this package, no alembic.ini."""
    cfg = Config()
    cfg.set_main_option("script_location", str(files("deployments.state") / "migrations"))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def short_reason(exc: BaseException, url: URL) -> str:
    """The first line of the driver's message, with any password scrubbed."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    reason = lines[0].strip() if lines else type(cause).__name__
    if url.password:
        reason = reason.replace(str(url.password), "***")
    return reason[:300]


def _sqlite_listeners(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    """A busy timeout (WAL, which the file keeps, is set by `StateStore._probe`), and
    transactions we begin ourselves (the driver's implicit BEGIN skips DDL, so migrations
    would not be atomic; this is SQLAlchemy's documented recipe). `sqlite_begin="IMMEDIATE"`
    in a connection's execution options takes the write lock up front (used to serialise
    migrators)."""

    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        cursor.execute("PRAGMA synchronous = NORMAL")  # durable with WAL, except on power loss
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Connection) -> None:
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def make_engine(spec: StateSpec) -> AsyncEngine:
    url = parse_url(spec.url)
    if url.get_backend_name() == "sqlite":
        memory = url.database in (None, "", ":memory:")
        if not memory:
            Path(str(url.database)).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(
            url,
            pool_pre_ping=True,
            connect_args={"timeout": spec.connect_timeout_s},
            **({"poolclass": StaticPool} if memory else {}),  # one connection, one database
        )
        _sqlite_listeners(engine, int(spec.connect_timeout_s * 1000))
        return engine
    return create_async_engine(
        url,
        pool_pre_ping=True,
        connect_args={"connect_timeout": max(1, round(spec.connect_timeout_s))},
    )


class StateStore:
    """An open, migrated database. Build it with `await StateStore.open(spec)`."""

    def __init__(self, engine: AsyncEngine, spec: StateSpec) -> None:
        self.engine = engine
        self.spec = spec
        self.url = redact(spec.url)
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        """"sqlite" or "postgresql"."""
        return self.engine.dialect.name

    @classmethod
    def connect(cls, spec: StateSpec) -> StateStore:
        """A store that connects on first use, unchecked: for a process that must start
        while the database is down (it retries `prepare`) or only reads."""
        return cls(make_engine(spec), spec)

    @classmethod
    async def open(cls, spec: StateSpec) -> StateStore:
        """A store checked reachable (within connect_timeout_s) and migrated."""
        store = cls.connect(spec)
        try:
            await store.prepare()
        except BaseException:
            await store.close()
            raise
        return store

    async def prepare(self) -> None:
        """Reach the database, then apply (or refuse) pending migrations; StateError."""
        await self._probe()
        await self._migrate()

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session:
            yield session

    # ---- start-up checks ---------------------------------------------------------------
    async def _probe(self) -> None:
        timeout = self.spec.connect_timeout_s

        async def select_one() -> None:
            async with self.engine.connect() as conn:
                if self.dialect == "sqlite":
                    await self._enter_wal(conn)
                await conn.execute(text("SELECT 1"))

        try:
            await asyncio.wait_for(select_one(), timeout)
        except (OSError, TimeoutError, DBAPIError, sqlite3.Error) as exc:
            reason = short_reason(exc, parse_url(self.spec.url))
            raise StateError(
                f"state.url: cannot connect to {self.url} within {timeout:g}s: {reason}"
            ) from None

    @staticmethod
    async def _enter_wal(conn: AsyncConnection) -> None:
        """WAL: readers never block the writer, and the file keeps the mode. SQLite refuses
        the switch at once ("database is locked", no busy handler) while another connection
        holds the write lock on a file still in rollback mode, as a sibling replica
        migrating a fresh file does: retry (the caller's deadline bounds it)."""
        raw = await conn.get_raw_connection()  # outside any transaction, which WAL needs
        driver = raw.driver_connection  # the aiosqlite connection
        assert driver is not None
        while True:
            try:
                await driver.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    raise
                await asyncio.sleep(0.05)

    async def _migrate(self) -> None:
        cfg = alembic_config()
        async with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                await conn.execution_options(sqlite_begin="IMMEDIATE")
            try:
                async with conn.begin():
                    if self.dialect == "postgresql":
                        ms = int(MIGRATION_LOCK_TIMEOUT_S * 1000)
                        await conn.execute(text(f"SET LOCAL lock_timeout = {ms}"))
                        await conn.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
                        )
                    await conn.run_sync(self._check_and_upgrade, cfg)
            except DBAPIError as exc:  # e.g. no right to create tables, lock timeout
                reason = short_reason(exc, parse_url(self.spec.url))
                raise StateError(f"state.url: cannot migrate {self.url}: {reason}") from None

    def _check_and_upgrade(self, conn: Connection, cfg: Config) -> None:
        """Runs inside the caller's transaction (and lock): check, then maybe upgrade."""
        script = ScriptDirectory.from_config(cfg)
        heads = set(script.get_heads())
        current = set(MigrationContext.configure(conn).get_current_heads())
        have = ",".join(sorted(current)) or "base (empty)"
        need = ",".join(sorted(heads))
        if current == heads:
            return
        for rev in current:
            try:
                known = script.get_revision(rev) is not None
            except CommandError:
                known = False
            if not known:
                raise StateError(
                    f"state.url: database schema is at revision {rev}, which this Tiered "
                    f"does not know (the database is newer than this code; head is {need}); "
                    "run a Tiered at least as new as the one that migrated it"
                )
        if not self.spec.migrate:
            raise StateError(
                f"state.url: database schema is at revision {have}, this Tiered needs "
                f"{need}; set state.migrate: true or run `alembic upgrade head`"
            )
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "heads")
        log.info("state store %s: applied migrations %s -> %s", self.url, have, need)
