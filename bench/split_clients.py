"""One scenario, its tenants' clients split over processes pinned to given cores.

On the two-node emulation (bench.two_node) each client runs on the core of the node it
talks to: the dedicated tenant's probe on the dedicated node's core, the flood on the
shared node's, so that neither load generator steals the other's CPU. Each process runs
the usual Runner over its tenants; all warm up, meet at a barrier, and start their phases
together (perf_counter is the system-wide monotonic clock on Linux, so their records share
one time base). The parent merges the records into one RunResult.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import queue
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier

from bench.client import RequestRecord
from bench.runner import Runner, RunResult
from bench.scenario import Scenario

BARRIER_TIMEOUT_S = 600.0  # every group's warm-up must end within this


@dataclass(frozen=True)
class ClientGroup:
    tenants: tuple[str, ...]
    cpus: tuple[int, ...]


def _subset(scenario: Scenario, tenants: tuple[str, ...]) -> Scenario:
    phases = [
        p.model_copy(update={"load": {k: v for k, v in p.load.items() if k in tenants}})
        for p in scenario.phases
    ]
    return scenario.model_copy(update={
        "tenants": {k: v for k, v in scenario.tenants.items() if k in tenants},
        "phases": phases,
    })


def _child(
    scenario: Scenario, group: ClientGroup, endpoints: dict[str, str], tokenizer: str | None,
    show_progress: bool, barrier: Barrier, results: Queue,
) -> None:
    os.sched_setaffinity(0, set(group.cpus))
    runner = Runner(
        _subset(scenario, group.tenants), endpoints, tokenizer=tokenizer, progress=show_progress
    )
    result = asyncio.run(runner.run(lambda: barrier.wait(BARRIER_TIMEOUT_S)))
    results.put((group.tenants, result.t0, result.started_at, result.records))


def run_split(
    scenario: Scenario, endpoints: dict[str, str], groups: list[ClientGroup],
    tokenizer: str | None = None, progress: bool = True,
) -> RunResult:
    """Run each group's tenants in its own process; one merged result."""
    named = {t for g in groups for t in g.tenants}
    if named != set(scenario.tenants):
        raise ValueError(f"client groups cover {sorted(named)}, the scenario has "
                         f"{sorted(scenario.tenants)}")
    ctx = multiprocessing.get_context("spawn")  # no Ray or event-loop state inherited
    barrier, results = ctx.Barrier(len(groups)), ctx.Queue()
    procs = [
        ctx.Process(
            target=_child,
            args=(scenario, g, endpoints, tokenizer, progress and i == 0, barrier, results),
            daemon=True,
        )
        for i, g in enumerate(groups)
    ]
    for p in procs:
        p.start()
    deadline_s = BARRIER_TIMEOUT_S + scenario.duration_s + scenario.drain_s + 60
    parts: list[tuple[tuple[str, ...], float, str, list[RequestRecord]]] = []
    try:
        for _ in procs:
            parts.append(results.get(timeout=deadline_s))
    except queue.Empty:
        raise TimeoutError(f"a client process sent no result within {deadline_s:.0f}s") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    t0 = min(t for _, t, _, _ in parts)
    started_at = min(s for _, _, s, _ in parts)
    records = sorted((r for *_, rs in parts for r in rs), key=lambda r: r.send)
    result = RunResult(scenario, endpoints, t0, started_at, records)
    result.finished = max((r.end for r in records), default=t0)
    return result
