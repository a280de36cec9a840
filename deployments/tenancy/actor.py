"""The admission actor: one per Serve application, named by the app, never by its config.

Detached, so it outlives any one ingress replica, and restarted by Ray after it dies
(`max_restarts=-1`); the ingress replicas then re-register what they hold and send again
the usage records it had not yet written. A new config is applied in place
(`configure`), so rotating a key or changing a limit keeps the rate windows and seats.

It owns the ledger writer: usage is queued here and committed in batches. The database
may be down when the actor starts (a restart during an outage): admission never waits
for it; records queue until `prepare` (connect, migrate) succeeds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import ray
from ray.actor import ActorHandle
from ray.exceptions import RayActorError

from deployments.config.plan import ADMISSION_NAMESPACE, admission_actor_name
from deployments.observability.admission import EXPORT_INTERVAL_S
from deployments.state.config import resolve_state_spec
from deployments.state.errors import StateError
from deployments.state.ledger import Ledger
from deployments.state.store import StateStore
from deployments.state.writer import LedgerWriter
from deployments.tenancy.admission import AdmissionState
from deployments.tenancy.types import (
    Admission,
    AdmissionConfig,
    AdmissionRequest,
    HeartbeatReply,
    HeldClaim,
    LedgerStatus,
    ServedUsage,
    UsageRecord,
)

log = logging.getLogger(__name__)
PREPARE_RETRY_S = 2.0
WATCH_INTERVAL_S = 1.0  # dedicated replicas are pinged this often
WATCH_TIMEOUT_S = 3.0  # a ping slower than this is load, not a death: asked again
HEAD_NODE_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource
LEDGER_READ_TIMEOUT_S = 2.0  # well inside the caller's RPC timeout: an outage is "pending"


@ray.remote(num_cpus=0, max_concurrency=10_000, max_restarts=-1)  # type: ignore[call-overload]
class AdmissionActor(AdmissionState):
    """The shared instance. Async actor: waiters in the fair queue cost no threads."""

    _exporting: asyncio.Task | None = None
    _preparing: asyncio.Task | None = None
    _watching: asyncio.Task | None = None

    def __init__(self, config: AdmissionConfig) -> None:
        super().__init__(config)
        self._watched: dict[str, tuple[str, ActorHandle]] = {}  # actor id -> pool, handle
        if config.state is not None:
            store = StateStore.connect(resolve_state_spec(config.state))
            self.ledger = LedgerWriter(Ledger(store))

    async def ping(self) -> float:
        """The config version in force; answers only once the actor is up."""
        self._start_background()
        return self.config.version

    async def configure(self, config: AdmissionConfig) -> float:  # type: ignore[override]
        version = super().configure(config)
        if version == config.version:
            await self._adopt_state(config)
        self._start_background()
        return version

    async def _adopt_state(self, config: AdmissionConfig) -> None:
        """A redeploy that names another database moves the ledger there: this detached
        actor outlives the app, and must not keep writing to the old one."""
        spec = resolve_state_spec(config.state) if config.state is not None else None
        current = self.ledger.ledger.store.spec if self.ledger is not None else None
        if spec == current:
            return
        if self.ledger is not None:
            if self._preparing is not None:
                self._preparing.cancel()
            await self.ledger.stop()
            await self.ledger.ledger.store.close()
        self._preparing = None
        self.ledger = LedgerWriter(Ledger(StateStore.connect(spec))) if spec else None
        log.info("ledger: state store changed by configure")

    async def admit(self, req: AdmissionRequest) -> Admission:
        self._start_background()
        return await super().admit(req)

    async def ingress_heartbeat(  # type: ignore[override]
        self, owner: str, held: list[HeldClaim], now: float | None = None
    ) -> HeartbeatReply:
        self._start_background()
        return super().ingress_heartbeat(owner, held, now)

    async def replica_heartbeat(  # type: ignore[override]
        self,
        pool_key: str,
        replica_id: str,
        seats: int,
        now: float | None = None,
        actor_id: str = "",
        served: Sequence[ServedUsage] = (),
        handle: ActorHandle | None = None,
    ) -> dict[str, float]:
        """`handle`: the replica's actor, pinged while it serves a dedicated pool."""
        self._start_background()
        planned = self.config.pools.get(pool_key)
        if handle is not None and actor_id and planned is not None and planned.tier == "dedicated":
            self._watched[actor_id] = (pool_key, handle)
        return super().replica_heartbeat(pool_key, replica_id, seats, now, actor_id, served)

    # ---- the ledger: what an ingress asks about the records it holds -----------------
    async def ledger_status(self, request_ids: Sequence[str]) -> LedgerStatus:
        """Which of these records are committed, which still queued here; the rest the
        caller sends again (`record_again`)."""
        if self.ledger is None:
            return LedgerStatus(frozenset(request_ids), frozenset())
        pending = self.ledger.pending_ids(request_ids)
        try:
            committed = await asyncio.wait_for(
                self.ledger.committed_ids([i for i in request_ids if i not in pending]),
                LEDGER_READ_TIMEOUT_S,
            )
        except (StateError, TimeoutError):  # the database cannot say now: ask next beat
            committed = set()
            pending = set(request_ids)
        return LedgerStatus(frozenset(committed), frozenset(pending))

    async def record_again(self, records: list[UsageRecord]) -> int:
        """Records this actor lost (it restarted before writing them)."""
        for record in records:
            self.record(record)
        return len(records)

    async def flush(self, timeout_s: float) -> bool:
        """Commit everything queued so far (an ingress shutting down waits on this)."""
        if self.ledger is None:
            return True
        try:
            await self.ledger.flush(timeout_s)
        except (TimeoutError, RuntimeError):
            return False
        return True

    # ---- background work on the actor's event loop (not available in __init__) -------
    def _start_background(self) -> None:
        if self._exporting is None or self._exporting.done():
            self._exporting = asyncio.get_running_loop().create_task(self._export_forever())
        if self._watching is None or self._watching.done():
            self._watching = asyncio.get_running_loop().create_task(self._watch_forever())
        if self.ledger is not None and self._preparing is None:
            self._preparing = asyncio.get_running_loop().create_task(self._prepare_ledger())

    async def _prepare_ledger(self) -> None:
        """Connect and migrate, retrying until the database answers; then write."""
        assert self.ledger is not None
        store = self.ledger.ledger.store
        while True:
            try:
                await store.prepare()
                break
            except StateError as exc:
                log.error("ledger: %s; queueing usage and retrying", exc)
                await asyncio.sleep(PREPARE_RETRY_S)
        self.ledger.start()
        log.info("ledger: writing to %s", store.url)

    async def _watch_forever(self) -> None:
        """Ping each dedicated replica: one whose node is gone fails at once (its actor is
        unreachable), long before its heartbeat is overdue, and its tenant spills."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            watched = list(self._watched.items())
            pings: list[ray.ObjectRef] = [h.__ray_ready__.remote() for _, (_, h) in watched]
            results = await asyncio.gather(
                *(asyncio.wait_for(p, WATCH_TIMEOUT_S) for p in pings), return_exceptions=True
            )
            for (actor_id, (pool_key, _)), result in zip(watched, results, strict=True):
                if isinstance(result, RayActorError):
                    log.warning("dedicated replica %s of %s lost", actor_id, pool_key)
                    del self._watched[actor_id]
                    self.replica_lost(pool_key, actor_id)

    async def _export_forever(self) -> None:
        while True:
            live = {key: self.live_replicas(key) for key in self.config.pools}
            self.exporter.export(self.snapshot(), live)
            await asyncio.sleep(EXPORT_INTERVAL_S)


def get_admission(app_name: str, config: AdmissionConfig) -> ActorHandle:
    """The app's admission actor (or `config.shard`'s), created by the first caller with
    `config`. A caller with a newer config then applies it with `configure`.

    A tenant's shard runs on the tenant's own node type, beside its front door. The shared
    one runs where the shared front door is pinned (`ingress.node_type_resource`), else on
    the head node, as Serve's controller is: the loss of a worker node never takes
    admission with it (Ray would restart it only once the node is declared dead, some
    20 s of 503s), and the head going takes the cluster's GCS anyway."""
    node = config.node_resource or HEAD_NODE_RESOURCE
    return AdmissionActor.options(  # type: ignore[attr-defined]
        name=admission_actor_name(app_name, config.shard),
        namespace=ADMISSION_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        resources={node: 0.001},
    ).remote(config)
