"""Admission when a model-server replica is lost, without Ray: a dedicated reservation's
seats go at once (its tenant spills, a request already seated there moves to the shared
pool), and the usage a model server reports backs up the billing of a request whose
ingress died before finishing it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from deployments.config.plan import BilledTier
from deployments.state.config import StateSpec
from deployments.state.ledger import Ledger
from deployments.state.store import StateStore
from deployments.state.types import UsageQuery
from deployments.state.writer import LedgerWriter
from deployments.tenancy.admission import OWNER_TTL_S, AdmissionState
from deployments.tenancy.types import (
    AdmissionConfig,
    AdmissionRequest,
    PoolSeats,
    ServedUsage,
    TenantPolicy,
    UsageRecord,
)

ACME = TenantPolicy("acme", priority=3, dedicated_model="m", spill=True)
STARK = TenantPolicy("stark", dedicated_model="m", spill=False)
DEDICATED = "dedicated:acme"


def _state(*tenants: TenantPolicy) -> AdmissionState:
    pools = {"m": PoolSeats("m", "shared", 4)}
    for t in tenants:
        pools[f"dedicated:{t.name}"] = PoolSeats(f"dedicated:{t.name}", "dedicated", 1)
    return AdmissionState(
        AdmissionConfig({t.name: t for t in tenants}, pools, queue_deadline_s=5.0)
    )


def _ask(claim: str, tenant: str = "acme", owner: str = "i1") -> AdmissionRequest:
    return AdmissionRequest(claim, tenant, "m", 10, owner=owner)


def _usage(request_id: str, completion: int, tier: BilledTier = "dedicated") -> UsageRecord:
    return UsageRecord(request_id, "acme", "m", tier, False, 5, 0, completion, 0.0, 1.0)


def _run(coro: Coroutine) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_lost_dedicated_replica_spills_its_tenant_until_a_replica_reports() -> None:
    async def main() -> None:
        state = _state(ACME)
        state.replica_heartbeat(DEDICATED, "d1", 1, actor_id="actor-d1")
        first = await state.admit(_ask("a1"))
        assert first.tier == "dedicated"
        state.replica_lost(DEDICATED, "actor-d1")  # its stream failed: the actor died
        assert state.dedicated["acme"].capacity == 0
        moved = await state.reseat("a1")  # a1 had no token yet: sent again, as spill
        assert (moved.tier, moved.spill, moved.band) == ("shared", True, 0)
        assert state.dedicated["acme"].in_use == 0 and state.pools["m"].in_use == 1
        later = await state.admit(_ask("a2"))
        assert (later.tier, later.spill) == ("shared", True)
        # The dead replica's heartbeat age no longer matters: a replacement reports.
        state.replica_heartbeat(DEDICATED, "d2", 1, actor_id="actor-d2")
        assert (await state.admit(_ask("a3"))).tier == "dedicated"

    _run(main())


def test_a_tenant_without_spill_is_refused_and_its_claim_settled() -> None:
    async def main() -> None:
        state = _state(STARK)
        state.replica_heartbeat("dedicated:stark", "s1", 1, actor_id="actor-s1")
        assert (await state.admit(_ask("s1", "stark"))).tier == "dedicated"
        refused = await state.reseat("s1", "dedicated:stark", "actor-s1")
        assert refused.refusal is not None and refused.refusal.reason == "dedicated_saturated"
        assert "s1" not in state.claims and state.dedicated["stark"].in_use == 0

    _run(main())


def test_an_unnamed_loss_drops_a_reservation_until_its_live_replicas_report() -> None:
    """A request that failed before its first output does not know which replica it
    reached: a dedicated pool's seats all go, and each live replica's next heartbeat
    (one health-check period) brings its own back. A shared pool keeps its seats."""
    state = _state(ACME)
    now = time.monotonic()
    state.replica_heartbeat(DEDICATED, "d1", 1, now=now, actor_id="actor-d1")
    state.replica_heartbeat("m", "r1", 4, now=now, actor_id="actor-r1")
    state.replica_lost(DEDICATED, None)
    state.replica_lost("m", None)
    assert state.dedicated["acme"].capacity == 0 and state.pools["m"].capacity == 4
    state.replica_heartbeat(DEDICATED, "d1", 1, now=now + 2, actor_id="actor-d1")
    assert state.dedicated["acme"].capacity == 1
    state.replica_lost("m", "actor-r1")  # a named shared replica's seats go too
    assert state.pools["m"].capacity == 0


def test_a_reseat_of_a_claim_no_longer_held_is_abandoned() -> None:
    async def main() -> None:
        state = _state(ACME)
        gone = await state.reseat("never-admitted", DEDICATED, None)
        assert gone.refusal is not None and gone.refusal.reason == "abandoned"

    _run(main())


async def _with_ledger(tmp_path: Path) -> tuple[AdmissionState, StateStore]:
    store = await StateStore.open(StateSpec(url=f"sqlite:///{tmp_path / 'l.db'}"))
    state = _state(ACME)
    state.ledger = LedgerWriter(Ledger(store))
    state.ledger.start()
    return state, store


async def _billed(state: AdmissionState, store: StateStore) -> tuple[int, int]:
    assert state.ledger is not None
    await state.ledger.flush(10)
    rows = await state.ledger.ledger.aggregate(UsageQuery())
    await state.ledger.stop()
    await store.close()
    return sum(r.requests for r in rows), sum(r.completion_tokens for r in rows)


def test_an_orphaned_claim_is_billed_from_the_model_servers_usage(tmp_path: Path) -> None:
    """The ingress died mid-stream: its claim is reclaimed as an orphan, and the usage
    the model server reported for it is billed (once, even if reported twice)."""

    async def main() -> None:
        state, store = await _with_ledger(tmp_path)
        now = time.monotonic()
        assert (await state.admit(_ask("c1", owner="dead"))).admitted
        served = ServedUsage("c1", _usage("chatcmpl-c1", 7))
        state.replica_heartbeat(DEDICATED, "d1", 1, now=now, served=[served])
        state.replica_heartbeat(DEDICATED, "d1", 1, now=now + 1, served=[served])
        state.ingress_heartbeat("alive", [], now + OWNER_TTL_S + 1)
        assert "c1" not in state.claims
        assert await _billed(state, store) == (1, 7)

    _run(main())


def test_a_finished_claim_drops_the_model_servers_usage(tmp_path: Path) -> None:
    """A normal finish bills the ingress's record; the model server's copy, before or
    after it, bills nothing."""

    async def main() -> None:
        state, store = await _with_ledger(tmp_path)
        assert (await state.admit(_ask("c1"))).admitted
        assert (await state.admit(_ask("c2"))).admitted
        state.replica_heartbeat(DEDICATED, "d1", 1, served=[ServedUsage("c1", _usage("r1", 9))])
        state.finish("c1", _usage("r1", 6))  # the client received 6 of the 9
        state.finish("c2", _usage("r2", 4))
        state.replica_heartbeat(DEDICATED, "d1", 1, served=[ServedUsage("c2", _usage("r2", 4))])
        state.ingress_heartbeat("alive", [], time.monotonic() + OWNER_TTL_S + 1)
        assert not state.claims and await _billed(state, store) == (2, 10)

    _run(main())


def test_ingresses_hear_of_a_lost_replica_at_once() -> None:
    """A request already sent to the dedicated deployment waits in Serve's router for a
    replica (it never sees the death): its ingress long-polls admission for losses and
    moves it when its pool loses a replica."""

    async def main() -> None:
        state = _state(ACME)
        state.replica_heartbeat(DEDICATED, "d1", 1, actor_id="actor-d1")
        seq, pools = await state.next_loss(0, 0.05)  # nothing lost yet: the poll times out
        assert pools == []
        waiting = asyncio.ensure_future(state.next_loss(seq, 5.0))
        await asyncio.sleep(0.01)
        state.replica_lost(DEDICATED, "actor-d1")
        seq, pools = await waiting
        assert pools == [DEDICATED]
        # An ingress that polls with a number newer than this actor's (it restarted)
        # learns the current one at once.
        assert (await state.next_loss(seq + 10, 5.0)) == (seq, [])

    _run(main())
