"""The admission actor's configuration, derived from the Tiered config in one place."""

from __future__ import annotations

from deployments.config.plan import dedicated_pool_key, deployment_plan, front_door_plan
from deployments.config.tiered import TieredConfig
from deployments.tenancy.types import AdmissionConfig, PoolSeats, TenantPolicy


def admission_shards(config: TieredConfig) -> list[str]:
    """Tenants with an admission shard of their own: those with a front door."""
    return [door.tenant for door in front_door_plan(config)]


def admission_config(
    config: TieredConfig, version: float, shard: str | None = None
) -> AdmissionConfig:
    """Limits, weights and tiers per tenant, seats per pool. `version` orders configs
    (the time the ingress that sends it started), so a rollout's newest config wins.

    A tenant's shard (`shard`) holds that tenant and its private pool only; the shared
    shard holds every tenant (it seats their spill) and every other pool."""
    own = {dedicated_pool_key(name) for name in admission_shards(config)}

    def in_shard(pool_key: str) -> bool:
        return pool_key == dedicated_pool_key(shard) if shard else pool_key not in own

    tenants = {
        t.name: TenantPolicy(
            name=t.name,
            rpm=t.rpm,
            tpm=t.tpm,
            max_concurrency=t.max_concurrency,
            priority=t.priority,
            weight=t.weight,
            dedicated_model=t.dedicated.model if t.dedicated else None,
            spill=t.dedicated.spill if t.dedicated else True,
        )
        for t in config.tenants
    }
    pools = {
        plan.key: PoolSeats(
            key=plan.key,
            tier=plan.tier,
            seats=plan.seats,
            model=plan.model.name,
            price_per_replica_hour=plan.replica.price_per_replica_hour,
            fixed_replicas=plan.fixed_replicas,
        )
        for plan in deployment_plan(config)
        if in_shard(plan.key)
    }
    node_resource = config.ingress.node_type_resource  # the shared shard: by its door
    if shard is not None:
        tenants = {shard: tenants[shard]}
        spec = config.tenant(shard)
        assert spec is not None and spec.dedicated is not None
        node_resource = spec.dedicated.replica.node_type_resource
    return AdmissionConfig(
        tenants=tenants,
        pools=pools,
        max_queue_len=config.dispatch.max_queue_len,
        queue_deadline_s=config.dispatch.queue_deadline_s,
        version=version,
        state=config.state,
        shard=shard,
        node_resource=node_resource,
    )
