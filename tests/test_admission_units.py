"""Pure-Python admission parts: rate-limit windows, the fair dispatcher, keys, usage."""

from __future__ import annotations

import asyncio

import pytest

from deployments.tenancy.admission import AdmissionState
from deployments.tenancy.fair_queue import FairDispatcher, QueueTimeout
from deployments.tenancy.keys import KeyRing, hash_key, new_key
from deployments.tenancy.rate_limits import Limits, RateLimitState, duration


def test_rpm_is_exact_and_reports_headers() -> None:
    state = RateLimitState()
    limits = Limits(rpm=10)
    results = [state.reserve("t", 5, limits, now=100.0 + i * 0.1) for i in range(15)]
    assert sum(r.allowed for r in results) == 10
    denied = results[10]
    assert denied.reason == "rpm" and 59 <= denied.retry_after_s <= 60
    assert results[0].headers["x-ratelimit-remaining-requests"] == "9"
    assert state.reserve("t", 5, limits, now=161.0).allowed  # the window slid


def test_tpm_reserves_then_settles_to_real_usage() -> None:
    state = RateLimitState()
    limits = Limits(tpm=100)
    first = state.reserve("t", 80, limits, now=0.0)
    assert first.allowed and not state.reserve("t", 30, limits, now=1.0).allowed
    state.settle(first.reservation_id, 20)  # used far less than reserved
    second = state.reserve("t", 30, limits, now=2.0)
    assert second.allowed
    assert second.headers["x-ratelimit-remaining-tokens"] == "50"
    huge = state.reserve("t", 1000, limits, now=3.0)
    assert not huge.allowed and huge.reason == "tpm"


def test_concurrency_slot_held_until_settled_and_ttl_reclaims() -> None:
    state = RateLimitState(reservation_ttl_s=30.0)
    limits = Limits(max_concurrency=1)
    first = state.reserve("t", 1, limits, now=0.0)
    assert not state.reserve("t", 1, limits, now=1.0).allowed
    state.settle(first.reservation_id, 1)
    second = state.reserve("t", 1, limits, now=2.0)
    assert second.allowed
    assert state.reserve("t", 1, limits, now=40.0).allowed  # never settled: reclaimed


def test_reset_duration_format() -> None:
    assert duration(0.25) == "250ms" and duration(6) == "6s" and duration(360) == "6m0s"


def test_keys_hash_and_revocation() -> None:
    key, other = new_key(), new_key()
    ring = KeyRing({"acme": [hash_key(key)], "globex": [other]}, revoked=[hash_key(other)])
    assert ring.tenant_for(key) == "acme"
    assert ring.tenant_for(other) is None  # revoked, even though listed
    assert ring.tenant_for("tk-wrong") is None and ring.tenant_for(None) is None


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_no_queue_in_front_of_a_free_slot() -> None:
    async def main() -> None:
        d = FairDispatcher(capacity=2)
        assert (await d.acquire("a", 0, 1.0, 10, 1.0)).waited_s == 0.0
        assert (await d.acquire("b", 0, 1.0, 10, 1.0)).waited_s == 0.0
        assert d.in_use == 2 and d.depth == 0

    _run(main())


async def _order(d: FairDispatcher, arrivals: list[tuple[str, int, float, int]]) -> list[str]:
    """Fill the single slot, queue `arrivals`, then release one at a time."""
    await d.acquire("holder", 0, 1.0, 1, 1.0)
    served: list[str] = []

    async def waiter(tenant: str, band: int, weight: float, cost: int) -> None:
        await d.acquire(tenant, band, weight, cost, 5.0)
        served.append(tenant)

    tasks = []
    for arrival in arrivals:
        tasks.append(asyncio.create_task(waiter(*arrival)))
        await asyncio.sleep(0)
    for _ in arrivals:
        d.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return served


def test_bands_are_strict_then_fifo() -> None:
    arrivals = [("low1", 0, 1.0, 10), ("low2", 0, 1.0, 10), ("high", 5, 1.0, 10)]
    assert _run(_order(FairDispatcher(1), arrivals)) == ["high", "low1", "low2"]
    same = [("a", 0, 1.0, 10), ("a", 0, 1.0, 10)]
    assert _run(_order(FairDispatcher(1), same)) == ["a", "a"]


def test_weighted_fair_share_on_tokens() -> None:
    # heavy arrives first with many requests; light (weight 2) still gets 2/3 of the tokens.
    arrivals = [("heavy", 0, 1.0, 100)] * 12 + [("light", 0, 2.0, 100)] * 12
    served = _run(_order(FairDispatcher(1), arrivals))
    first = served[:12]
    assert first.count("light") == 8 and first.count("heavy") == 4


def test_big_requests_cost_more_than_small_ones() -> None:
    arrivals = [("big", 0, 1.0, 400)] * 4 + [("small", 0, 1.0, 100)] * 8
    first_six = _run(_order(FairDispatcher(1), arrivals))[:6]
    assert first_six.count("small") >= 4


def test_deadline_and_cancellation_leave_no_trace() -> None:
    async def main() -> None:
        d = FairDispatcher(capacity=1)
        await d.acquire("a", 0, 1.0, 1, 1.0)
        with pytest.raises(QueueTimeout):
            await d.acquire("b", 0, 1.0, 1, 0.05)
        task = asyncio.create_task(d.acquire("c", 0, 1.0, 1, 5.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert d.depth == 0
        d.release()
        assert d.in_use == 0

    _run(main())


def test_admission_state_dedicated_saturation_and_usage() -> None:
    state = AdmissionState({"m": 2}, {"acme": 1}, 16)
    assert state.try_dedicated("acme", "t1") and not state.try_dedicated("acme", "t2")
    ticket = "t1"
    usage = {
        "tenant": "acme",
        "model": "m",
        "tier": "dedicated",
        "spill": False,
        "prompt_tokens": 5,
        "cached_tokens": 0,
        "completion_tokens": 3,
    }
    state.finish(ticket, None, 8, usage)
    assert state.try_dedicated("acme", "t3")
    (row,) = state.snapshot()["usage"]
    assert row["requests"] == 1 and row["completion_tokens"] == 3


def test_a_caller_that_gave_up_never_leaks_its_slot() -> None:
    async def main() -> None:
        state = AdmissionState({"m": 1}, {}, 16)
        first = await state.acquire_shared("m", "a", 0, 1.0, 10, 5.0, "first")
        assert first["ticket"] == "first"
        queued = asyncio.create_task(state.acquire_shared("m", "b", 0, 1.0, 10, 5.0, "late"))
        await asyncio.sleep(0.01)
        state.finish("late", None, 0, None, granted=False)  # the client disconnected
        state.finish("first", None, 0, None)  # the slot frees; "late" is granted...
        assert (await queued)["ticket"] is None  # ...and released on arrival
        assert state.pools["m"].in_use == 0

    _run(main())


def test_tickets_given_up_whose_grant_never_comes_are_forgotten() -> None:
    """A wait that was cancelled or timed out never brings its grant: the abandoned mark
    must not stay forever."""
    import time

    from deployments.tenancy.admission import ABANDONED_TTL_S

    state = AdmissionState({"m": 1}, {}, 16)
    state.finish("old", None, 0, None, granted=False)
    state._abandoned["old"] -= ABANDONED_TTL_S + 1  # as if given up long ago
    state.finish("new", None, 0, None, granted=False)
    assert set(state._abandoned) == {"new"}
    assert state._abandoned["new"] <= time.monotonic()


def test_seats_of_an_ingress_replica_that_stopped_reporting_come_back() -> None:
    """A crashed ingress replica never releases its requests' seats; once it has been
    silent for OWNER_TTL_S, they go back to their pools, and a live replica's stay."""
    import time

    from deployments.tenancy.admission import OWNER_TTL_S

    async def main() -> None:
        state = AdmissionState({"m": 2}, {"acme": 1}, 16)
        now = time.monotonic()
        assert state.try_dedicated("acme", "d1", owner="gone")
        assert (await state.acquire_shared("m", "a", 0, 1.0, 1, 5.0, "s1", "gone"))["ticket"]
        assert (await state.acquire_shared("m", "b", 0, 1.0, 1, 5.0, "s2", "alive"))["ticket"]
        assert state.ingress_heartbeat("alive", now + OWNER_TTL_S / 2) == 0
        assert state.pools["m"].in_use == 2 and state.dedicated_in_use["acme"] == 1
        assert state.ingress_heartbeat("alive", now + OWNER_TTL_S + 1) == 2
        assert state.pools["m"].in_use == 1 and state.dedicated_in_use["acme"] == 0
        state.finish("s2", None, 0, None)  # the live replica's request ends as usual
        assert state.pools["m"].in_use == 0

    _run(main())


def test_capacity_follows_replica_heartbeats() -> None:
    from deployments.tenancy.admission import HEARTBEAT_TTL_S

    state = AdmissionState({"m": 16}, {"acme": 4}, 16)
    assert state.pools["m"].capacity == 16  # configured until replicas report
    state.replica_heartbeat("m", "r1", 16, now=0.0)
    signals = state.replica_heartbeat("m", "r2", 16, now=1.0)  # autoscaling added one
    assert state.pools["m"].capacity == 32 and signals["dispatcher_queue_depth"] == 0.0
    state.replica_heartbeat("m", "r2", 16, now=HEARTBEAT_TTL_S + 5)  # r1 went away
    assert state.pools["m"].capacity == 16
    state.replica_heartbeat("dedicated:acme", "d1", 4, now=0.0)
    state.replica_heartbeat("dedicated:acme", "d2", 4, now=0.0)
    assert state.dedicated_capacity["acme"] == 8


def test_dedicated_reservation_is_the_autoscaling_floor() -> None:
    from deployments.app import dedicated_replica
    from deployments.config.tenants import DedicatedSpec

    fixed = dedicated_replica(DedicatedSpec(model="m", reserved_replicas=2, max_replicas=2))
    assert fixed.num_replicas == 2 and fixed.autoscaling is None
    burst = dedicated_replica(DedicatedSpec(model="m", reserved_replicas=2, max_replicas=5))
    assert burst.autoscaling.min_replicas == 2 and burst.autoscaling.max_replicas == 5
