"""One fault under load, start to end: warm the load, inject, wait for health, let the
load run on, stop it, then read the cluster at idle and the ledger."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from bench.chaos.faults import Fault
from bench.chaos.load import ChaosLoad, ChaosRecord, TenantLoad
from bench.chaos.observe import (
    ChaosTarget,
    billed_tokens,
    engine_load,
    healthy,
    model_deployments,
    replica_loads,
    wait_healthy,
    wait_idle,
)
from bench.chaos.report import FaultReport, outcome, received_tokens, summarise
from bench.chaos.rss import growth, worker_rss


@dataclass(frozen=True)
class LoadShape:
    """How hard and how long one fault's load runs."""

    tenants: list[TenantLoad]  # steady clients; their tokens are compared with the ledger
    leaver: TenantLoad | None = None  # its own tenant: clients that walk away
    disconnects: int = 0  # `disconnects` fault: this many dropped requests at once
    warm_requests: int = 4  # completed before the fault is injected
    after_s: float = 3.0  # the load runs on this long once the app is healthy again
    healthy_timeout_s: float = 120.0
    idle_timeout_s: float = 60.0  # seats and KV must be back within this of the fault
    deadline_s: float = 60.0  # per request: past it, a request is hung
    rss_from_s: float = 0.0  # soak: RSS of Ray workers from this long after the start
    extra_checks: list[Callable[[FaultReport], None]] = field(default_factory=list)


def _replica_ids(app: str) -> set[str]:
    return {s["replica_id"] for s in replica_loads(app)}


async def _until(done: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout_s:.0f}s")
        await asyncio.sleep(0.1)


async def _disconnect_burst(load: ChaosLoad, leaver: TenantLoad, count: int,
                            target: ChaosTarget) -> dict[str, float | int]:
    """`count` requests at once, half dropped after their first token, half while queued
    behind them; then how long until no replica runs, queues or holds KV for anything."""
    hows = ["mid_stream" if i % 2 else "mid_queue" for i in range(count)]
    ended = await asyncio.gather(*(load.one(leaver, how) for how in hows))
    last = max(r.record.end for r in ended)
    while True:
        kv, seqs = await asyncio.to_thread(engine_load, target.app)
        if kv == seqs == 0 or time.perf_counter() - last > 30:
            break
        await asyncio.sleep(0.02)
    return {
        "engine_idle_after_s": round(time.perf_counter() - last, 3) if kv == seqs == 0 else None,
        "dropped_mid_stream": sum(r.disconnected == "mid_stream" for r in ended),
        "dropped_mid_queue": sum(r.disconnected == "mid_queue" for r in ended),
    }


async def run_fault(target: ChaosTarget, fault: Fault, shape: LoadShape) -> FaultReport:
    since = datetime.now(UTC)
    tenants = list(shape.tenants)
    load = ChaosLoad(target.base_url, target.model, tenants, shape.deadline_s)
    load.start()
    try:
        await _until(
            lambda: sum(outcome(r) == "completed" for r in load.records) >= shape.warm_requests,
            120, f"{shape.warm_requests} completed requests before the fault",
        )
        placed = await asyncio.to_thread(replica_loads, target.app)
        before = {s["replica_id"] for s in placed}
        dedicated = {s["replica_id"] for s in placed if s["deployment"].startswith("dedicated-")}
        counts = await asyncio.to_thread(model_deployments, target.app)
        injected = await asyncio.to_thread(fault.inject, target)
        fault_at = injected.at
        if injected.follow_up is not None:
            injected.follow_up()
        rss_first = asyncio.create_task(_rss_at(fault_at + shape.rss_from_s, shape))
        back = asyncio.create_task(asyncio.to_thread(
            _replicas_back, target.app, counts, before, injected.replica, fault_at,
            shape.healthy_timeout_s,
        ))
        extra: dict = {"injected": injected.what, "victim": injected.replica}
        probed = await asyncio.to_thread(
            wait_healthy, target, fault_at, shape.healthy_timeout_s
        )
        healthy_after = None
        if probed is not None:
            healthy_after = await _quiet(load, fault_at, probed, shape)
        replicas_back = await back
        rss = growth(await rss_first, worker_rss()) if shape.rss_from_s else []
    finally:
        await load.stop()
    if shape.leaver is not None and shape.disconnects:
        extra.update(await _disconnect_burst(load, shape.leaver, shape.disconnects, target))
    records = load.records
    report = summarise(fault.name, records, fault_at)
    report.healthy_after_s = None if healthy_after is None else round(healthy_after, 2)
    kv, seats, idle_after = await asyncio.to_thread(
        wait_idle, target, fault_at, shape.idle_timeout_s
    )
    report.kv_blocks_idle, report.seats_idle = kv, seats
    extra["idle_after_s"] = round(idle_after, 2)
    steady = {t.name for t in tenants}
    report.tokens_received = sum(received_tokens(r) for r in records if r.record.tenant in steady)
    report.tokens_billed = await asyncio.to_thread(billed_tokens, target, sorted(steady), since)
    after = await asyncio.to_thread(_replica_ids, target.app)
    outage_end = fault_at + (healthy_after or 0.0)
    extra.update(
        replicas_back_after_s=replicas_back,
        replica_replaced=sorted(before - after),
        dedicated_replaced=bool(dedicated - after),
        errors_before_first_token=sum(
            1 for r in records
            if r.record.send <= outage_end and not r.record.chunks and _failed(r)
        ),
        completed_during_outage=sum(
            1 for r in records
            if fault_at <= r.record.send <= outage_end and outcome(r) == "completed"
        ),
        dedicated_served_by_shared=sum(
            1 for r in records if "dedicated" in r.record.tenant
            and r.record.service_tier == "shared" and outcome(r) == "completed"
        ),
    )
    if rss:
        extra["rss_growth_worst"] = [f"{pct:+.1f}% {title} ({a} -> {b} kB)"
                                     for pct, title, a, b in rss[:3]]
        extra["rss_growth_max_pct"] = round(rss[0][0], 2)
    report.extra = extra
    if injected.restore is not None:
        injected.restore()
    fault.checks(report)
    for check in shape.extra_checks:
        check(report)
    return report


def _replicas_back(app: str, counts: dict[str, int], before: set[str], victim: str | None,
                   fault_at: float, timeout_s: float) -> float | None:
    """Seconds from the fault until every model deployment runs as many replicas as
    before it; with a victim, once it is gone and a new replica has taken its place.
    None past the deadline."""
    while time.perf_counter() - fault_at < timeout_s:
        ids = _replica_ids(app)
        replaced = victim is None or (victim not in ids and bool(ids - before))
        if replaced and model_deployments(app) == counts and healthy(app):
            return round(time.perf_counter() - fault_at, 2)
        time.sleep(0.25)
    return None


async def _quiet(load: ChaosLoad, fault_at: float, probed: float, shape: LoadShape) -> float | None:
    """Seconds from the fault until the app was healthy: the probe's answer, or the end
    of the load's last failed request when that came later; it counts once the load has
    run `after_s` without a failure (None if that never happens in healthy_timeout_s)."""
    deadline = fault_at + shape.healthy_timeout_s
    while True:
        failures = [r.record.end for r in load.records if r.record.end >= fault_at and _failed(r)]
        last = max(failures, default=fault_at) - fault_at
        healthy = max(probed, last)
        if time.perf_counter() - (fault_at + healthy) >= shape.after_s:
            return healthy
        if time.perf_counter() > deadline:
            return None
        await asyncio.sleep(0.1)


async def _rss_at(when: float, shape: LoadShape) -> dict[int, tuple[str, int]]:
    if not shape.rss_from_s:
        return {}
    await asyncio.sleep(max(0.0, when - time.perf_counter()))
    return await asyncio.to_thread(worker_rss)


def _failed(r: ChaosRecord) -> bool:
    """A failure of the service: not a success, a client leaving, or a 4xx."""
    kind = outcome(r)
    return not (kind in ("completed", "http_400_as_meant") or kind.startswith("disconnected")
                or kind.startswith("http_4"))
