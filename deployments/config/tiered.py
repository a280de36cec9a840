"""The one Tiered YAML: models, tenants, admin keys, dispatcher and ingress settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.config.models import (
    ConfigError,
    ModelSpec,
    ReplicaSpec,
    initial_replicas,
    validate_against_checkpoint,
    validate_against_cluster,
)
from deployments.config.tenants import DispatchSpec, IngressSpec, TenantSpec

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "cluster" / "serve-default.yaml"


class NodeTypeSpec(BaseModel):
    """A node type of the cluster (a `ray up` node type, a KubeRay worker group): what one
    node provides, custom node-type resources included, and how many may run."""

    model_config = ConfigDict(extra="forbid")

    resources: dict[str, float] = Field(min_length=1)
    min_workers: int = Field(0, ge=0)
    max_workers: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> NodeTypeSpec:
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers={self.min_workers} exceeds max_workers={self.max_workers}"
            )
        return self


class TieredConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)
    tenants: list[TenantSpec] = []
    admin_key_hashes: list[str] = []
    revoked_key_hashes: list[str] = []
    dispatch: DispatchSpec = DispatchSpec()
    ingress: IngressSpec = IngressSpec()
    node_types: dict[str, NodeTypeSpec] = Field(
        {}, description="The cluster's node types; when given, every replica must fit one."
    )

    @model_validator(mode="after")
    def _cross_references(self) -> TieredConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: duplicate names in {names}")
        tenants = [t.name for t in self.tenants]
        if len(set(tenants)) != len(tenants):
            raise ValueError(f"tenants: duplicate names in {tenants}")
        for i, tenant in enumerate(self.tenants):
            for model in tenant.models:
                if model not in names:
                    raise ValueError(f"tenants[{i}].models: unknown model {model!r}")
            if tenant.dedicated and tenant.dedicated.model not in names:
                raise ValueError(
                    f"tenants[{i}].dedicated.model: unknown model {tenant.dedicated.model!r}"
                )
        return self

    def replica_specs(self) -> Iterator[tuple[str, ModelSpec, ReplicaSpec, int]]:
        """(where, model, replica, floor) for every deployment the app will create; the
        floor is a dedicated tenant's reservation, or a shared pool's starting replicas."""
        for i, m in enumerate(self.models):
            yield f"models[{i}].shared_pool", m, m.shared_pool, initial_replicas(m.shared_pool)
        for i, t in enumerate(self.tenants):
            if t.dedicated:
                model = self.model(t.dedicated.model)
                assert model is not None
                where = f"tenants[{i}].dedicated.replica"
                yield where, model, t.dedicated.replica, t.dedicated.reserved_replicas

    def validate_node_types(self) -> None:
        """Each replica must fit one node type (GPUs for its tp_size, its node-type
        resource), so a bad pairing fails at load rather than pending forever."""
        if not self.node_types:
            return
        nodes = [dict(n.resources) for n in self.node_types.values()]
        for where, model, replica, _ in self.replica_specs():
            validate_against_cluster(model, nodes, replica, where)

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def tenant(self, name: str) -> TenantSpec | None:
        return next((t for t in self.tenants if t.name == name), None)

    def validate_checkpoints(self) -> None:
        for where, model, replica, _ in self.replica_specs():
            validate_against_checkpoint(model, replica, where)


def load_config(path: str | Path | None = None, *, checkpoints: bool = True) -> TieredConfig:
    """Parse and validate a Tiered YAML; errors name the field.

    `checkpoints=False` skips the checks that read each model's config.json, for tools
    (like `tiered config render`) that run where the weights are not.
    """
    path = Path(path) if path else DEFAULT_CONFIG
    return parse_config(yaml.safe_load(path.read_text()), str(path), checkpoints=checkpoints)


def parse_config(data: dict, source: str = "config", *, checkpoints: bool = True) -> TieredConfig:
    try:
        config = TieredConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    config.validate_node_types()
    if checkpoints:
        config.validate_checkpoints()
    return config
