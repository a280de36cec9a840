"""The admission actor's configuration, derived from the Tiered config in one place."""

from __future__ import annotations

from deployments.config.plan import deployment_plan
from deployments.config.tiered import TieredConfig
from deployments.tenancy.types import AdmissionConfig, PoolSeats, TenantPolicy


def admission_config(config: TieredConfig, version: float) -> AdmissionConfig:
    """Limits, weights and tiers per tenant, seats per pool. `version` orders configs
    (the time the ingress that sends it started), so a rollout's newest config wins."""
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
    }
    return AdmissionConfig(
        tenants=tenants,
        pools=pools,
        max_queue_len=config.dispatch.max_queue_len,
        queue_deadline_s=config.dispatch.queue_deadline_s,
        version=version,
        state=config.state,
    )
