"""The LoRA adapter registry: which adapter names exist, on which base, for which tenants.

The database is the truth every ingress replica reads, so a load or unload made through
one replica holds on all of them at once. A (re)load takes a new version under its name,
never one used before (rows are never deleted): the version is part of the prefix-cache
key and of the engine's CPU-cache key, so stale weights or KV are never reused. A load
first reserves its version, then a replica validates the adapter, then it is activated;
a failed or abandoned reservation is never visible. Writes take one lock (an advisory
lock on PostgreSQL, the write lock up front on SQLite), so concurrent loads of one name
cannot both win. Database failures surface as StateError.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal, cast

from sqlalchemy import Row, Select, Table, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from deployments.state.schema import AdapterRow
from deployments.state.store import StateStore
from deployments.state.stored import unavailable

ADAPTERS = cast(Table, AdapterRow.__table__)  # declared as a FromClause
REGISTRY_LOCK = 0x7469_6572_6564_02  # pg advisory lock key: one registry writer at once
Source = Literal["config", "api", "fine_tune"]  # fine_tune: a succeeded job's ft: model


@dataclass(frozen=True)
class NewAdapter:
    """An adapter to register: what a config entry or a load request names."""

    name: str
    base_model: str
    path: str
    tenants: tuple[str, ...] = ()  # empty: every tenant that may use the base


@dataclass(frozen=True)
class Adapter:
    """One registered version of an adapter."""

    name: str
    version: int
    base_model: str
    path: str
    tenants: tuple[str, ...]
    source: Source
    created_at: datetime
    loaded_at: datetime | None  # None: reserved, a replica is validating it
    unloaded_at: datetime | None

    def may_serve(self, tenant: str) -> bool:
        """The adapter's own scope (the caller also checks the tenant may use the base)."""
        return not self.tenants or tenant in self.tenants


class AdapterExistsError(Exception):
    """An active adapter already has this name: unload it first."""

    def __init__(self, name: str) -> None:
        super().__init__(f"an adapter named {name!r} is already loaded")
        self.name = name


class ConfiguredAdapterError(Exception):
    """The adapter comes from the config: only a config change unloads it (otherwise the
    next ingress replica to start, on a scale-up say, would register it again)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"the adapter {name!r} is defined in the config")
        self.name = name


def _adapter(row: Row[Any]) -> Adapter:
    m = row._mapping
    return Adapter(
        name=m["name"],
        version=m["version"],
        base_model=m["base_model"],
        path=m["path"],
        tenants=tuple(m["tenants"]),
        source=m["source"],
        created_at=m["created_at"],
        loaded_at=m["loaded_at"],
        unloaded_at=m["unloaded_at"],
    )


def _active(name: str | None = None) -> Select[Any]:
    c = ADAPTERS.c
    stmt = select(ADAPTERS).where(c.loaded_at.is_not(None), c.unloaded_at.is_(None))
    return stmt if name is None else stmt.where(c.name == name)


class AdapterRegistry:
    """The adapter rows over one StateStore."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    # ---- reads ---------------------------------------------------------------------------
    async def get(self, name: str) -> Adapter | None:
        """The active adapter with this name, if any."""
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(_active(name))).first()
        return None if row is None else _adapter(row)

    async def active(self) -> list[Adapter]:
        """Every active adapter, by name."""
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                rows = (await conn.execute(_active().order_by(ADAPTERS.c.name))).all()
        return [_adapter(r) for r in rows]

    # ---- writes --------------------------------------------------------------------------
    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """A transaction holding the registry's write lock."""
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                if self.store.dialect == "sqlite":
                    await conn.execution_options(sqlite_begin="IMMEDIATE")
                async with conn.begin():
                    if self.store.dialect == "postgresql":
                        await conn.execute(
                            text("SELECT pg_advisory_xact_lock(:key)"), {"key": REGISTRY_LOCK}
                        )
                    yield conn

    async def reserve(
        self, new: NewAdapter, source: Source, now: datetime | None = None
    ) -> Adapter:
        """A new version under `new.name`, not yet visible; AdapterExistsError if an
        adapter with that name is active."""
        async with self._writing() as conn:
            if (await conn.execute(_active(new.name))).first() is not None:
                raise AdapterExistsError(new.name)
            return await self._insert(conn, new, source, now or datetime.now(UTC), None)

    async def activate(self, reserved: Adapter, now: datetime | None = None) -> Adapter:
        """Make a reserved version the active one. AdapterExistsError if another load of
        the name won meanwhile (this version is then retired, never to be used)."""
        now = now or datetime.now(UTC)
        async with self._writing() as conn:
            lost = (await conn.execute(_active(reserved.name))).first() is not None
            if lost:
                await self._retire(conn, reserved, now)
            else:
                c = ADAPTERS.c
                await conn.execute(
                    update(ADAPTERS)
                    .where(c.name == reserved.name, c.version == reserved.version)
                    .values(loaded_at=now)
                )
        if lost:  # raised once the retirement is committed
            raise AdapterExistsError(reserved.name)
        return replace(reserved, loaded_at=now)

    async def discard(self, reserved: Adapter, now: datetime | None = None) -> None:
        """A reservation whose load failed: retired, its version never reused."""
        async with self._writing() as conn:
            await self._retire(conn, reserved, now or datetime.now(UTC))

    async def unload(self, name: str, now: datetime | None = None) -> Adapter | None:
        """Retire the active adapter with this name; None if there is none,
        ConfiguredAdapterError if the config registered it (`sync_config` owns those)."""
        now = now or datetime.now(UTC)
        async with self._writing() as conn:
            row = (await conn.execute(_active(name))).first()
            if row is None:
                return None
            adapter = _adapter(row)
            if adapter.source == "config":
                raise ConfiguredAdapterError(name)
            await self._retire(conn, adapter, now)
        return replace(adapter, unloaded_at=now)

    async def sync_config(
        self, configured: Sequence[NewAdapter], now: datetime | None = None
    ) -> None:
        """Make the config's adapters active, idempotently (every ingress replica runs
        this at start): a new name or a changed base or path takes a new version, changed
        tenants are updated in place (they are no part of any cache key), and adapters
        registered from an earlier config but no longer in it are unloaded. An adapter
        loaded through the API is left alone unless the config now names it (the config
        then owns it)."""
        now = now or datetime.now(UTC)
        names = {new.name for new in configured}
        async with self._writing() as conn:
            current = {a.name: a for a in map(_adapter, (await conn.execute(_active())).all())}
            for stale in current.values():
                if stale.source == "config" and stale.name not in names:
                    await self._retire(conn, stale, now)
            for new in configured:
                old = current.get(new.name)
                if old is None or (old.base_model, old.path) != (new.base_model, new.path):
                    if old is not None:
                        await self._retire(conn, old, now)
                    await self._insert(conn, new, "config", now, now)
                elif (old.tenants, old.source) != (new.tenants, "config"):
                    c = ADAPTERS.c
                    await conn.execute(
                        update(ADAPTERS)
                        .where(c.name == old.name, c.version == old.version)
                        .values(tenants=list(new.tenants), source="config")
                    )

    # ---- inside a write transaction ------------------------------------------------------
    @staticmethod
    async def _insert(
        conn: AsyncConnection,
        new: NewAdapter,
        source: Source,
        now: datetime,
        loaded_at: datetime | None,
    ) -> Adapter:
        c = ADAPTERS.c
        last = (
            await conn.execute(select(func.max(c.version)).where(c.name == new.name))
        ).scalar_one()
        adapter = Adapter(
            name=new.name,
            version=(last or 0) + 1,
            base_model=new.base_model,
            path=new.path,
            tenants=tuple(new.tenants),
            source=source,
            created_at=now,
            loaded_at=loaded_at,
            unloaded_at=None,
        )
        await conn.execute(
            insert(ADAPTERS),
            {
                "name": adapter.name,
                "version": adapter.version,
                "base_model": adapter.base_model,
                "path": adapter.path,
                "tenants": list(adapter.tenants),
                "source": source,
                "created_at": now,
                "loaded_at": loaded_at,
                "unloaded_at": None,
            },
        )
        return adapter

    @staticmethod
    async def _retire(conn: AsyncConnection, adapter: Adapter, now: datetime) -> None:
        c = ADAPTERS.c
        await conn.execute(
            update(ADAPTERS)
            .where(c.name == adapter.name, c.version == adapter.version)
            .values(unloaded_at=now)
        )
