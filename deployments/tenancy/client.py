"""The ingress side of admission: one `admit` and one `finish` per request, and what
the ingress must remember so that an admission outage loses nothing.

- Claims it holds are listed on every heartbeat, so a restarted actor counts them again.
- A finish the actor did not acknowledge is kept and replayed; a usage record the actor
  took is kept until the database has it (`uncommitted`), and sent again if the actor
  restarted before writing it. The ledger counts a request id once, so a replay is safe.
- While the actor cannot be reached, requests are refused at once with a 503 instead of
  waiting on it; a background probe re-registers the claims and lifts the refusal.
- A tenant refused for its rate limits is refused again locally until the limit lifts
  (no actor round trip, no tokenization): a noisy tenant costs the front door little.

Finishes are sent from an empty task context: a client that goes away cancels its Serve
request, and Ray then cancels that request's child calls recursively (ray#52476), which
could drop the finish before the actor ran it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from deployments.tenancy.actor import get_admission
from deployments.tenancy.types import (
    Admission,
    AdmissionConfig,
    AdmissionRequest,
    AdmissionSnapshot,
    HeartbeatReply,
    HeldClaim,
    LedgerStatus,
    UsageRecord,
)

log = logging.getLogger(__name__)
RPC_TIMEOUT_S = 5.0  # a call that is not a queue wait: heartbeat, finish, probe
START_TIMEOUT_S = 60.0  # the first ingress may wait for the actor's process to start
QUEUE_MARGIN_S = 5.0  # admit may wait the queue deadline, plus this
PROBE_INTERVAL_S = 0.5
LOSS_POLL_S = 30.0  # one long poll for replica losses waits this long at most
CONCURRENCY_BLOCK_S = 0.25  # a slot may free any moment: remember such a refusal briefly
CONFIRM_BATCH = 5000  # request ids asked about per ledger_status call


class AdmissionUnavailable(Exception):
    """The admission actor cannot be reached now (dead, restarting, or re-registering)."""


def remote_outside_request(method: Any, *args: Any) -> Any:
    """`method.remote(*args)`, submitted so that cancelling the request cannot cancel it."""
    return contextvars.Context().run(method.remote, *args)


@dataclass
class _Block:
    until: float
    admission: Admission


class AdmissionClient:
    def __init__(self, app_name: str, config: AdmissionConfig, owner: str) -> None:
        self.app_name, self.config, self.owner = app_name, config, owner
        self.held: dict[str, HeldClaim] = {}
        self.unacknowledged: dict[str, UsageRecord | None] = {}  # claim id -> its finish
        self.uncommitted: dict[str, UsageRecord] = {}  # request id -> a record not yet in the DB
        self._blocked: dict[str, _Block] = {}
        self._settle_only: set[str] = set()  # claims whose usage another shard records
        self._handle: ActorHandle | None = None
        self._recovering: asyncio.Task | None = None
        self._losses: dict[str, asyncio.Event] = {}  # pool key -> set at its next loss
        self._watching: asyncio.Task | None = None

    @property
    def actor(self) -> ActorHandle:
        if self._handle is None:
            self._handle = get_admission(self.app_name, self.config)
        return self._handle

    async def start(self) -> None:
        """Make or find the actor and apply this replica's config (newest wins)."""
        await asyncio.wait_for(self.actor.configure.remote(self.config), START_TIMEOUT_S)
        self._watching = asyncio.get_running_loop().create_task(self._watch_losses())

    def next_loss(self, pool_key: str) -> asyncio.Event:
        """Set when `pool_key` next loses a replica (admission says so)."""
        return self._losses.setdefault(pool_key, asyncio.Event())

    async def _watch_losses(self) -> None:
        """Long-poll admission for replica losses, for the requests waiting on them."""
        seq = 0
        pools: list[str]
        while True:
            try:
                seq, pools = await asyncio.wait_for(
                    self.actor.next_loss.remote(seq, LOSS_POLL_S), LOSS_POLL_S + RPC_TIMEOUT_S
                )
            except (RayActorError, TimeoutError):
                await asyncio.sleep(PROBE_INTERVAL_S)  # a restarting actor: poll again
                continue
            for pool in pools:
                event = self._losses.pop(pool, None)
                if event is not None:
                    event.set()

    @property
    def available(self) -> bool:
        return self._recovering is None or self._recovering.done()

    # ---- the request path ---------------------------------------------------------
    def blocked(self, tenant: str) -> Admission | None:
        """The tenant's last refusal while it still holds, with the time left."""
        block = self._blocked.get(tenant)
        if block is None:
            return None
        left = block.until - time.monotonic()
        if left <= 0:
            del self._blocked[tenant]
            return None
        refusal = block.admission.refusal
        assert refusal is not None
        return replace(block.admission, refusal=replace(refusal, retry_after_s=left))

    async def admit(self, req: AdmissionRequest) -> Admission:
        """Admission's decision, or AdmissionUnavailable. If the caller is cancelled or
        the call fails, whatever the actor may have granted is finished."""
        if not self.available:
            raise AdmissionUnavailable
        try:
            admission: Admission = await asyncio.wait_for(
                self.actor.admit.remote(req), self.config.queue_deadline_s + QUEUE_MARGIN_S
            )
        except (RayActorError, TimeoutError) as exc:
            self._lost(exc)
            self._finish_later(req.claim_id, None)
            raise AdmissionUnavailable from None
        except BaseException:
            self._finish_later(req.claim_id, None)
            raise
        if admission.admitted:
            self.held[req.claim_id] = HeldClaim(req, admission, time.time())
        else:
            self._remember(req.tenant, admission)
        return admission

    async def reseat(
        self, claim_id: str, pool_key: str | None, actor_id: str | None
    ) -> Admission:
        """The replica of `pool_key` that `claim_id`'s request was sent to was lost before
        its first output: admission drops it (None: it knows already) and seats the claim
        again (a dedicated one spills). A refusal means the claim is settled."""
        if not self.available:
            raise AdmissionUnavailable
        try:
            admission: Admission = await asyncio.wait_for(
                self.actor.reseat.remote(claim_id, pool_key, actor_id),
                self.config.queue_deadline_s + QUEUE_MARGIN_S,
            )
        except (RayActorError, TimeoutError) as exc:
            self._lost(exc)
            raise AdmissionUnavailable from None
        held = self.held.pop(claim_id, None)
        if held is not None and admission.admitted:
            self.held[claim_id] = replace(held, admission=admission)
        return admission

    def replica_lost(self, pool_key: str, actor_id: str | None) -> None:
        """A stream's replica died under it: admission drops its seats now. Not awaited
        (the stream's error goes out first); a lost report is made good by the TTL."""
        if self.available:
            remote_outside_request(self.actor.replica_lost, pool_key, actor_id)

    async def finish(self, claim_id: str, usage: UsageRecord | None, record: bool = True) -> None:
        """Settle the claim and record usage (unless another shard records it: `record`);
        kept for replay until acknowledged."""
        if not record:
            self._settle_only.add(claim_id)
        claim = self.held.pop(claim_id, None)
        if claim is not None:
            block = self._blocked.get(claim.request.tenant)
            refusal = block.admission.refusal if block else None
            if refusal is not None and refusal.reason == "concurrency":
                del self._blocked[claim.request.tenant]  # a slot of this tenant just freed
        self.unacknowledged[claim_id] = usage
        await asyncio.shield(self._send_finish(claim_id, usage))

    def _finish_later(self, claim_id: str, usage: UsageRecord | None) -> None:
        self.held.pop(claim_id, None)
        self.unacknowledged[claim_id] = usage
        asyncio.get_running_loop().create_task(self._send_finish(claim_id, usage))

    async def _send_finish(self, claim_id: str, usage: UsageRecord | None) -> None:
        record = claim_id not in self._settle_only
        try:
            ref = remote_outside_request(self.actor.finish, claim_id, usage, record)
            await asyncio.wait_for(ref, RPC_TIMEOUT_S)
        except (RayActorError, TimeoutError) as exc:
            self._lost(exc)  # kept in unacknowledged: the probe or a heartbeat replays it
            return
        self._settle_only.discard(claim_id)
        acknowledged = self.unacknowledged.pop(claim_id, None) is not None
        if acknowledged and usage is not None and record:
            self.uncommitted[usage.request_id] = usage

    def _remember(self, tenant: str, admission: Admission) -> None:
        refusal = admission.refusal
        assert refusal is not None
        if refusal.too_large or refusal.reason not in ("rpm", "tpm", "concurrency"):
            return  # specific to this request's size, or to the pool, not to the tenant
        if refusal.reason == "tpm" and (admission.limits.remaining_tokens or 0) > 0:
            return  # a smaller request may still fit
        hold = refusal.retry_after_s
        if refusal.reason == "concurrency":
            hold = min(hold, CONCURRENCY_BLOCK_S)
        self._blocked[tenant] = _Block(time.monotonic() + hold, admission)

    async def state(self) -> dict[str, Any]:
        """The actor's seats and queues (GET /admin/state), as JSON-ready data."""
        if not self.available:
            raise AdmissionUnavailable
        try:
            snapshot: AdmissionSnapshot = await asyncio.wait_for(
                self.actor.snapshot.remote(), RPC_TIMEOUT_S
            )
        except (RayActorError, TimeoutError) as exc:
            self._lost(exc)
            raise AdmissionUnavailable from None
        return asdict(snapshot)

    # ---- liveness: heartbeats, outages, recovery ------------------------------------
    async def heartbeat(self) -> None:
        """Report this replica's claims (re-registered if the actor restarted), replay
        unacknowledged finishes and re-apply the config if the actor runs an older one.
        Never raises: admission trouble must not fail the ingress's health check."""
        try:
            await self._beat()
        except (RayActorError, TimeoutError) as exc:
            self._lost(exc)

    async def _beat(self) -> None:
        for claim_id, usage in list(self.unacknowledged.items()):
            await self._send_finish(claim_id, usage)
        reply: HeartbeatReply = await asyncio.wait_for(
            self.actor.ingress_heartbeat.remote(self.owner, list(self.held.values())),
            RPC_TIMEOUT_S,
        )
        if reply.restored:
            log.warning("admission restarted: re-registered %d claims", reply.restored)
        if reply.config_version < self.config.version:
            await asyncio.wait_for(self.actor.configure.remote(self.config), RPC_TIMEOUT_S)
        await self._confirm()

    async def _confirm(self) -> None:
        """Forget the records the database has; send again those the actor lost."""
        ids = list(self.uncommitted)
        for i in range(0, len(ids), CONFIRM_BATCH):
            chunk = ids[i : i + CONFIRM_BATCH]
            status: LedgerStatus = await asyncio.wait_for(
                self.actor.ledger_status.remote(chunk), RPC_TIMEOUT_S
            )
            for request_id in status.committed:
                self.uncommitted.pop(request_id, None)
            lost = [
                self.uncommitted[r]
                for r in chunk
                if r not in status.committed and r not in status.pending and r in self.uncommitted
            ]
            if lost:
                log.warning("ledger: sending %d usage records again", len(lost))
                await asyncio.wait_for(self.actor.record_again.remote(lost), RPC_TIMEOUT_S)

    async def drain(self, timeout_s: float) -> int:
        """Before this replica goes away: hand every finish to the actor and wait until
        the database has each record. Returns how many are still not committed."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (self.unacknowledged or self.uncommitted):
            left = max(0.1, deadline - time.monotonic())
            try:
                for claim_id, usage in list(self.unacknowledged.items()):
                    await self._send_finish(claim_id, usage)
                await asyncio.wait_for(self.actor.flush.remote(min(left, 10.0)), left + 1)
                await self._confirm()
            except (RayActorError, TimeoutError) as exc:
                log.warning("drain: admission unreachable (%s)", exc)
                self._handle = None
            if self.unacknowledged or self.uncommitted:
                await asyncio.sleep(min(PROBE_INTERVAL_S, max(0.0, deadline - time.monotonic())))
        left_over = len(self.unacknowledged) + len(self.uncommitted)
        if left_over:
            log.error("drain: %d usage records not committed when this replica stopped", left_over)
        return left_over

    def _lost(self, exc: BaseException) -> None:
        """The actor failed a call: refuse requests until a probe gets through."""
        if not self.available:
            return
        log.warning("admission unreachable (%s); refusing requests until it answers", exc)
        if isinstance(exc, RayActorError) and not getattr(exc, "preempted", False):
            self._handle = None  # dead for good unless Ray restarts it: look it up again
        self._recovering = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        started = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self.actor.ping.remote(), RPC_TIMEOUT_S)
                await self._beat()
                break
            except (RayActorError, TimeoutError):
                self._handle = None
                await asyncio.sleep(PROBE_INTERVAL_S)
        log.warning("admission reachable again after %.1fs", time.monotonic() - started)
