"""The fair dispatcher: no queue in front of a free slot; bands strict; weighted fair share
on tokens; FIFO within a tenant; deadlines, cancellation and capacity changes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from deployments.tenancy.fair_queue import FairDispatcher, QueueFull, QueueTimeout, Ticket

Arrival = tuple[str, int, float, int]  # tenant, band, weight, cost


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def grant_order(
    arrivals: list[Arrival], actual: Callable[[Ticket], int] | None = None
) -> list[tuple[int, Ticket]]:
    """Queue `arrivals` behind one held slot, then free the slot one grant at a time,
    releasing each ticket with `actual(ticket)` tokens. Returns (arrival index, ticket)."""
    d = FairDispatcher(capacity=1)
    holder = await d.acquire("holder", 0, 1.0, 0, 1.0)
    granted: list[tuple[int, Ticket]] = []

    async def wait(i: int, tenant: str, band: int, weight: float, cost: int) -> None:
        granted.append((i, await d.acquire(tenant, band, weight, cost, 30.0)))

    tasks = []
    for i, arrival in enumerate(arrivals):
        tasks.append(asyncio.create_task(wait(i, *arrival)))
        await settle()
    assert d.depth == len(arrivals) and d.in_use == 1
    d.release(holder)
    for step in range(len(arrivals)):
        await settle()
        assert len(granted) == step + 1 and d.in_use == 1  # one at a time, in order
        ticket = granted[step][1]
        d.release(ticket, actual(ticket) if actual else None)
    await asyncio.gather(*tasks)
    assert d.in_use == 0 and d.depth == 0
    return granted


def tenants(order: list[tuple[int, Ticket]]) -> list[str]:
    return [t.tenant for _, t in order]


def tokens(order: list[tuple[int, Ticket]], n: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, t in order[:n]:
        out[t.tenant] = out.get(t.tenant, 0) + t.cost
    return out


def test_no_queue_in_front_of_a_free_slot() -> None:
    async def main() -> None:
        d = FairDispatcher(capacity=2)
        first = await d.acquire("a", 0, 1.0, 10, 0.0)  # deadline 0: must not wait at all
        second = await d.acquire("b", 3, 1.0, 10, 0.0)
        assert first.waited_s == second.waited_s == 0.0 and d.in_use == 2 and d.depth == 0
        with pytest.raises(QueueTimeout):
            await d.acquire("c", 0, 1.0, 10, 0.0)
        d.release(first)
        assert (await d.acquire("c", 0, 1.0, 10, 0.0)).tenant == "c"

    run(main())


def test_bands_are_strict() -> None:
    arrivals = [("low", 0, 100.0, 1)] * 3 + [("mid", 1, 0.01, 1000)] * 2 + [("high", 5, 1.0, 10)]
    # weights and costs cannot buy a lower band past a higher one
    assert tenants(run(grant_order(arrivals))) == ["high", "mid", "mid", "low", "low", "low"]


def test_fifo_within_a_tenant() -> None:
    arrivals = [("a", 0, 1.0, 10 * (i + 1)) for i in range(5)] + [("b", 0, 1.0, 5)] * 3
    order = run(grant_order(arrivals))
    a_indices = [i for i, t in order if t.tenant == "a"]
    assert a_indices == sorted(a_indices)  # even though sizes differ


def test_weights_two_to_one_get_tokens_two_to_one_while_both_are_backlogged() -> None:
    arrivals = [("heavy", 0, 1.0, 100)] * 30 + [("light", 0, 2.0, 100)] * 30
    served = tokens(run(grant_order(arrivals)), 30)  # while both still have a backlog
    assert abs(served["light"] - 2 * served["heavy"]) <= 200, served


def test_share_is_on_tokens_not_requests() -> None:
    arrivals = [("big", 0, 1.0, 300)] * 10 + [("small", 0, 1.0, 100)] * 30
    served = tokens(run(grant_order(arrivals)), 20)
    assert abs(served["big"] - served["small"]) <= 300, served  # ~1 big per 3 small


def test_a_newcomer_gets_its_share_not_credit_for_idle_time() -> None:
    async def main() -> list[str]:
        d = FairDispatcher(capacity=1)
        held = await d.acquire("a", 0, 1.0, 10, 1.0)
        order: list[str] = []

        async def wait(tenant: str) -> None:
            t = await d.acquire(tenant, 0, 1.0, 10, 30.0)
            order.append(tenant)
            await settle()
            d.release(t, 10)

        tasks = [asyncio.create_task(wait("a")) for _ in range(40)]
        await settle()
        d.release(held)
        while len(order) < 20:  # a alone for a while
            await asyncio.sleep(0)
        tasks += [asyncio.create_task(wait("b")) for _ in range(10)]
        await asyncio.gather(*tasks)
        return order

    after_b_joined = run(main())[21:31]
    assert 4 <= after_b_joined.count("b") <= 6, after_b_joined  # alternates, no burst


def test_settling_to_real_usage_refunds_the_tenant() -> None:
    # Both reserve 1000 per request; "terse" really uses 100, "verbose" all 1000.
    arrivals = [("terse", 0, 1.0, 1000)] * 20 + [("verbose", 0, 1.0, 1000)] * 20
    used = {"terse": 100, "verbose": 1000}
    first = tenants(run(grant_order(arrivals, actual=lambda t: used[t.tenant])))[:22]
    assert first.count("terse") >= 3 * first.count("verbose"), first
    unsettled = tenants(run(grant_order(arrivals)))[:22]
    assert abs(unsettled.count("terse") - unsettled.count("verbose")) <= 1


def test_deadline_raises_with_a_retry_estimate_and_leaves_no_trace() -> None:
    async def main() -> None:
        d = FairDispatcher(capacity=1)
        held = await d.acquire("a", 0, 1.0, 1, 1.0)
        with pytest.raises(QueueTimeout) as err:
            await d.acquire("b", 0, 1.0, 10_000, 0.05)
        assert err.value.retry_after_s >= 1.0 and err.value.waited_s >= 0.05
        assert d.depth == 0 and d.stats()[0].timeouts == 1
        # b's timed-out request cost it nothing: b and c now alternate from b
        order: list[str] = []

        async def wait(tenant: str) -> None:
            t = await d.acquire(tenant, 0, 1.0, 10, 5.0)
            order.append(tenant)
            await settle()
            d.release(t, 10)

        tasks = [asyncio.create_task(wait(x)) for x in ("c", "c", "b", "b")]
        await settle()
        d.release(held)
        await asyncio.gather(*tasks)
        assert order == ["c", "b", "c", "b"]

    run(main())


def test_cancelled_waiters_leave_cleanly_and_grants_to_the_gone_are_returned() -> None:
    async def main() -> None:
        d = FairDispatcher(capacity=1)
        held = await d.acquire("a", 0, 1.0, 1, 1.0)
        waiting = asyncio.create_task(d.acquire("b", 0, 1.0, 1, 5.0))
        await settle()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert d.depth == 0 and d.stats()[0].cancelled == 1
        # granted and cancelled in the same tick: the slot comes back
        late = asyncio.create_task(d.acquire("c", 0, 1.0, 1, 5.0))
        await settle()
        d.release(held)
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        assert d.in_use == 0
        d.release(held)  # releasing a ticket twice is a no-op
        assert d.in_use == 0

    run(main())


def test_queue_full_is_refused_at_once() -> None:
    async def main() -> None:
        d = FairDispatcher(capacity=1, max_queue_len=2)
        await d.acquire("a", 0, 1.0, 1, 1.0)
        tasks = [asyncio.create_task(d.acquire("a", 0, 1.0, 1, 5.0)) for _ in range(2)]
        await settle()
        with pytest.raises(QueueFull) as err:
            await d.acquire("b", 0, 1.0, 1, 5.0)
        assert err.value.retry_after_s >= 1.0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    run(main())


def test_capacity_changes_at_runtime() -> None:
    async def main() -> None:
        seats = {"n": 1}
        d = FairDispatcher(capacity=lambda: seats["n"])
        await d.acquire("a", 0, 1.0, 1, 1.0)
        tasks = [asyncio.create_task(d.acquire("b", 0, 1.0, 1, 5.0)) for _ in range(3)]
        await settle()
        assert d.depth == 3
        seats["n"] = 3  # autoscaling added a replica
        d.poke()
        await settle()
        assert d.depth == 1 and d.in_use == 3
        d.set_capacity(1)  # scaled in: nothing revoked, nothing new granted
        first = await tasks[0]
        d.release(first)
        await settle()
        assert d.depth == 1 and d.in_use == 2
        d.set_capacity(4)
        await asyncio.gather(*tasks)
        assert d.depth == 0 and d.in_use == 3  # a, and the three b; one b released

    run(main())


def test_stats_per_band_and_the_retry_estimate() -> None:
    async def main() -> None:
        d = FairDispatcher(capacity=1)
        held = await d.acquire("a", 2, 1.0, 1, 1.0)
        tasks = [asyncio.create_task(d.acquire("b", 0, 1.0, 1, 5.0)) for _ in range(3)]
        tasks.append(asyncio.create_task(d.acquire("c", 2, 1.0, 1, 5.0)))
        await asyncio.sleep(0.05)
        stats = d.stats()
        assert (stats[0].queued, stats[0].tenants_waiting, stats[2].queued) == (3, 1, 1)
        assert d.depth_by_band() == {0: 3, 2: 1}
        d.release(held)
        granted = await tasks[3]
        assert granted.tenant == "c" and granted.waited_s >= 0.05
        assert d.stats()[2].queued_grants == 1 and d.stats()[2].max_wait_s >= 0.05
        d.release(granted)  # held ~0 s; estimate stays within its bounds
        assert 1.0 <= d.retry_after_estimate() <= 60.0
        for t in tasks[:3]:
            d.release(await t)

    run(main())


def test_bad_arguments() -> None:
    async def main() -> None:
        d = FairDispatcher(capacity=1)
        for weight, cost in ((0.0, 1), (-1.0, 1), (1.0, -1)):
            with pytest.raises(ValueError):
                await d.acquire("a", 0, weight, cost, 1.0)

    run(main())
