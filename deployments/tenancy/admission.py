"""Admission, shared by every ingress replica: one `admit` and one `finish` per request.

`admit` checks the tenant's rate limits, picks the tier (its dedicated copy; else spill to
the shared pool, or refuse when it chose no spill) and waits in the shared pool's fair
queue, all in one call. Whatever the request then holds (a rate-limit reservation, a seat)
is one claim, named by the request's claim id. `finish` settles it on the tokens really
used, which is what fair share and TPM count, and hands the usage to the ledger writer
(batched, asynchronous: the database is never on the request path).

Claims survive their holders failing:
- an ingress replica that stops reporting for `OWNER_TTL_S` is gone, and all its claims
  are settled (seats, concurrency slots and TPM reservations alike);
- the actor itself restarts after death (state in memory is lost), and each ingress
  re-registers the claims it still holds on its next heartbeat.

`AdmissionState` is plain Python (tested without Ray); `AdmissionActor` is the instance.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from deployments.observability.admission import AdmissionExporter
from deployments.state.writer import LedgerWriter
from deployments.tenancy.fair_queue import FairDispatcher, QueueFull, QueueTimeout, Ticket
from deployments.tenancy.metering import ReservationClock
from deployments.tenancy.rate_limits import RateLimitState
from deployments.tenancy.replica_seats import HEARTBEAT_TTL_S, LossLog, ReplicaSeats
from deployments.tenancy.types import (
    Admission,
    AdmissionConfig,
    AdmissionRequest,
    AdmissionSnapshot,
    HeartbeatReply,
    HeldClaim,
    PoolState,
    RateLimitStatus,
    Refusal,
    RefusalReason,
    ServedUsage,
    TenantPolicy,
    UsageRecord,
)

# An ingress replica not heard from for this long is gone (crashed, replaced): everything
# its requests held is settled. Ingress replicas report at each health check, and the
# claims are settled at the next report of any of them: within TTL + one period of the
# last report of the dead one, i.e. within 50 s of its death (the README's 60 s).
INGRESS_HEARTBEAT_S = 10.0
OWNER_TTL_S = 4 * INGRESS_HEARTBEAT_S
# A claim finished before its admit ran (the caller gave up first) is refused on arrival;
# such ids, and recently finished ones (never re-registered), are kept this long.
FORGET_AFTER_S = 2 * OWNER_TTL_S
ABANDONED = Refusal("abandoned", 0.0)


@dataclass
class Seats:
    """A dedicated deployment's seats: replicas alive x max_num_seqs."""

    capacity: int
    in_use: int = 0


@dataclass
class Claim:
    request: AdmissionRequest
    reservation: int | None
    admission: Admission | None = None  # None while it waits for a seat
    ticket: Ticket | None = None  # a shared-pool seat
    dedicated: bool = False  # a seat of the tenant's private copy
    waiter: asyncio.Task | None = field(default=None, repr=False)
    served: UsageRecord | None = None  # the model server's count, billed if orphaned


def _current_task() -> asyncio.Task | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # called with no event loop running (plain-Python tests)
        return None


class AdmissionState:
    """Plain-Python core of the actor (unit-testable without Ray)."""

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = AdmissionConfig(tenants={}, pools={}, version=-1.0)
        self.limits = RateLimitState()
        self.ledger: LedgerWriter | None = None  # None: usage is checked, then dropped
        self.reservations = ReservationClock(max_gap_s=HEARTBEAT_TTL_S)
        self.pools: dict[str, FairDispatcher] = {}
        self.dedicated: dict[str, Seats] = {}
        self.claims: dict[str, Claim] = {}
        self.exporter = AdmissionExporter({})
        self._forgotten: dict[str, float] = {}  # claim id -> when it was finished
        self._owner_seen: dict[str, float] = {}  # ingress replica -> last heard from
        self.replica_seats = ReplicaSeats()
        self.losses = LossLog()
        AdmissionState.configure(self, config)  # not an override: the actor's is async

    # ---- configuration, applied in place ---------------------------------------------
    def configure(self, config: AdmissionConfig) -> float:
        """Adopt `config` unless a newer one is in force; returns the version in force.

        Limits, weights and tiers change at once; windows, seats, claims and usage stay.
        """
        if config.version < self.config.version:
            return self.config.version
        self.config = config
        for key, pool in config.pools.items():
            capacity = self.replica_seats.capacity(key, pool.seats)
            if pool.tier == "shared":
                if key not in self.pools:
                    self.pools[key] = FairDispatcher(capacity, config.max_queue_len)
                self.pools[key].max_queue_len = config.max_queue_len
            else:
                tenant = key.split(":", 1)[1]
                seats = self.dedicated.setdefault(tenant, Seats(pool.seats))
                seats.capacity = capacity
        self.exporter.facts = dict(config.pools)
        return config.version

    # ---- the two calls of a request ------------------------------------------------
    async def admit(self, req: AdmissionRequest) -> Admission:
        """Reserve against the tenant's limits, pick the tier, wait for a seat."""
        now = time.monotonic()
        if req.owner:
            self._owner_seen[req.owner] = now
        policy = self.config.tenants.get(req.tenant)
        if policy is None:
            return self._refused(req, "unknown_tenant", 1.0)
        if req.claim_id in self._forgotten:  # finished by its caller before it got here
            return self._refused(req, "abandoned", 0.0)
        reservation, status = None, RateLimitStatus()
        if not req.limits_reserved:  # else the tenant's own shard reserved them
            decision = self.limits.reserve(req.tenant, req.cost, policy, now)
            if decision.refusal is not None:
                return Admission(req.claim_id, decision.status, refusal=decision.refusal)
            reservation, status = decision.reservation_id, decision.status
        claim = Claim(req, reservation)
        self.claims[req.claim_id] = claim
        try:
            admission = await self._seat(claim, policy, status)
        except asyncio.CancelledError:
            self._settle(req.claim_id, 0)
            raise
        if admission.admitted and req.claim_id in self.claims:
            claim.admission = admission
            return admission
        self._settle(req.claim_id, 0)  # refused, or finished by its caller meanwhile
        return admission if not admission.admitted else self._refused(req, "abandoned", 0.0)

    def finish(self, claim_id: str, usage: UsageRecord | None = None, record: bool = True) -> bool:
        """Settle a claim on the tokens really used and record the usage (unless another
        shard records it: `record`). Idempotent: a replayed finish records nothing twice.
        False when the claim was not held here."""
        if usage is not None and record:
            self.record(usage)
        return self._settle(claim_id, usage.total_tokens if usage else 0)

    async def reseat(
        self, claim_id: str, pool_key: str | None = None, actor_id: str | None = None
    ) -> Admission:
        """A dedicated request whose replica was lost before its first output (that loss
        reported as `replica_lost(pool_key, actor_id)`): give up its seat and seat it
        again, on another dedicated replica if one has room, else as spill (or refuse
        when its tenant chose no spill, settling the claim). Limits are not charged again."""
        if pool_key is not None:
            self.replica_lost(pool_key, actor_id)
        claim = self.claims.get(claim_id)
        policy = self.config.tenants.get(claim.request.tenant) if claim else None
        if claim is None or policy is None or claim.admission is None:
            return Admission(claim_id, refusal=ABANDONED)
        if claim.dedicated:
            claim.dedicated = False
            seats = self.dedicated[claim.request.tenant]
            seats.in_use = max(0, seats.in_use - 1)
        limits = claim.admission.limits
        claim.admission = None
        admission = await self._seat(claim, policy, limits)
        if admission.admitted and claim_id in self.claims:
            claim.admission = admission
            return admission
        self._settle(claim_id, 0)  # refused, or finished by its caller meanwhile
        return admission if admission.refusal else Admission(claim_id, refusal=ABANDONED)

    def record(self, usage: UsageRecord) -> None:
        """The one path usage takes to billing. The ledger drops a replayed request id."""
        if self.ledger is not None:
            self.ledger.add(usage)

    async def _seat(self, claim: Claim, policy: TenantPolicy, limits: RateLimitStatus) -> Admission:
        req = claim.request
        spill = False
        if policy.dedicated_model == req.model and req.prefer_dedicated:
            seats = self.dedicated.get(req.tenant)
            if seats is not None and seats.in_use < seats.capacity:
                seats.in_use += 1
                claim.dedicated = True
                return Admission(req.claim_id, limits, "dedicated", False, policy.priority)
            if not policy.spill:
                return self._refused(req, "dedicated_saturated", 1.0, limits)
            spill = True
        band = 0 if spill else policy.priority  # spilled traffic runs at shared priority
        dispatcher = self.pools.get(req.model)
        if dispatcher is None and self.config.shard is not None:
            # A tenant's shard has no shared pool: the shared shard seats it next.
            return Admission(req.claim_id, limits, "shared", spill, band, seat_elsewhere=True)
        if dispatcher is None:
            return self._refused(req, "no_shared_pool", 1.0, limits)
        claim.waiter = asyncio.current_task()
        try:
            ticket = await dispatcher.acquire(
                req.tenant, band, policy.weight, req.cost, self.config.queue_deadline_s
            )
        except QueueTimeout as exc:
            self.exporter.observe_wait(req.model, band, exc.waited_s)
            return self._refused(req, "queue_deadline", exc.retry_after_s, limits)
        except QueueFull as exc:
            return self._refused(req, "queue_full", exc.retry_after_s, limits)
        finally:
            claim.waiter = None
        self.exporter.observe_wait(req.model, band, ticket.waited_s)
        claim.ticket = ticket
        return Admission(req.claim_id, limits, "shared", spill, band, ticket.waited_s)

    @staticmethod
    def _refused(
        req: AdmissionRequest,
        reason: RefusalReason,
        retry_after_s: float,
        limits: RateLimitStatus | None = None,
    ) -> Admission:
        return Admission(
            req.claim_id, limits or RateLimitStatus(), refusal=Refusal(reason, retry_after_s)
        )

    def _settle(self, claim_id: str, actual_tokens: int) -> bool:
        now = time.monotonic()
        self._forgotten.pop(claim_id, None)  # re-inserted last: the dict stays in time order
        self._forgotten[claim_id] = now
        expired = []
        for old, at in self._forgotten.items():  # oldest first; stop at the first kept
            if now - at <= FORGET_AFTER_S:
                break
            expired.append(old)
        for old in expired:
            del self._forgotten[old]
        claim = self.claims.pop(claim_id, None)
        if claim is None:
            return False
        self.limits.settle(claim.reservation, actual_tokens)
        if claim.ticket is not None:
            self.pools[claim.request.model].release(claim.ticket, actual_tokens)
        if claim.dedicated:
            seats = self.dedicated[claim.request.tenant]
            seats.in_use = max(0, seats.in_use - 1)
        if claim.waiter is not None and claim.waiter is not _current_task():
            claim.waiter.cancel()  # its caller gave up: leave the queue now
        return True

    # ---- ingress replicas: liveness and re-registration -------------------------------
    def ingress_heartbeat(
        self, owner: str, held: list[HeldClaim], now: float | None = None
    ) -> HeartbeatReply:
        """An ingress replica is alive and holds `held`. Claims unknown here (the actor
        restarted) are counted again; silent replicas' claims are settled."""
        now = time.monotonic() if now is None else now
        self._owner_seen[owner] = now
        restored = sum(self._restore(h, now) for h in held)
        return HeartbeatReply(self.config.version, restored, self.reclaim_orphans(now))

    def _restore(self, held: HeldClaim, now: float) -> bool:
        req, admission = held.request, held.admission
        if req.claim_id in self.claims or req.claim_id in self._forgotten:
            return False
        at = now - max(0.0, time.time() - held.admitted_at)
        reservation = (
            None if req.limits_reserved else self.limits.restore(req.tenant, req.cost, at, now)
        )
        claim = Claim(req, reservation, admission)
        if admission.tier == "dedicated":
            self.dedicated.setdefault(req.tenant, Seats(0)).in_use += 1
            claim.dedicated = True
        elif admission.tier == "shared" and req.model in self.pools:
            policy = self.config.tenants.get(req.tenant) or TenantPolicy(req.tenant)
            claim.ticket = self.pools[req.model].grant_now(
                req.tenant, admission.band, policy.weight, req.cost
            )
        self.claims[req.claim_id] = claim
        return True

    def reclaim_orphans(self, now: float | None = None) -> int:
        """Settle every claim of ingress replicas that stopped reporting (a crash or a
        replacement ends their requests without a finish)."""
        now = time.monotonic() if now is None else now
        gone = {o for o, seen in self._owner_seen.items() if now - seen > OWNER_TTL_S}
        if not gone:
            return 0
        orphans = [c for c, claim in self.claims.items() if claim.request.owner in gone]
        for claim_id in orphans:
            served = self.claims[claim_id].served
            if served is not None:  # its ingress billed nothing: the model server's count
                self.record(served)
            self._settle(claim_id, served.total_tokens if served else 0)
        for owner in gone:
            del self._owner_seen[owner]
        return len(orphans)

    # ---- model-server replicas: capacity follows the replicas alive -------------------
    def replica_heartbeat(
        self,
        pool_key: str,
        replica_id: str,
        seats: int,
        now: float | None = None,
        actor_id: str = "",
        served: Sequence[ServedUsage] = (),
    ) -> dict[str, float]:
        """A model-server replica is alive with `seats`, and `served` is what it produced
        for requests that ended since its last beat; returns its pool's queue signals
        (the autoscaling policy reads them). Autoscaling changes the replica count, and
        with it the seats admission hands out."""
        now = time.monotonic() if now is None else now
        for usage in served:  # kept only while the claim is held (not yet finished)
            claim = self.claims.get(usage.claim_id)
            if claim is not None:
                claim.served = usage.record
        self.replica_seats.beat(pool_key, replica_id, seats, now, actor_id)
        self._apply_capacity(pool_key, now)
        planned = self.config.pools.get(pool_key)
        if pool_key in self.pools:
            dispatcher = self.pools[pool_key]
            recent = dispatcher.wait_times[-50:]
            return {
                "dispatcher_queue_depth": float(dispatcher.depth),
                "dispatcher_mean_wait_s": sum(recent) / len(recent) if recent else 0.0,
            }
        tenant = pool_key.split(":", 1)[-1]
        if planned is not None and planned.tier == "dedicated" and self.ledger is not None:
            for row in self.reservations.beat(tenant, planned.model, replica_id):
                self.ledger.add_reservation(row)
        return {"dispatcher_queue_depth": 0.0, "dispatcher_mean_wait_s": 0.0}

    def replica_lost(self, pool_key: str, actor_id: str | None) -> None:
        """A replica of `pool_key` is known dead (its actor, `actor_id` when known, died
        under a request; or it retired itself): its seats go now, not at the TTL."""
        planned = self.config.pools.get(pool_key)
        dedicated = planned is not None and planned.tier == "dedicated"
        self.replica_seats.drop(pool_key, actor_id, dedicated)
        self._apply_capacity(pool_key)
        self.losses.add(pool_key)

    async def next_loss(self, after: int, timeout_s: float) -> tuple[int, list[str]]:
        """Long poll of an ingress: the pools that lost a replica after loss `after`."""
        return await self.losses.after(after, timeout_s)

    def _apply_capacity(self, pool_key: str, now: float | None = None) -> None:
        planned = self.config.pools.get(pool_key)
        capacity = self.replica_seats.capacity(pool_key, planned.seats if planned else 0, now)
        if pool_key in self.pools:
            self.pools[pool_key].set_capacity(capacity)
        elif (tenant := pool_key.split(":", 1)[-1]) in self.dedicated:
            self.dedicated[tenant].capacity = capacity

    def live_replicas(self, pool_key: str, now: float | None = None) -> int:
        """Replicas of a pool heard from within the heartbeat TTL."""
        return self.replica_seats.live_replicas(pool_key, now)

    def snapshot(self) -> AdmissionSnapshot:
        return AdmissionSnapshot(
            pools={
                name: PoolState(
                    d.capacity, d.in_use, d.depth, d.depth_by_band(), dict(d.served_tokens)
                )
                for name, d in self.pools.items()
            },
            dedicated={name: PoolState(s.capacity, s.in_use) for name, s in self.dedicated.items()},
        )
