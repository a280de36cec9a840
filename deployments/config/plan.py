"""Every deployment the app creates, listed once: name, pool key, replica shape, floor.

The builder, the Serve-config renderer, the admission actor's seats and the metrics all
read this list, so a deployment's name and the `dedicated:<tenant>` pool key are spelled
in exactly one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from deployments.config.models import AutoscalingSpec, ModelSpec, ReplicaSpec, initial_replicas
from deployments.config.tenants import DedicatedSpec

if TYPE_CHECKING:
    from deployments.config.tiered import TieredConfig

Tier = Literal["shared", "dedicated"]
# What a ledger row bills: a tier's serving, or a fine-tuning job's trained tokens.
BilledTier = Literal["shared", "dedicated", "training"]
MAIN_APP = "tiered"  # the main Serve application's name, where the caller names none
INGRESS_DEPLOYMENT = "ingress"
FINE_TUNING_DEPLOYMENT = "fine-tuning"  # the job runner (deployments.training.runner)
ADMISSION_NAMESPACE = "tiered"


def admission_actor_name(app_name: str, shard: str | None = None) -> str:
    """One admission actor per Serve app, named by the app and never by its config, so a
    config change keeps its state; the ingress and model servers derive the same name.
    A dedicated tenant with a front door has a shard of its own (`shard`: its name)."""
    base = f"tiered-admission-{app_name}"
    return base if shard is None else f"{base}--{shard}"


def front_door_app_name(app_name: str, tenant: str) -> str:
    """The Serve application of a tenant's front door, beside the main app `app_name`."""
    return f"{app_name}--{tenant}"


def dedicated_pool_key(tenant: str) -> str:
    """The pool key of a tenant's private deployment (heartbeats, seats, metrics)."""
    return f"dedicated:{tenant}"


def dedicated_replica(dedicated: DedicatedSpec) -> ReplicaSpec:
    """The reservation is the floor: fixed at reserved_replicas, or autoscaled between the
    reservation and max_replicas when the tenant bought burst room."""
    reserved = dedicated.reserved_replicas
    ceiling = dedicated.max_replicas or reserved
    if ceiling == reserved:
        return dedicated.replica.model_copy(update={"num_replicas": reserved, "autoscaling": None})
    scaling = dedicated.replica.autoscaling or AutoscalingSpec()
    scaling = scaling.model_copy(update={"min_replicas": reserved, "max_replicas": ceiling})
    return dedicated.replica.model_copy(update={"autoscaling": scaling})


@dataclass(frozen=True)
class PoolPlan:
    """One model-server deployment: a shared pool (per model) or a tenant's private copy."""

    key: str  # "<model>" for a shared pool, dedicated_pool_key(tenant) for a private copy
    deployment: str  # the Serve deployment name
    tier: Tier
    model: ModelSpec
    replica: ReplicaSpec  # as deployed (a reservation's floor and ceiling applied)
    where: str  # the config field that declares it, for error messages
    tenant: str | None = None  # the owner of a dedicated copy

    @property
    def floor(self) -> int:
        """Replicas it starts with and never goes below while autoscaled."""
        return initial_replicas(self.replica)

    @property
    def seats(self) -> int:
        """Concurrent sequences at the floor: what admission hands out before heartbeats."""
        return self.floor * self.model.engine.max_num_seqs

    @property
    def fixed_replicas(self) -> int | None:
        """The replica count when it does not autoscale (None: the policy decides)."""
        return None if self.replica.autoscaling else self.replica.num_replicas


@dataclass(frozen=True)
class FrontDoorPlan:
    """A dedicated tenant's own entry: a Serve application of its own ingress replicas,
    placed by the tenant's node-type resource, under its own route prefix."""

    tenant: str
    route_prefix: str
    num_replicas: int
    node_type_resource: str | None

    def app_name(self, main_app: str) -> str:
        return front_door_app_name(main_app, self.tenant)


def front_door_plan(config: TieredConfig) -> Iterator[FrontDoorPlan]:
    for t in config.tenants:
        if t.dedicated is None or t.dedicated.front_door is None:
            continue
        door = t.dedicated.front_door
        yield FrontDoorPlan(
            t.name,
            door.route_prefix or f"/tenants/{t.name}",
            door.num_replicas,
            t.dedicated.replica.node_type_resource,
        )


def deployment_plan(config: TieredConfig) -> Iterator[PoolPlan]:
    """Shared pools first (a model with no shared replicas serves dedicated tenants only),
    then one private deployment per dedicated tenant."""
    for i, m in enumerate(config.models):
        if m.shared_pool.num_replicas > 0 or m.shared_pool.autoscaling:
            name = f"shared-{m.name}".replace("/", "-").replace(":", "-")
            yield PoolPlan(m.name, name, "shared", m, m.shared_pool, f"models[{i}].shared_pool")
    for i, t in enumerate(config.tenants):
        if t.dedicated is None:
            continue
        model = config.model(t.dedicated.model)
        assert model is not None  # checked by TieredConfig's cross references
        yield PoolPlan(
            dedicated_pool_key(t.name),
            f"dedicated-{t.name}",
            "dedicated",
            model,
            dedicated_replica(t.dedicated),
            f"tenants[{i}].dedicated.replica",
            t.name,
        )
