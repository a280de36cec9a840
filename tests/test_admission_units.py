"""The admission core without Ray: one admit and one finish per request, claims that
survive a silent ingress and an actor restart, config applied in place, fair share
settled on the tokens really used."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from deployments.config.plan import dedicated_replica
from deployments.config.tenants import DedicatedSpec
from deployments.state.config import StateSpec
from deployments.state.ledger import Ledger
from deployments.state.store import StateStore
from deployments.state.types import UsageQuery
from deployments.state.writer import LedgerWriter
from deployments.tenancy.admission import HEARTBEAT_TTL_S, OWNER_TTL_S, AdmissionState
from deployments.tenancy.types import (
    AdmissionConfig,
    AdmissionRequest,
    HeldClaim,
    PoolSeats,
    TenantPolicy,
    UsageRecord,
)


def _config(*tenants: TenantPolicy, shared: int = 2, dedicated: int = 1, version: float = 0.0):
    pools = {"m": PoolSeats("m", "shared", shared)}
    for t in tenants:
        if t.dedicated_model:
            key = f"dedicated:{t.name}"
            pools[key] = PoolSeats(key, "dedicated", dedicated)
    return AdmissionConfig(
        {t.name: t for t in tenants}, pools, queue_deadline_s=5.0, version=version
    )


def _ask(claim: str, tenant: str, cost: int = 10, owner: str = "i1", **kw: Any):
    return AdmissionRequest(claim, tenant, "m", cost, owner=owner, **kw)


def _usage(claim: str, tenant: str, tier: str, prompt: int, completion: int, spill=False):
    return UsageRecord(claim, tenant, "m", tier, spill, prompt, 0, completion, 0.0, 1.0)


def _run(coro: Coroutine) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


ACME = TenantPolicy("acme", priority=3, dedicated_model="m", spill=True)
STARK = TenantPolicy("stark", dedicated_model="m", spill=False)
GLOBEX = TenantPolicy("globex")


def test_dedicated_first_then_spill_at_shared_priority_or_refuse() -> None:
    async def main() -> None:
        state = AdmissionState(_config(ACME, STARK, GLOBEX))
        first = await state.admit(_ask("a1", "acme"))
        assert (first.tier, first.spill, first.band) == ("dedicated", False, 3)
        spilled = await state.admit(_ask("a2", "acme"))
        assert (spilled.tier, spilled.spill, spilled.band) == ("shared", True, 0)
        asked_shared = await state.admit(_ask("a3", "acme", prefer_dedicated=False))
        assert (asked_shared.tier, asked_shared.spill, asked_shared.band) == ("shared", False, 3)
        assert (await state.admit(_ask("s1", "stark"))).tier == "dedicated"
        refused = await state.admit(_ask("s2", "stark"))
        assert refused.refusal is not None and refused.refusal.reason == "dedicated_saturated"
        assert refused.refusal.status == 429
        assert "s2" not in state.claims  # a refusal holds nothing
        assert state.dedicated["acme"].in_use == 1 and state.pools["m"].in_use == 2

    _run(main())


def test_finish_frees_the_seat_and_records_usage_once(tmp_path: Path) -> None:
    """Through the real writer into a SQLite ledger: a replayed finish bills nothing."""

    async def main() -> None:
        store = await StateStore.open(StateSpec(url=f"sqlite:///{tmp_path / 'l.db'}"))
        state = AdmissionState(_config(ACME))
        state.ledger = LedgerWriter(Ledger(store))
        state.ledger.start()
        await state.admit(_ask("a1", "acme"))
        usage = _usage("a1", "acme", "dedicated", 5, 3)
        assert state.finish("a1", usage) is True
        assert state.finish("a1", usage) is False  # a replay after an outage
        await state.ledger.flush(10)
        (row,) = await state.ledger.ledger.aggregate(UsageQuery())
        assert (row.requests, row.prompt_tokens, row.completion_tokens) == (1, 5, 3)
        assert state.dedicated["acme"].in_use == 0
        assert (await state.admit(_ask("a2", "acme"))).tier == "dedicated"
        await state.ledger.stop()
        await store.close()

    _run(main())


def test_unknown_tenant_is_a_503_not_a_crash() -> None:
    refusal = _run(AdmissionState(_config()).admit(_ask("x", "ghost"))).refusal
    assert refusal is not None and refusal.reason == "unknown_tenant" and refusal.status == 503


def test_fair_share_is_settled_on_tokens_used_not_reserved() -> None:
    """Both tenants reserve 1000 tokens a request; `frugal` uses 10, `hungry` 1000. On
    tokens served, frugal gets far more requests through; on reserved cost (what ran
    before), they would alternate 1:1."""

    async def main() -> list[str]:
        frugal, hungry = TenantPolicy("frugal"), TenantPolicy("hungry")
        state = AdmissionState(_config(frugal, hungry, shared=1))
        await state.admit(_ask("hold", "hungry", cost=1))
        used = {"frugal": 10, "hungry": 1000}
        order: list[str] = []

        async def one(claim: str, tenant: str) -> None:
            admission = await state.admit(_ask(claim, tenant, cost=1000))
            assert admission.admitted
            order.append(tenant)

        tasks = []
        for i in range(10):
            for tenant in ("frugal", "hungry"):
                tasks.append(asyncio.create_task(one(f"{tenant}{i}", tenant)))
                await asyncio.sleep(0)
        state.finish("hold", None)
        for _ in range(20):
            await asyncio.sleep(0.01)
            running = [c for c, claim in state.claims.items() if claim.admission]
            (claim_id,) = running
            tenant = state.claims[claim_id].request.tenant
            state.finish(claim_id, _usage(claim_id, tenant, "shared", used[tenant] // 2,
                                          used[tenant] - used[tenant] // 2))
        await asyncio.gather(*tasks)
        served = state.snapshot().pools["m"].served_tokens
        assert served == {"frugal": 10 * 10, "hungry": 10 * 1000}
        return order

    order = _run(main())
    first = order[:10]
    assert first.count("frugal") >= 8, order


def test_a_caller_that_gave_up_never_leaks_its_seat() -> None:
    async def main() -> None:
        state = AdmissionState(_config(GLOBEX, shared=1))
        assert (await state.admit(_ask("first", "globex"))).admitted
        queued = asyncio.create_task(state.admit(_ask("late", "globex")))
        await asyncio.sleep(0.01)
        state.finish("late", None)  # the client disconnected while it waited
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert state.pools["m"].depth == 0 and "late" not in state.claims
        state.finish("first", None)
        assert state.pools["m"].in_use == 0
        # a finish that overtook its own admit: the admit is refused on arrival
        state.finish("early", None)
        refused = await state.admit(_ask("early", "globex"))
        assert refused.refusal is not None and refused.refusal.reason == "abandoned"
        assert state.pools["m"].in_use == 0

    _run(main())


def test_every_claim_of_a_silent_ingress_comes_back_within_owner_ttl() -> None:
    """Seats, concurrency slots and TPM reservations alike (the rate limiter's own 900 s
    TTL is only a backstop)."""
    limited = TenantPolicy("limited", tpm=100, max_concurrency=1)

    async def main() -> None:
        state = AdmissionState(_config(limited, ACME))
        now = time.monotonic()
        assert (await state.admit(_ask("l1", "limited", cost=80, owner="gone"))).admitted
        assert (await state.admit(_ask("d1", "acme", owner="gone"))).tier == "dedicated"
        assert (await state.admit(_ask("d2", "acme", owner="alive"))).tier == "shared"
        blocked = await state.admit(_ask("l2", "limited", owner="alive"))
        assert blocked.refusal is not None and blocked.refusal.reason == "concurrency"
        assert state.ingress_heartbeat("alive", [], now + OWNER_TTL_S / 2).reclaimed == 0
        assert state.ingress_heartbeat("alive", [], now + OWNER_TTL_S + 1).reclaimed == 2
        assert state.dedicated["acme"].in_use == 0 and state.pools["m"].in_use == 1
        again = await state.admit(_ask("l3", "limited", cost=90, owner="alive"))
        assert again.admitted and again.limits.remaining_tokens == 10  # 80 came back
        state.finish("d2", None)  # the live replica's request ends as usual
        assert state.pools["m"].in_use == 1

    _run(main())


def test_a_restarted_actor_counts_the_claims_ingresses_still_hold() -> None:
    single = TenantPolicy("single", max_concurrency=1, rpm=5)

    async def main() -> None:
        config = _config(ACME, single)
        before = AdmissionState(config)
        held = []
        for ask in (_ask("d1", "acme"), _ask("s1", "acme"), _ask("c1", "single")):
            held.append(HeldClaim(ask, await before.admit(ask), time.time() - 5))
        after = AdmissionState(config)  # what Ray restarts: the creation config, no state
        assert after.ingress_heartbeat("i1", held).restored == 3
        assert after.ingress_heartbeat("i1", held).restored == 0  # idempotent
        assert after.dedicated["acme"].in_use == 1 and after.pools["m"].in_use == 2
        refused = await after.admit(_ask("c2", "single"))
        assert refused.refusal is not None and refused.refusal.reason == "concurrency"
        after.finish("c1", None)
        assert (await after.admit(_ask("c3", "single"))).limits.remaining_requests == 3
        after.finish("d1", None)
        after.finish("s1", None)
        assert after.dedicated["acme"].in_use == 0 and after.pools["m"].in_use == 1
        assert after.ingress_heartbeat("i1", held).restored == 0  # finished: never revived

    _run(main())


def test_a_new_config_applies_in_place_and_an_older_one_is_ignored() -> None:
    async def main() -> None:
        state = AdmissionState(_config(TenantPolicy("t", rpm=5), shared=4, version=1.0))
        for i in range(3):
            assert (await state.admit(_ask(f"c{i}", "t"))).admitted
        assert state.configure(_config(TenantPolicy("t", rpm=3), shared=4, version=2.0)) == 2.0
        refused = await state.admit(_ask("c3", "t"))
        assert refused.refusal is not None and refused.refusal.reason == "rpm"  # window kept
        assert state.configure(_config(TenantPolicy("t", rpm=50), version=1.5)) == 2.0
        assert not (await state.admit(_ask("c4", "t"))).admitted
        assert state.pools["m"].in_use == 3  # the granted seats were kept too

    _run(main())


def test_capacity_follows_replica_heartbeats() -> None:
    state = AdmissionState(_config(ACME, shared=16, dedicated=4))
    t0 = time.monotonic() - HEARTBEAT_TTL_S - 5
    assert state.pools["m"].capacity == 16  # configured until replicas report
    state.replica_heartbeat("m", "r1", 16, now=t0)
    signals = state.replica_heartbeat("m", "r2", 16, now=t0 + 1)  # autoscaling added one
    assert state.pools["m"].capacity == 32 and signals["dispatcher_queue_depth"] == 0.0
    state.replica_heartbeat("m", "r2", 16, now=t0 + HEARTBEAT_TTL_S + 5)  # r1 went away
    assert state.pools["m"].capacity == 16
    state.replica_heartbeat("dedicated:acme", "d1", 4, now=t0 + HEARTBEAT_TTL_S + 5)
    state.replica_heartbeat("dedicated:acme", "d2", 4, now=t0 + HEARTBEAT_TTL_S + 5)
    assert state.dedicated["acme"].capacity == 8
    # a config change keeps what the replicas reported
    state.configure(replace(state.config, version=state.config.version + 1))
    assert state.dedicated["acme"].capacity == 8


def test_dedicated_reservation_is_the_autoscaling_floor() -> None:
    fixed = dedicated_replica(DedicatedSpec(model="m", reserved_replicas=2, max_replicas=2))
    assert fixed.num_replicas == 2 and fixed.autoscaling is None
    burst = dedicated_replica(DedicatedSpec(model="m", reserved_replicas=2, max_replicas=5))
    assert burst.autoscaling is not None
    assert burst.autoscaling.min_replicas == 2 and burst.autoscaling.max_replicas == 5


def test_finished_ids_are_refused_on_arrival_until_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A finish that beat its admit (the caller gave up) refuses that admit for
    FORGET_AFTER_S; then the id is forgotten, oldest first, and the list stays short."""
    from deployments.tenancy import admission as module

    clock = [1000.0]
    fake_time = type("FakeTime", (), {"monotonic": staticmethod(lambda: clock[0]),
                                      "time": staticmethod(time.time)})
    monkeypatch.setattr(module, "time", fake_time)  # this module's clock only, not asyncio's

    async def main() -> None:
        state = AdmissionState(_config(GLOBEX, shared=100))
        state.finish("early")  # the caller gave up before its admit arrived
        late = await state.admit(_ask("early", "globex"))
        assert late.refusal is not None and late.refusal.reason == "abandoned"
        for i in range(50):
            state.finish(f"old{i}")
        clock[0] += module.FORGET_AFTER_S + 1
        state.finish("new")
        assert set(state._forgotten) == {"new"}, "expired ids are not dropped"
        again = await state.admit(_ask("early", "globex"))
        assert again.admitted, "an id finished long ago still refused"

    _run(main())


def test_the_actor_admits_with_the_config_it_was_made_with(local_ray) -> None:  # type: ignore[no-untyped-def]
    """The config given at creation is in force at once, with no configure call: a
    restarted actor must know the tenants before any ingress calls it again."""
    from deployments.tenancy.actor import get_admission

    actor = get_admission("units-fresh-actor", _config(GLOBEX, version=7.0))
    try:
        assert local_ray.get(actor.ping.remote(), timeout=60) == 7.0
        admission = local_ray.get(actor.admit.remote(_ask("g1", "globex")), timeout=30)
        assert admission.admitted, admission.refusal
    finally:
        local_ray.kill(actor)


def test_a_tenant_shard_reserves_limits_and_leaves_the_spill_seat_to_the_shared_shard() -> None:
    """deployments.tenancy.shards: acme's own shard decides its limits and private seats;
    its spill is seated by the shared shard, which counts no limit twice and records no
    usage twice."""

    async def main() -> None:
        acme = replace(ACME, rpm=2)
        own_pool = {"dedicated:acme": PoolSeats("dedicated:acme", "dedicated", 1)}
        own = AdmissionState(AdmissionConfig({"acme": acme}, own_pool, shard="acme"))
        shared = AdmissionState(
            AdmissionConfig({"acme": acme, "globex": GLOBEX}, {"m": PoolSeats("m", "shared", 4)})
        )
        first = await own.admit(_ask("a1", "acme"))
        assert (first.tier, first.seat_elsewhere) == ("dedicated", False)
        second = await own.admit(_ask("a2", "acme"))
        assert (second.tier, second.spill, second.band) == ("shared", True, 0)
        assert second.seat_elsewhere and "a2" in own.claims  # its limits stay reserved here
        third = await own.admit(_ask("a3", "acme"))
        assert third.refusal is not None and third.refusal.reason == "rpm"

        # The shared shard seats spills without the limits (3 > rpm 2: all seated).
        for claim in ("a2", "b1", "b2"):
            seated = await shared.admit(_ask(claim, "acme", limits_reserved=True))
            assert (seated.tier, seated.spill, seated.band) == ("shared", True, 0)
            assert not seated.seat_elsewhere
        assert shared.pools["m"].in_use == 3

        recorded: list[UsageRecord] = []
        shared.record = recorded.append  # type: ignore[method-assign]  # observe, not replace
        own.record = recorded.append  # type: ignore[method-assign]
        usage = _usage("a2", "acme", "shared", 5, 7, spill=True)
        assert shared.finish("a2", usage, record=False)
        assert own.finish("a2", usage)
        assert recorded == [usage]  # once, by acme's own shard
        assert shared.pools["m"].in_use == 2 and "a2" not in own.claims

    _run(main())


def test_a_tenant_shard_moves_a_lost_replicas_request_to_a_shared_seat_elsewhere() -> None:
    """A front-door tenant's replica is lost before the first output: its own shard gives
    up the seat and, having no shared pool, asks for one elsewhere (the shared shard)."""

    async def main() -> None:
        own_pool = {"dedicated:acme": PoolSeats("dedicated:acme", "dedicated", 1)}
        own = AdmissionState(AdmissionConfig({"acme": ACME}, own_pool, shard="acme"))
        own.replica_heartbeat("dedicated:acme", "d1", 1, actor_id="actor-d1")
        first = await own.admit(_ask("a1", "acme"))
        assert first.tier == "dedicated"
        moved = await own.reseat("a1", "dedicated:acme", "actor-d1")
        assert moved.seat_elsewhere and (moved.tier, moved.spill, moved.band) == ("shared", True, 0)
        assert "a1" in own.claims and own.dedicated["acme"].in_use == 0

    _run(main())
