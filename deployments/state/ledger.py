"""The billing ledger: one row per finished request, written idempotently, read as sums.

A write is one INSERT ... ON CONFLICT (request_id) DO NOTHING executed for many rows in
one transaction, so a batch retried after an ambiguous failure (the commit landed, the
reply did not) never bills a request twice. It is an executemany, not a multi-row VALUES
with RETURNING: psycopg sends an executemany as one pipelined round trip of one prepared
statement, while a 500-row VALUES list (6000 placeholders) is re-parsed on the client on
every call (psycopg caches only short queries), ~4x slower. The driver's summed rowcount
(`preserve_rowcount`) says how many rows were new, on both dialects.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import ColumnElement, Date, cast, func, literal_column, select
from sqlalchemy.dialects import postgresql, sqlite

from deployments.state.schema import LedgerRow, ReservationSecondsRow
from deployments.state.store import StateStore
from deployments.state.types import GroupKey, ReservationSeconds, UsageAggregate, UsageQuery
from deployments.tenancy.types import UsageRecord

IN_CHUNK = 500  # ids per IN (...) list
LEDGER = LedgerRow.__table__
RESERVATIONS = ReservationSecondsRow.__table__


def utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, UTC)


def ledger_row(record: UsageRecord) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "tenant": record.tenant,
        "model": record.model,
        "adapter": record.adapter,
        "tier": record.tier,
        "spill": record.spill,
        "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens,
        "completion_tokens": record.completion_tokens,
        "started_at": utc(record.started_at),
        "ended_at": utc(record.ended_at),
        "status": record.status,
    }


def _key_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


class Ledger:
    """The ledger's reads and writes over one StateStore."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._insert: Callable[..., Any] = (
            postgresql.insert if store.dialect == "postgresql" else sqlite.insert
        )

    # ---- writes --------------------------------------------------------------------------
    async def write(self, records: Sequence[UsageRecord]) -> int:
        """Insert the records not yet in the ledger; returns how many were new."""
        rows: dict[str, dict[str, Any]] = {}
        for record in records:  # a repeated id in one batch: the first one counts
            rows.setdefault(record.request_id, ledger_row(record))
        if not rows:
            return 0
        stmt = self._insert(LEDGER).on_conflict_do_nothing(index_elements=["request_id"])
        async with self.store.engine.begin() as conn:
            result = await conn.execute(
                stmt, list(rows.values()), execution_options={"preserve_rowcount": True}
            )
            return int(result.rowcount)

    async def add_reservation_seconds(self, rows: Sequence[ReservationSeconds]) -> None:
        """Add seconds to each (tenant, replica, hour). Rows with the same key are summed
        first: one statement may not update a row twice (PostgreSQL refuses)."""
        merged: dict[tuple[str, str, datetime], dict[str, Any]] = {}
        for r in rows:
            key = (r.tenant, r.replica_id, r.hour)
            if key in merged:
                merged[key]["seconds"] += r.seconds
            else:
                merged[key] = {"tenant": r.tenant, "replica_id": r.replica_id,
                               "hour": r.hour, "model": r.model, "seconds": r.seconds}
        if not merged:
            return
        stmt = self._insert(RESERVATIONS)
        stmt = stmt.on_conflict_do_update(
            index_elements=["tenant", "replica_id", "hour"],
            set_={"seconds": RESERVATIONS.c.seconds + stmt.excluded.seconds,
                  "model": stmt.excluded.model},
        )
        async with self.store.engine.begin() as conn:
            await conn.execute(stmt, list(merged.values()))

    # ---- reads ---------------------------------------------------------------------------
    async def committed(self, request_ids: Sequence[str]) -> set[str]:
        """Which of these request ids the ledger holds."""
        ids = list(dict.fromkeys(request_ids))
        found: set[str] = set()
        async with self.store.engine.connect() as conn:
            for i in range(0, len(ids), IN_CHUNK):
                chunk = ids[i : i + IN_CHUNK]
                result = await conn.execute(
                    select(LEDGER.c.request_id).where(LEDGER.c.request_id.in_(chunk))
                )
                found.update(result.scalars())
        return found

    def _day(self) -> ColumnElement[Any]:
        """ended_at's UTC calendar day. No bound parameters: PostgreSQL must see the
        SELECT and GROUP BY expressions as the same one."""
        if self.store.dialect == "postgresql":
            return cast(func.timezone(literal_column("'UTC'"), LEDGER.c.ended_at), Date)
        return func.date(LEDGER.c.ended_at)  # stored as UTC "YYYY-MM-DD HH:MM:SS.ffffff"

    async def aggregate(self, query: UsageQuery) -> list[UsageAggregate]:
        """Sums per group, ordered by the group keys. No keys: one total row."""
        columns: dict[GroupKey, ColumnElement[Any]] = {
            "tenant": LEDGER.c.tenant, "tier": LEDGER.c.tier, "model": LEDGER.c.model,
            "spill": LEDGER.c.spill, "day": self._day(),
            # "" for the base model; a literal, not a bound parameter (see _day)
            "adapter": func.coalesce(LEDGER.c.adapter, literal_column("''")),
        }
        keys = [columns[k] for k in query.group_by]
        stmt = select(
            *(c.label(f"k_{name}") for name, c in zip(query.group_by, keys, strict=True)),
            func.count().label("requests"),
            func.coalesce(func.sum(LEDGER.c.prompt_tokens), 0),
            func.coalesce(func.sum(LEDGER.c.cached_tokens), 0),
            func.coalesce(func.sum(LEDGER.c.completion_tokens), 0),
        )
        if query.start is not None:
            stmt = stmt.where(LEDGER.c.ended_at >= query.start)
        if query.end is not None:
            stmt = stmt.where(LEDGER.c.ended_at < query.end)
        if query.tenant is not None:
            stmt = stmt.where(LEDGER.c.tenant == query.tenant)
        if keys:
            stmt = stmt.group_by(*keys).order_by(*keys)
        async with self.store.engine.connect() as conn:
            rows = (await conn.execute(stmt)).all()
        n = len(keys)
        return [
            UsageAggregate(
                key={k: _key_text(v) for k, v in zip(query.group_by, row[:n], strict=True)},
                requests=int(row[n]),
                prompt_tokens=int(row[n + 1]),
                cached_tokens=int(row[n + 2]),
                completion_tokens=int(row[n + 3]),
            )
            for row in rows
        ]

    async def reservation_seconds(self, query: UsageQuery) -> dict[str, float]:
        """Reserved replica-seconds per tenant over the hours that start in [start, end)."""
        c = RESERVATIONS.c
        stmt = select(c.tenant, func.sum(c.seconds)).group_by(c.tenant).order_by(c.tenant)
        if query.start is not None:
            stmt = stmt.where(c.hour >= query.start)
        if query.end is not None:
            stmt = stmt.where(c.hour < query.end)
        if query.tenant is not None:
            stmt = stmt.where(c.tenant == query.tenant)
        async with self.store.engine.connect() as conn:
            return {tenant: float(s) for tenant, s in (await conn.execute(stmt)).all()}
