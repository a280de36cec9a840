"""The admission actor: one per Serve application, named by the app, never by its config.

Detached, so it outlives any one ingress replica, and restarted by Ray after it dies
(`max_restarts=-1`); the ingress replicas then re-register what they hold. A new config
is applied in place (`configure`), so rotating a key or changing a limit keeps the rate
windows, seats and usage.
"""

from __future__ import annotations

import asyncio

import ray
from ray.actor import ActorHandle

from deployments.config.plan import ADMISSION_NAMESPACE, admission_actor_name
from deployments.observability.admission import EXPORT_INTERVAL_S
from deployments.tenancy.admission import AdmissionState
from deployments.tenancy.types import (
    Admission,
    AdmissionConfig,
    AdmissionRequest,
    HeartbeatReply,
    HeldClaim,
)


@ray.remote(num_cpus=0, max_concurrency=10_000, max_restarts=-1)  # type: ignore[call-overload]
class AdmissionActor(AdmissionState):
    """The shared instance. Async actor: waiters in the fair queue cost no threads."""

    _exporting: asyncio.Task | None = None

    async def ping(self) -> float:
        """The config version in force; answers only once the actor is up."""
        return self.config.version

    async def admit(self, req: AdmissionRequest) -> Admission:
        self._start_exporting()
        return await super().admit(req)

    async def ingress_heartbeat(  # type: ignore[override]
        self, owner: str, held: list[HeldClaim], now: float | None = None
    ) -> HeartbeatReply:
        self._start_exporting()
        return super().ingress_heartbeat(owner, held, now)

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
            live = {key: self.live_replicas(key) for key in self.config.pools}
            self.exporter.export(self.snapshot(), live)
            await asyncio.sleep(EXPORT_INTERVAL_S)


def get_admission(app_name: str, config: AdmissionConfig) -> ActorHandle:
    """The app's admission actor, created by the first caller with `config`. A caller
    with a newer config then applies it with `configure`."""
    return AdmissionActor.options(  # type: ignore[attr-defined]
        name=admission_actor_name(app_name),
        namespace=ADMISSION_NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
    ).remote(config)
