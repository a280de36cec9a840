"""Ledger figures on this box, per backend (a temp SQLite file; a temp PostgreSQL with
fsync on, started by tests/postgres_server.py):

1. LedgerWriter: rows committed per second when records arrive as fast as one loop can
   add them (batches of up to 500 per statement), and the cost of `add()` itself, which
   is what a request pays (p50/p99/max in µs, timer included): it must be ~0.
2. Single-row writes: `Ledger.write([one])` back to back, one transaction each, the
   rate a naive per-request INSERT would get, for comparison.
3. Reads over what part 1 wrote: the (tenant, day) aggregate, and committed() of 500 ids.

SQLite runs as the store configures it: WAL, synchronous=NORMAL.

    python -m bench.ledger_bench [--out bench/results/ledger.json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import tempfile
import time
from pathlib import Path

from bench.metrics import percentile
from bench.report import emit
from deployments.state.config import StateSpec
from deployments.state.ledger import Ledger
from deployments.state.store import StateStore
from deployments.state.types import UsageQuery
from deployments.state.writer import LedgerWriter
from deployments.tenancy.types import UsageRecord
from tests.postgres_server import PostgresServer

TENANTS = [f"tenant-{i}" for i in range(16)]
DAY_S = 86_400.0
T0 = 1_741_564_800.0  # 2025-03-10 00:00 UTC
ADD_CHUNK = 1000  # adds between yields to the loop, as a busy ingress would


def record(prefix: str, i: int, days: int) -> UsageRecord:
    ended = T0 + (i % days) * DAY_S + (i % 3600)
    return UsageRecord(f"{prefix}-{i}", TENANTS[i % len(TENANTS)], f"m{i % 2}",
                       "dedicated" if i % 5 == 0 else "shared", i % 7 == 0,
                       100 + i % 50, i % 30, 20 + i % 10, ended - 1.5, ended)


async def writer_part(ledger: Ledger, n: int, backend: str) -> dict:
    writer = LedgerWriter(ledger)
    writer.start()
    costs: list[float] = []
    clock = time.perf_counter_ns
    t0 = time.perf_counter()
    for start in range(0, n, ADD_CHUNK):
        for i in range(start, min(n, start + ADD_CHUNK)):
            r = record("w", i, days=30)
            a = clock()
            writer.add(r)
            costs.append((clock() - a) / 1000)
        await asyncio.sleep(0)
    await writer.flush(timeout_s=300)
    took = time.perf_counter() - t0
    left = await writer.stop(timeout_s=30)
    return {
        f"{backend}_writer_rows": n,
        f"{backend}_writer_rows_per_s": n / took,
        f"{backend}_writer_batches": writer.batches,
        f"{backend}_writer_rows_per_batch": n / max(1, writer.batches),
        f"{backend}_writer_unwritten": left,
        f"{backend}_add_p50_us": percentile(costs, 50),
        f"{backend}_add_p99_us": percentile(costs, 99),
        f"{backend}_add_max_us": max(costs),
    }


async def single_part(ledger: Ledger, m: int, backend: str) -> dict:
    lat: list[float] = []
    t0 = time.perf_counter()
    for i in range(m):
        a = time.perf_counter()
        await ledger.write([record("s", i, days=30)])
        lat.append(time.perf_counter() - a)
    took = time.perf_counter() - t0
    return {
        f"{backend}_single_row_writes_per_s": m / took,
        f"{backend}_single_row_p50_ms": percentile(lat, 50) * 1000,
        f"{backend}_single_row_p99_ms": percentile(lat, 99) * 1000,
    }


async def read_part(ledger: Ledger, n: int, backend: str) -> dict:
    t0 = time.perf_counter()
    groups = await ledger.aggregate(UsageQuery(group_by=("tenant", "day")))
    agg_ms = (time.perf_counter() - t0) * 1000
    ids = [f"w-{i}" for i in range(0, n, max(1, n // 500))][:500]
    t0 = time.perf_counter()
    found = await ledger.committed(ids)
    committed_ms = (time.perf_counter() - t0) * 1000
    assert sum(g.requests for g in groups) >= n and len(found) == len(ids)
    return {f"{backend}_aggregate_tenant_day_ms": agg_ms,
            f"{backend}_aggregate_groups": len(groups),
            f"{backend}_committed_500_ids_ms": committed_ms}


async def one_backend(url: str, backend: str, n: int, m: int) -> dict:
    store = await StateStore.open(StateSpec(url=url))
    ledger = Ledger(store)
    try:
        out = await writer_part(ledger, n, backend)
        out |= await single_part(ledger, m, backend)
        out |= await read_part(ledger, n, backend)
    finally:
        await store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/ledger.json"))
    parser.add_argument("--quick", action="store_true", help="a tenth of the rows")
    args = parser.parse_args()
    n, m = (10_000, 300) if args.quick else (100_000, 3000)
    result: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "load_avg_1m_at_start": os.getloadavg()[0],
        "sqlite_version": sqlite3.sqlite_version,
    }
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/ledger.db"
        result |= asyncio.run(one_backend(url, "sqlite", n, m))
    with PostgresServer(durable=True) as pg:
        result["postgres_version"] = pg.bin.parent.name
        result |= asyncio.run(one_backend(pg.url, "postgres", n, m))
    result["load_avg_1m_at_end"] = os.getloadavg()[0]
    emit("Ledger writes (one run, this box)", result, args.out)


if __name__ == "__main__":
    main()
