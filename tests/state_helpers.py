"""Helpers shared by the state-store tests: a deadline runner, ledger records, counts."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import text

from deployments.state.store import StateStore
from deployments.tenancy.types import UsageRecord

T = TypeVar("T")
HEAD = "0005"
DAY1 = datetime(2025, 3, 10, tzinfo=UTC)


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def rec(rid: str, tenant: str = "a", model: str = "m1", tier: str = "shared",
        spill: bool = False, p: int = 1, c: int = 0, o: int = 1,
        ended: datetime = DAY1, status: str = "ok", adapter: str | None = None) -> UsageRecord:
    end = ended.timestamp()
    return UsageRecord(rid, tenant, model, tier, spill, p, c, o, end - 1.0, end,  # type: ignore[arg-type]
                       status, adapter)  # type: ignore[arg-type]


async def revision(store: StateStore) -> list[str]:
    async with store.engine.connect() as conn:
        return [r[0] for r in await conn.execute(text("SELECT version_num FROM alembic_version"))]


async def ledger_count(store: StateStore) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM ledger"))).scalar_one())


