"""The one Tiered YAML: models, tenants, admin keys, dispatcher and ingress settings."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from deployments.serving_config import ConfigError, ModelSpec, validate_against_checkpoint
from deployments.tenancy_config import DispatchSpec, IngressSpec, TenantSpec

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "cluster" / "serve-default.yaml"


class TieredConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)
    tenants: list[TenantSpec] = []
    admin_key_hashes: list[str] = []
    revoked_key_hashes: list[str] = []
    dispatch: DispatchSpec = DispatchSpec()
    ingress: IngressSpec = IngressSpec()

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

    def model(self, name: str) -> ModelSpec | None:
        return next((m for m in self.models if m.name == name), None)

    def tenant(self, name: str) -> TenantSpec | None:
        return next((t for t in self.tenants if t.name == name), None)

    def validate_checkpoints(self) -> None:
        for i, m in enumerate(self.models):
            validate_against_checkpoint(m, m.shared_pool, f"models[{i}].shared_pool")
        for i, t in enumerate(self.tenants):
            if t.dedicated:
                model = self.model(t.dedicated.model)
                assert model is not None
                validate_against_checkpoint(
                    model, t.dedicated.replica, f"tenants[{i}].dedicated.replica"
                )


def load_config(path: str | Path | None = None) -> TieredConfig:
    """Parse and validate a Tiered YAML; errors name the field."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        config = TieredConfig.model_validate(yaml.safe_load(path.read_text()))
    except ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    config.validate_checkpoints()
    return config
