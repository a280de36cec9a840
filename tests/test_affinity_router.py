"""KV-affinity and adapter routing through Serve on a real local Ray: continuations land on
the replica they name, a gone replica's continuations are still served, and a saturated
one's go elsewhere until it recovers; requests for a LoRA adapter land on the replica that
holds it (affinity first), and elsewhere while it is saturated.

The deployment is a stub whose `generate` yields its replica id and whose routing stats the
test sets through a board actor: the router under test is the production class, with the
production router config, and it reads the stats Serve's controller pulls every second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import ray
from ray import serve

from deployments.replicas.affinity_router import (
    AffinityRouter,
    adapter_of,
    adapter_stat,
    affinity_of,
    affinity_router_config,
    is_saturated,
)
from deployments.replicas.requests import GenerateRequest
from models.lora import LoRARequest
from models.sampling_params import SamplingParams
from tests.ray_fixtures import run

APP = "affinity"
SATURATED = {"num_running": 2.0, "num_waiting": 3.0, "max_num_seqs": 8.0}
IDLE = {"num_running": 1.0, "num_waiting": 0.0, "max_num_seqs": 8.0}
SQL = LoRARequest("sql", 1, "/adapters/sql")
HOLDS_SQL = {adapter_stat(SQL.key): 1.0}  # what ModelServer reports per adapter held


@ray.remote(num_cpus=0)
class Board:
    """Which replicas started, the routing stats each should report, and how often each
    was asked for them since they were last set."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.stats: dict[str, dict[str, float]] = {}
        self.pulls: dict[str, int] = {}

    def register(self, replica_id: str) -> None:
        self.ids.append(replica_id)

    def replica_ids(self) -> list[str]:
        return list(self.ids)

    def set(self, replica_id: str, stats: dict[str, float]) -> None:
        self.stats[replica_id] = stats
        self.pulls[replica_id] = 0

    def get(self, replica_id: str) -> dict[str, float]:
        self.pulls[replica_id] = self.pulls.get(replica_id, 0) + 1
        return self.stats.get(replica_id, {})

    def fewest_pulls(self) -> int:
        return min(self.pulls.get(r, 0) for r in self.ids)


@serve.deployment(
    num_replicas=2,
    max_ongoing_requests=100,  # Serve's own queue limit never turns a continuation away
    ray_actor_options={"num_cpus": 0},
    request_router_config=affinity_router_config(),
)
class Echo:
    async def __init__(self, board) -> None:  # type: ignore[no-untyped-def]
        self.board = board
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        await board.register.remote(self.replica_id)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[str]:
        yield self.replica_id

    async def record_routing_stats(self) -> dict[str, float]:
        return await self.board.get.remote(self.replica_id)


@pytest.fixture(scope="module")
def echo(ray_cluster):  # type: ignore[no-untyped-def]
    board = Board.remote()
    handle = serve.run(Echo.bind(board), name=APP, route_prefix=None)
    deadline = time.monotonic() + 60
    while len(ids := ray.get(board.replica_ids.remote(), timeout=10)) < 2:
        assert time.monotonic() < deadline, f"replicas up: {ids}"
        time.sleep(0.1)
    yield handle, board, ids
    serve.delete(APP)
    ray.kill(board)


def _show(board, stats: dict[str, dict[str, float]], timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    """Set these replicas' routing stats, then wait until Serve's controller has asked
    every replica twice: it asks again only once it has the last answer, which it pushes
    to routers as it comes, so no test routes on stats an earlier one set."""
    ray.get([board.set.remote(r, s) for r, s in stats.items()], timeout=10)
    deadline = time.monotonic() + timeout_s
    while ray.get(board.fewest_pulls.remote(), timeout=10) < 2:
        assert time.monotonic() < deadline, "Serve's controller stopped asking for stats"
        time.sleep(0.1)


def _job(i: int, affinity: str | None, lora: LoRARequest | None = None) -> GenerateRequest:
    return GenerateRequest(
        f"job{i}", [1, 2, 3], SamplingParams(max_tokens=1), affinity_replica=affinity, lora=lora
    )


async def _served_by(  # type: ignore[no-untyped-def]
    handle, affinities: list[str | None], loras: list[LoRARequest | None] | None = None
) -> list[str]:
    """The replica that served each request, sent all at once."""

    async def one(i: int, affinity: str | None, lora: LoRARequest | None) -> str:
        job = _job(i, affinity, lora)
        served = [r async for r in handle.options(stream=True).generate.remote(job)]
        assert len(served) == 1
        return served[0]

    loras = loras or [None] * len(affinities)
    jobs = zip(affinities, loras, strict=True)
    return list(await asyncio.gather(*(one(i, a, lora) for i, (a, lora) in enumerate(jobs))))


def _until_served_by(handle, affinity: str, want: str, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    """Send continuations one at a time until one lands on `want` (the router has seen
    the stats the controller pulled)."""
    deadline = time.monotonic() + timeout_s
    while run(_served_by(handle, [affinity])) != [want]:
        assert time.monotonic() < deadline, f"no continuation for {affinity} reached {want}"
        time.sleep(0.2)


def test_continuations_land_on_the_replica_they_name(echo) -> None:  # type: ignore[no-untyped-def]
    handle, _, ids = echo
    for target in ids:
        # Interleaved with requests without affinity, so FIFO hand-off is exercised too.
        affinities: list[str | None] = [target if i % 2 else None for i in range(40)]
        served = run(_served_by(handle, affinities))
        assert {s for s, a in zip(served, affinities, strict=True) if a} == {target}
        assert set(served) <= set(ids)


def test_a_continuation_to_a_gone_replica_is_still_served(echo) -> None:  # type: ignore[no-untyped-def]
    handle, _, ids = echo
    served = run(_served_by(handle, ["no-such-replica"] * 6))
    assert len(served) == 6 and set(served) <= set(ids)


def test_a_saturated_replica_s_continuations_go_elsewhere_until_it_recovers(echo) -> None:  # type: ignore[no-untyped-def]
    handle, board, ids = echo
    busy, other = ids
    try:
        _show(board, {busy: SATURATED})
        _until_served_by(handle, busy, other)
        assert set(run(_served_by(handle, [busy] * 20))) == {other}
        _show(board, {busy: IDLE})
        _until_served_by(handle, busy, busy)
        assert set(run(_served_by(handle, [busy] * 20))) == {busy}
    finally:
        _show(board, {busy: {}})


def test_adapter_requests_land_on_the_replica_holding_it_unless_saturated(echo) -> None:  # type: ignore[no-untyped-def]
    """Each replica in turn holds sql@1 while the other holds sql@2 (the same name, other
    weights), so neither node locality nor Serve's queue-length cache can pass for the
    preference; while the holder is saturated its requests go to the other."""
    handle, board, ids = echo
    sql2 = LoRARequest("sql", 2, SQL.path)
    try:
        for holder, other in (ids, ids[::-1]):
            _show(board, {holder: {**IDLE, **HOLDS_SQL}, other: {adapter_stat(sql2.key): 1.0}})
            # Interleaved with plain requests, so FIFO hand-off is exercised too.
            mixed: list[LoRARequest | None] = [SQL, None, sql2] * 14
            served = run(_served_by(handle, [None] * len(mixed), mixed))
            by_adapter = {
                lora: {s for s, used in zip(served, mixed, strict=True) if used == lora}
                for lora in (SQL, sql2)
            }
            assert by_adapter == {SQL: {holder}, sql2: {other}}
            _show(board, {holder: {**SATURATED, **HOLDS_SQL}})
            assert set(run(_served_by(handle, [None] * 20, [SQL] * 20))) == {other}
    finally:
        _show(board, {r: {} for r in ids})


def test_affinity_comes_before_the_adapter_s_holder(echo) -> None:  # type: ignore[no-untyped-def]
    """The previous turn's replica holds the conversation's KV; the holder only the weights."""
    handle, board, ids = echo
    holder, other = ids
    try:
        _show(board, {holder: {**IDLE, **HOLDS_SQL}, other: IDLE})
        assert set(run(_served_by(handle, [None] * 20, [SQL] * 20))) == {holder}
        assert set(run(_served_by(handle, [other] * 20, [SQL] * 20))) == {other}
    finally:
        _show(board, {r: {} for r in ids})


def test_saturation_is_read_from_the_engine_s_seats() -> None:
    assert not is_saturated({})  # no stats yet
    assert not is_saturated(IDLE)
    assert is_saturated(SATURATED)  # requests wait for a seat
    assert is_saturated({"num_running": 8.0, "num_waiting": 0.0, "max_num_seqs": 8.0})
    assert not is_saturated({"num_running": 7.0, "num_waiting": 0.0, "max_num_seqs": 8.0})


def test_affinity_is_read_from_the_generate_request() -> None:
    def pending(*args: object) -> Any:  # what the router reads of a PendingRequest
        return SimpleNamespace(args=list(args), kwargs={})

    assert affinity_of(pending(_job(0, "abc"))) == "abc"
    assert affinity_of(pending(_job(0, None))) is None
    assert affinity_of(pending("not a request")) is None
    assert adapter_of(pending(_job(0, None, SQL))) == "lora:sql@1"
    assert adapter_of(pending(_job(0, None))) is None
    assert adapter_of(pending(SQL)) is None  # load_lora(lora) is routed like any call
    routed = affinity_router_config().get_request_router_class()
    assert routed.__qualname__ == AffinityRouter.__qualname__


def test_a_replica_chosen_for_a_continuation_is_handed_to_it_not_the_oldest() -> None:
    """Serve's FIFO hand-off gives whichever replica a routing task found to the oldest
    pending request. Here a continuation takes exactly the replica chosen for it, and a
    replica chosen for a plain request goes to the oldest plain one, never a continuation.
    (Deterministic: on a live cluster requests rarely queue long enough to show it.)"""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
    from ray.serve.request_router import PendingRequest

    async def hand_off() -> None:
        router = AffinityRouter(
            deployment_id=DeploymentID(name="d", app_name=APP),
            handle_source=DeploymentHandleSource.UNKNOWN,
        )
        router.initialize_state()

        def pending(i: int, affinity: str | None) -> PendingRequest:
            meta = RequestMetadata(request_id=f"r{i}", internal_request_id=f"i{i}")
            pr = PendingRequest(args=[_job(i, affinity)], kwargs={}, metadata=meta)
            router._pending_requests_to_fulfill.append(pr)
            router._add_pending_request_to_indices(pr)
            return pr

        oldest, continuation, plain = pending(0, None), pending(1, "r1"), pending(2, None)
        r1, r2 = (SimpleNamespace(replica_id=SimpleNamespace(unique_id=n)) for n in ("r1", "r2"))
        router._fulfill_next_pending_request(r1, continuation.metadata)  # type: ignore[arg-type]
        assert continuation.future.result() is r1 and not oldest.future.done()
        router._fulfill_next_pending_request(r2, plain.metadata)  # type: ignore[arg-type]
        assert oldest.future.result() is r2 and not plain.future.done()
        router._fulfill_next_pending_request(r2, plain.metadata)  # type: ignore[arg-type]
        assert plain.future.result() is r2

    asyncio.run(hand_off())
