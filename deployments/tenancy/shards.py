"""Admission split by tenant: a dedicated tenant with a front door has a shard of its own.

Its rate limits and its private seats are decided by its own actor, on its own node type,
so its requests never queue behind the shared tenants' calls. The shared shard keeps
every other tenant and the shared pools' fair queues. A dedicated tenant's spill (or a
`service_tier: "default"` request) needs a shared seat: its shard reserves the limits and
answers `seat_elsewhere`, then the shared shard seats it without counting the limits
again. Its usage is recorded once, by its own shard; the shared shard only settles the
seat on the tokens used (fair share).

With no front door configured there is one shard, and this is one AdmissionClient.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from deployments.tenancy.client import AdmissionClient
from deployments.tenancy.types import Admission, AdmissionConfig, AdmissionRequest, UsageRecord


class ShardedAdmission:
    """The ingress's admission: one AdmissionClient per shard it talks to."""

    def __init__(
        self, app_name: str, configs: dict[str | None, AdmissionConfig], owner: str
    ) -> None:
        assert None in configs, "every ingress talks to the shared shard"
        self.clients = {
            shard: AdmissionClient(app_name, config, owner) for shard, config in configs.items()
        }
        self.shared = self.clients[None]
        self._spilled: dict[str, AdmissionClient] = {}  # claim id -> its tenant's shard

    def client(self, tenant: str) -> AdmissionClient:
        """The shard that decides for `tenant`."""
        return self.clients.get(tenant, self.shared)

    async def start(self) -> None:
        await asyncio.gather(*(c.start() for c in self.clients.values()))

    @property
    def available(self) -> bool:
        return all(c.available for c in self.clients.values())

    def blocked(self, tenant: str) -> Admission | None:
        return self.client(tenant).blocked(tenant)

    async def admit(self, req: AdmissionRequest) -> Admission:
        home = self.client(req.tenant)
        admission = await home.admit(req)
        if not admission.seat_elsewhere:
            return admission
        return await self._seat_elsewhere(home, req, admission)

    async def _seat_elsewhere(
        self, home: AdmissionClient, req: AdmissionRequest, admission: Admission
    ) -> Admission:
        """`home` reserved the limits and wants a shared seat: the shared shard's."""
        try:
            seated = await self.shared.admit(replace(req, limits_reserved=True))
        except BaseException:
            await home.finish(req.claim_id, None)
            raise
        if not seated.admitted:
            await home.finish(req.claim_id, None)
        else:
            self._spilled[req.claim_id] = home
        return replace(seated, limits=admission.limits)

    async def reseat(
        self, claim_id: str, pool_key: str | None, actor_id: str | None
    ) -> Admission:
        """A dedicated request whose replica was lost (deployments.api.seating): its own
        shard seats it again, and a spill it decides on is seated by the shared shard."""
        home = self._pool_client(pool_key) if pool_key else self._home_of(claim_id, None)
        held = home.held.get(claim_id)
        moved = await home.reseat(claim_id, pool_key, actor_id)
        if not moved.seat_elsewhere or held is None:
            return moved
        return await self._seat_elsewhere(home, held.request, moved)

    def next_loss(self, pool_key: str) -> asyncio.Event:
        return self._pool_client(pool_key).next_loss(pool_key)

    def replica_lost(self, pool_key: str, actor_id: str | None) -> None:
        self._pool_client(pool_key).replica_lost(pool_key, actor_id)

    def _pool_client(self, pool_key: str) -> AdmissionClient:
        """The shard that holds a pool's seats: a dedicated tenant's own, or the shared."""
        tier, _, tenant = pool_key.partition(":")
        return self.clients.get(tenant, self.shared) if tier == "dedicated" else self.shared

    async def finish(self, claim_id: str, usage: UsageRecord | None) -> None:
        """The tenant's shard settles its limits and records the usage; for a seat taken
        in the shared pool, the shared shard settles that seat, recording nothing."""
        home = self._spilled.pop(claim_id, None)
        if home is None:
            owner = usage.tenant if usage is not None else None
            await self._home_of(claim_id, owner).finish(claim_id, usage)
            return
        await asyncio.gather(
            home.finish(claim_id, usage), self.shared.finish(claim_id, usage, record=False)
        )

    def _home_of(self, claim_id: str, tenant: str | None) -> AdmissionClient:
        if tenant is not None:
            return self.client(tenant)
        for client in self.clients.values():
            if claim_id in client.held:
                return client
        return self.shared

    async def state(self) -> dict[str, Any]:
        """Every shard's seats and queues, merged (GET /admin/state)."""
        merged: dict[str, Any] = {"pools": {}, "dedicated": {}}
        for snapshot in await asyncio.gather(*(c.state() for c in self.clients.values())):
            merged["pools"].update(snapshot["pools"])
            merged["dedicated"].update(snapshot["dedicated"])
        return merged

    async def heartbeat(self) -> None:
        await asyncio.gather(*(c.heartbeat() for c in self.clients.values()))

    async def drain(self, timeout_s: float) -> int:
        left = await asyncio.gather(*(c.drain(timeout_s) for c in self.clients.values()))
        return sum(left)
