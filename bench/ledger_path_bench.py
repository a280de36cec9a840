"""What the usage ledger adds to the request path, measured side by side in one run.

An ingress calls the admission actor twice per request: `admit(AdmissionRequest)` and
`finish(claim_id, UsageRecord)`; inside `finish` the actor hands the record to its
LedgerWriter (`add()`, O(1)), whose batched writes run on the actor's own event loop.
Three admission actors differ only in `AdmissionConfig.state`: none (no ledger, the
baseline), a temp SQLite file, and a temp PostgreSQL with fsync on
(tests/postgres_server.py; the column is skipped when PostgreSQL is not installed).
For each, with C = 1 and C = 32 callers in flight from the driver: p50/p90/p99 of the
admit round trip, the finish round trip and the pair (ms). The modes run in interleaved
rounds (each round a block of every mode, in rotated order), so drift on a shared box
spreads over all of them. At the end each ledger is flushed and its rows counted
through the store, to show the writes happened.

    python -m bench.ledger_path_bench [--out bench/results/ledger_path.json] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

from bench.admission_bench import COST, MODEL, _config, _usage, ms
from bench.report import emit
from deployments.state.config import STATE_URL_ENV, StateSpec
from deployments.state.ledger import Ledger
from deployments.state.store import StateStore
from deployments.state.types import UsageQuery
from deployments.tenancy.actor import get_admission
from deployments.tenancy.types import AdmissionConfig, AdmissionRequest

TENANT = "free"  # no limits; the pool has 1,000,000 seats, so nothing queues
CONCURRENCY = (1, 32)
WARM = 300  # pairs per actor before timing (connections, migrations, code paths)
PARTS = ("admit", "finish", "pair")


async def pairs(actor: Any, n: int, concurrency: int, prefix: str) -> dict[str, list[float]]:
    """n admit+finish pairs, `concurrency` in flight; round trips (s) of each part."""
    times: dict[str, list[float]] = {p: [] for p in PARTS}
    ids = iter(range(n))

    async def worker() -> None:
        for i in ids:
            claim = f"{prefix}-{i}"
            t0 = time.perf_counter()
            admission = await actor.admit.remote(
                AdmissionRequest(claim, TENANT, MODEL, COST, owner=prefix))
            t1 = time.perf_counter()
            assert admission.admitted, admission.refusal
            await actor.finish.remote(claim, _usage(claim, TENANT))
            t2 = time.perf_counter()
            times["admit"].append(t1 - t0)
            times["finish"].append(t2 - t1)
            times["pair"].append(t2 - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return times


async def ready(actor: Any, config: AdmissionConfig) -> None:
    """Up with its config, warmed, and (with a ledger) its writer started and warm rows
    committed."""
    assert await actor.ping.remote() == config.version
    await pairs(actor, WARM, 16, "warm")
    deadline = time.monotonic() + 60
    while config.state and not await actor.flush.remote(30):  # False until prepare() is done
        assert time.monotonic() < deadline, "the ledger never started"
        await asyncio.sleep(0.2)


async def count_rows(spec: StateSpec) -> int:
    store = await StateStore.open(spec)
    try:
        (total,) = await Ledger(store).aggregate(UsageQuery())
        return total.requests
    finally:
        await store.close()


async def measure(modes: dict[str, StateSpec | None], n: int, rounds: int) -> dict:
    configs = {m: dataclasses.replace(_config(), state=s) for m, s in modes.items()}
    actors = {m: get_admission(f"ledger-path-{m}", c) for m, c in configs.items()}
    await asyncio.gather(*(ready(a, configs[m]) for m, a in actors.items()))
    samples: dict[tuple[str, int], dict[str, list[float]]] = {
        (m, c): {p: [] for p in PARTS} for m in modes for c in CONCURRENCY}
    order = list(modes)
    block = n // rounds
    wall = dict.fromkeys(samples, 0.0)
    t0 = time.monotonic()
    for r in range(rounds):
        for c in CONCURRENCY:
            for m in order[r % len(order):] + order[: r % len(order)]:
                b0 = time.perf_counter()
                got = await pairs(actors[m], block, c, f"r{r}-c{c}")
                wall[m, c] += time.perf_counter() - b0
                for p in PARTS:
                    samples[m, c][p] += got[p]
    out: dict = {"timed_s": time.monotonic() - t0}
    for m, spec in modes.items():
        if spec is None:
            continue
        assert await actors[m].flush.remote(60), f"{m}: flush timed out"
        sent = WARM + block * rounds * len(CONCURRENCY)
        status = await actors[m].ledger_status.remote([f"r0-c1-{i}" for i in range(block)])
        out |= {f"{m}_rows_sent": sent, f"{m}_rows_in_ledger": await count_rows(spec),
                f"{m}_ledger_status_committed": len(status.committed)}
    for a in actors.values():
        ray.kill(a, no_restart=True)
    out["samples"] = samples
    out |= {f"{m}_c{c}_pairs_per_s": len(samples[m, c]["pair"]) / w for (m, c), w in wall.items()}
    return out


def table(samples: dict, modes: list[str]) -> Table:
    t = Table(title="Admission actor round trips by ledger backend (ms, local Ray)")
    for col in ("mode", "C", "n", *(f"{p} p{q}" for p in PARTS for q in (50, 90, 99))):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for c in CONCURRENCY:
        for m in modes:
            s = samples[m, c]
            t.add_row(m, str(c), str(len(s["pair"])),
                      *(f"{ms(s[p], q):.3f}" for p in PARTS for q in (50, 90, 99)))
    return t


def figures(samples: dict, modes: list[str]) -> dict:
    out: dict = {}
    for (m, c), s in samples.items():
        out[f"{m}_c{c}_samples"] = len(s["pair"])
        for p in PARTS:
            for q in (50, 90, 99):
                out[f"{m}_c{c}_{p}_p{q}_ms"] = ms(s[p], q)
    for m in modes:
        if m == "none":
            continue
        for c in CONCURRENCY:
            for p in PARTS:
                base, with_ledger = out[f"none_c{c}_{p}_p50_ms"], out[f"{m}_c{c}_{p}_p50_ms"]
                out[f"{m}_c{c}_{p}_p50_added_ms"] = with_ledger - base
                out[f"{m}_c{c}_{p}_p50_ratio"] = with_ledger / base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/ledger_path.json"))
    parser.add_argument("--quick", action="store_true", help="300 pairs per mode per C")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if os.environ.get(STATE_URL_ENV):
        raise SystemExit(f"unset {STATE_URL_ENV}: it would point every actor at one database")
    n = 300 if args.quick else 3000
    result: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "load_avg_1m_at_start": os.getloadavg()[0],
        "pairs_per_mode_per_c": n, "rounds": args.rounds,
    }
    with tempfile.TemporaryDirectory(prefix="ledger-path-") as tmp, \
            contextlib.ExitStack() as stack:
        modes: dict[str, StateSpec | None] = {
            "none": None, "sqlite": StateSpec(url=f"sqlite+aiosqlite:///{tmp}/ledger.db")}
        try:
            from tests.postgres_server import PostgresServer

            pg = stack.enter_context(PostgresServer(durable=True))
            modes["postgres"] = StateSpec(url=pg.url)
            result["postgres_version"] = pg.bin.parent.name
        except FileNotFoundError as exc:
            result["postgres_skipped"] = str(exc)
            print(f"skipping postgres: {exc}")
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            got = asyncio.run(measure(modes, n, args.rounds))
        finally:
            ray.shutdown()
    samples = got.pop("samples")
    Console(width=170).print(table(samples, list(modes)))
    result |= got | figures(samples, list(modes))
    result["load_avg_1m_at_end"] = os.getloadavg()[0]
    emit("Ledger on the request path (one run, local Ray)", result, args.out)


if __name__ == "__main__":
    main()
