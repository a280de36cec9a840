"""Where an admitted request runs, and where it goes when that replica is lost.

Admission chose a tier; this turns it into the deployment to send to and the job (with
the usage record the model server reports back, so a request whose ingress dies is still
billed). When the replica is lost, admission hears of it at once: before the first
output the request is seated again, a dedicated one spilling to the shared pool while its
reservation is gone (`service_tier` then says "default"); under a started stream the
next request of the tenant does so.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace

from fastapi import Request
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from deployments.api.limits import admission_unavailable, refusal_error
from deployments.config.plan import dedicated_pool_key
from deployments.observability.requests import RequestTimer
from deployments.replicas.requests import GenerateRequest
from deployments.tenancy.client import AdmissionUnavailable
from deployments.tenancy.shards import ShardedAdmission
from deployments.tenancy.types import Admission, ServedUsage, UsageRecord
from models.errors import EngineDeadError


class SeatLost(Exception):
    """Admission heard that the request's dedicated pool lost a replica before the
    request's first output: Serve's router would hold it until a new replica is up."""


def _loss(exc: BaseException) -> BaseException | None:
    """The RayActorError or EngineDeadError behind `exc`, if one is."""
    cause: BaseException | None = exc
    for _ in range(4):  # Ray wraps user exceptions; walk to the typed one
        if cause is None or isinstance(cause, RayActorError | EngineDeadError):
            return cause
        cause = getattr(cause, "cause", None) or cause.__cause__
    return None


def replica_lost(exc: BaseException) -> bool:
    """The replica died, or its engine did: nothing about the request itself."""
    return _loss(exc) is not None


def lost_actor(exc: BaseException) -> str | None:
    """The id of the actor whose death `exc` reports; None for an engine that died in a
    live replica, or when Ray did not say."""
    cause = _loss(exc)
    return cause.actor_id if isinstance(cause, RayActorError) else None


@dataclass
class Seating:
    """One request's seat: its claim, its tenant's pools, and the admission client."""

    admission: ShardedAdmission
    handles: dict[str, DeploymentHandle]  # pool key -> deployment
    request: Request
    timer: RequestTimer
    claim_id: str
    tenant: str
    model: str  # the base model: the shared pool's key
    admitted: Admission
    started_at: float = field(default_factory=time.time)

    @property
    def pool(self) -> str:
        return dedicated_pool_key(self.tenant) if self.admitted.tier == "dedicated" else self.model

    @property
    def handle(self) -> DeploymentHandle:
        return self.handles[self.pool]

    def seated(self) -> None:
        assert self.admitted.tier is not None
        self.timer.serving(self.tenant, self.admitted.tier, self.admitted.spill)
        self.request.state.tier = self.timer.tier

    def job(self, job: GenerateRequest) -> GenerateRequest:
        """`job` at this seat's engine band, with the record the model server reports."""
        assert self.admitted.tier is not None
        record = UsageRecord(
            request_id=job.request_id,
            tenant=self.tenant,
            model=self.model,
            tier=self.admitted.tier,
            spill=self.admitted.spill,
            prompt_tokens=0,
            cached_tokens=0,
            completion_tokens=0,
            started_at=self.started_at,
            ended_at=self.started_at,
            adapter=job.lora.name if job.lora else None,
        )
        return replace(job, priority=self.admitted.band, billing=ServedUsage(self.claim_id, record))

    def watch(self) -> asyncio.Event | None:
        """For a dedicated seat, set when its pool loses a replica (None otherwise)."""
        if self.admitted.tier != "dedicated":
            return None
        return self.admission.next_loss(self.pool)

    def lost(self, exc: BaseException) -> None:
        """The replica died under a started stream: its seats go now."""
        self.admission.replica_lost(self.pool, lost_actor(exc))

    async def reseat(self, exc: BaseException) -> None:
        """The replica was lost before the first output: tell admission, and seat the
        request again (a dedicated one may spill). A refusal is the request's error."""
        if self.admitted.tier != "dedicated":
            self.lost(exc)
            return
        pool = None if isinstance(exc, SeatLost) else self.pool  # admission knows already
        try:
            moved = await self.admission.reseat(self.claim_id, pool, lost_actor(exc))
        except AdmissionUnavailable:
            raise admission_unavailable() from None
        if not moved.admitted:
            raise refusal_error(moved, self.tenant)
        self.admitted = moved
        self.seated()
