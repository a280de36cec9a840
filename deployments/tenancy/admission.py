"""Admission state shared by every ingress replica: one named Ray actor.

It holds the rate-limit windows, the usage meter, each dedicated deployment's free
capacity (the spill decision) and the shared pools' fair dispatchers, so that limits and
fairness hold across all ingress replicas rather than per replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import asdict

import ray

from deployments.observability.admission import EXPORT_INTERVAL_S, AdmissionExporter, PoolFacts
from deployments.tenancy.fair_queue import FairDispatcher, QueueFull, QueueTimeout
from deployments.tenancy.rate_limits import Limits, RateLimitState
from deployments.tenancy.usage import UsageMeter

ACTOR_NAME = "tiered-admission"
ACTOR_NAMESPACE = "tiered"
HEARTBEAT_TTL_S = 15.0  # a replica not heard from for this long no longer counts as capacity
# A ticket given up before its grant, whose grant never came (the wait itself was
# cancelled or timed out), is forgotten after this long.
ABANDONED_TTL_S = 900.0
# An ingress replica not heard from for this long is gone (crashed, replaced): the seats
# its requests held go back to their pools. Ingress replicas report at each health check.
INGRESS_HEARTBEAT_S = 10.0
OWNER_TTL_S = 6 * INGRESS_HEARTBEAT_S


def admission_actor_name(config: dict) -> str:
    """One admission actor per app config; the ingress and model servers derive the same."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return f"{ACTOR_NAME}-{digest}"


class AdmissionState:
    """Plain-Python core of the actor (unit-testable without Ray)."""

    def __init__(
        self,
        pools: dict[str, int],
        dedicated: dict[str, int],
        max_queue_len: int,
        facts: dict[str, PoolFacts] | None = None,
    ) -> None:
        self.exporter = AdmissionExporter(facts or {})
        self.limits = RateLimitState()
        self.usage = UsageMeter()
        self.pools = {name: FairDispatcher(cap, max_queue_len) for name, cap in pools.items()}
        self.dedicated_capacity = dict(dedicated)
        self.dedicated_in_use = dict.fromkeys(dedicated, 0)
        self._held: dict[str, tuple[str, str]] = {}  # ticket -> ("pool"|"dedicated", name)
        # Capacity follows the replicas that are alive: pool key -> replica -> (seats, seen).
        self._configured = {**pools, **{f"dedicated:{t}": c for t, c in dedicated.items()}}
        self._seats: dict[str, dict[str, tuple[int, float]]] = {}
        # ticket -> when: finished by the caller before the grant arrived
        self._abandoned: dict[str, float] = {}
        self._owner_of: dict[str, str] = {}  # ticket -> the ingress replica holding it
        self._owner_seen: dict[str, float] = {}  # ingress replica -> last heard from

    def reserve(self, tenant: str, tokens: int, limits: dict) -> dict:
        return asdict(self.limits.reserve(tenant, tokens, Limits(**limits)))

    def try_dedicated(self, tenant: str, ticket: str, owner: str | None = None) -> bool:
        """Take a slot of the tenant's private deployment; False when it is saturated."""
        if self.dedicated_in_use[tenant] >= self.dedicated_capacity[tenant]:
            return False
        self.dedicated_in_use[tenant] += 1
        self._hold(ticket, ("dedicated", tenant), owner)
        return self._keep_unless_abandoned(ticket)

    async def acquire_shared(
        self,
        pool: str,
        tenant: str,
        band: int,
        weight: float,
        cost: int,
        deadline_s: float,
        ticket: str,
        owner: str | None = None,
    ) -> dict:
        try:
            granted = await self.pools[pool].acquire(tenant, band, weight, cost, deadline_s)
            waited = granted.waited_s
            self.exporter.observe_wait(pool, band, waited)
        except QueueTimeout as exc:
            self.exporter.observe_wait(pool, band, exc.waited_s)
            return {"ticket": None, "reason": "queue_deadline", "retry_after_s": exc.retry_after_s}
        except QueueFull:
            return {"ticket": None, "reason": "queue_full", "retry_after_s": 1.0}
        self._hold(ticket, ("pool", pool), owner)
        if not self._keep_unless_abandoned(ticket):
            return {"ticket": None, "reason": "abandoned", "retry_after_s": 0.0}
        return {"ticket": ticket, "waited_s": waited}

    def _hold(self, ticket: str, held: tuple[str, str], owner: str | None) -> None:
        self._held[ticket] = held
        if owner is not None:
            self._owner_of[ticket] = owner
            self._owner_seen[owner] = time.monotonic()

    def ingress_heartbeat(self, owner: str, now: float | None = None) -> int:
        """An ingress replica is alive; returns how many orphaned seats were reclaimed."""
        now = time.monotonic() if now is None else now
        self._owner_seen[owner] = now
        return self.reclaim_orphans(now)

    def reclaim_orphans(self, now: float | None = None) -> int:
        """Release the seats of ingress replicas that stopped reporting (a crash or a
        replacement ends their streams without a release)."""
        now = time.monotonic() if now is None else now
        gone = {o for o, seen in self._owner_seen.items() if now - seen > OWNER_TTL_S}
        if not gone:
            return 0
        orphans = [t for t, o in self._owner_of.items() if o in gone]
        for ticket in orphans:
            self._release(ticket)
        for owner in gone:
            del self._owner_seen[owner]
        return len(orphans)

    def _keep_unless_abandoned(self, ticket: str) -> bool:
        """A caller that gave up (client gone) already called finish: release at once."""
        if self._abandoned.pop(ticket, None) is not None:
            self._release(ticket)
            return False
        return True

    def _abandon(self, ticket: str) -> None:
        now = time.monotonic()
        self._abandoned[ticket] = now
        for old in [t for t, at in self._abandoned.items() if now - at > ABANDONED_TTL_S]:
            del self._abandoned[old]

    def _release(self, ticket: str) -> bool:
        held = self._held.pop(ticket, None)
        self._owner_of.pop(ticket, None)
        if held is None:
            return False
        kind, name = held
        if kind == "pool":
            self.pools[name].release()
        else:
            self.dedicated_in_use[name] = max(0, self.dedicated_in_use[name] - 1)
        return True

    def finish(
        self,
        ticket: str | None,
        reservation_id: int | None,
        actual_tokens: int,
        usage: dict | None,
        granted: bool = True,
    ) -> None:
        """Release the slot, settle the tokens and meter the usage, in one call.

        `granted=False` means the caller gave up while its slot request was in flight: if
        the grant comes later, it is released on arrival.
        """
        if ticket is not None and not self._release(ticket) and not granted:
            self._abandon(ticket)
        if reservation_id is not None:
            self.limits.settle(reservation_id, actual_tokens)
        if usage:
            self.usage.record(**usage)

    def replica_heartbeat(
        self, pool_key: str, replica_id: str, seats: int, now: float | None = None
    ) -> dict[str, float]:
        """A model-server replica is alive with `seats`; returns its pool's queue signals.

        Pool keys are the model name (shared pool) or `dedicated:<tenant>`. Autoscaling
        changes the replica count, and with it the seats the dispatcher hands out.
        """
        now = time.monotonic() if now is None else now
        replicas = self._seats.setdefault(pool_key, {})
        replicas[replica_id] = (seats, now)
        for rid in [r for r, (_, seen) in replicas.items() if now - seen > HEARTBEAT_TTL_S]:
            del replicas[rid]
        capacity = sum(s for s, _ in replicas.values()) or self._configured.get(pool_key, 0)
        if pool_key in self.pools:
            dispatcher = self.pools[pool_key]
            dispatcher.set_capacity(capacity)
            recent = dispatcher.wait_times[-50:]
            return {
                "dispatcher_queue_depth": float(dispatcher.depth),
                "dispatcher_mean_wait_s": sum(recent) / len(recent) if recent else 0.0,
            }
        tenant = pool_key.removeprefix("dedicated:")
        if tenant in self.dedicated_capacity:
            self.dedicated_capacity[tenant] = capacity
        return {"dispatcher_queue_depth": 0.0, "dispatcher_mean_wait_s": 0.0}

    def live_replicas(self, pool_key: str, now: float | None = None) -> int:
        """Replicas of a pool heard from within the heartbeat TTL."""
        now = time.monotonic() if now is None else now
        seen = self._seats.get(pool_key, {}).values()
        return sum(1 for _, at in seen if now - at <= HEARTBEAT_TTL_S)

    def snapshot(self) -> dict:
        return {
            "usage": self.usage.snapshot(),
            "pools": {
                name: {
                    "capacity": d.capacity,
                    "in_use": d.in_use,
                    "queued": d.depth,
                    "served_tokens": dict(d.served_tokens),
                }
                for name, d in self.pools.items()
            },
            "dedicated": {
                name: {"capacity": cap, "in_use": self.dedicated_in_use[name]}
                for name, cap in self.dedicated_capacity.items()
            },
        }


@ray.remote(num_cpus=0, max_concurrency=10_000)
class AdmissionActor(AdmissionState):
    """The shared instance. Async actor: waiters in the fair queue cost no threads."""

    _exporting: asyncio.Task | None = None

    async def ping(self) -> bool:
        await asyncio.sleep(0)
        return True

    async def replica_heartbeat(  # type: ignore[override]
        self, pool_key: str, replica_id: str, seats: int, now: float | None = None
    ) -> dict[str, float]:
        self._start_exporting()
        return super().replica_heartbeat(pool_key, replica_id, seats, now)

    def _start_exporting(self) -> None:
        """Begin the metrics loop on the actor's event loop (not available in __init__)."""
        if self._exporting is None or self._exporting.done():
            self._exporting = asyncio.get_running_loop().create_task(self._export_forever())

    async def _export_forever(self) -> None:
        while True:
            self.exporter.export(self)
            await asyncio.sleep(EXPORT_INTERVAL_S)


def get_admission(  # type: ignore[no-untyped-def]
    name: str,
    pools: dict[str, int],
    dedicated: dict[str, int],
    max_queue_len: int,
    facts: dict[str, PoolFacts] | None = None,
):
    """The one admission actor of an app (keyed by its config), made by the first ingress.

    Detached, so that it outlives any one ingress replica; a new config gets a new actor.
    """
    return AdmissionActor.options(
        name=name,
        namespace=ACTOR_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
    ).remote(pools, dedicated, max_queue_len, facts)
