"""The admission actor is detached and outlives its app: a redeploy whose config names
another database must move the ledger there (it kept writing to the first one)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import ray

from deployments.state.config import StateSpec
from deployments.state.ledger import Ledger
from deployments.state.store import StateStore
from deployments.state.types import UsageQuery
from deployments.tenancy.actor import get_admission
from deployments.tenancy.types import (
    AdmissionConfig,
    AdmissionRequest,
    PoolSeats,
    TenantPolicy,
    UsageRecord,
)


async def _requests(url: str) -> int:
    store = await StateStore.open(StateSpec(url=url))
    try:
        rows = await Ledger(store).aggregate(UsageQuery())
        return sum(row.requests for row in rows)
    finally:
        await store.close()


def test_a_redeploy_naming_another_database_moves_the_ledger(ray_cluster, tmp_path: Path):
    first = f"sqlite:///{tmp_path / 'first.db'}"
    second = f"sqlite:///{tmp_path / 'second.db'}"
    config = AdmissionConfig(
        {"globex": TenantPolicy("globex")}, {"m": PoolSeats("m", "shared", 2)},
        queue_deadline_s=5.0, version=1.0, state=StateSpec(url=first),
    )
    actor = get_admission("redeploy-test", config)
    try:
        ray.get(actor.ping.remote(), timeout=30)
        redeployed = replace(config, version=2.0, state=StateSpec(url=second))
        assert ray.get(actor.configure.remote(redeployed), timeout=30) == 2.0
        ray.get(actor.admit.remote(AdmissionRequest("c1", "globex", "m", 10)), timeout=30)
        usage = UsageRecord("c1", "globex", "m", "shared", False, 5, 0, 3, 0.0, 1.0)
        assert ray.get(actor.finish.remote("c1", usage), timeout=30) is True
        deadline = time.monotonic() + 30  # the new store connects and migrates first
        while not ray.get(actor.flush.remote(5.0), timeout=30):
            assert time.monotonic() < deadline, "the ledger never wrote to the new database"
            time.sleep(0.2)
        assert asyncio.run(_requests(second)) == 1
        assert asyncio.run(_requests(first)) == 0
    finally:
        ray.kill(actor)
