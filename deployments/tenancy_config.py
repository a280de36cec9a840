"""Tenants, tiers, limits and admission settings (the `tenants:` part of the YAML)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.serving_config import ReplicaSpec


class DedicatedSpec(BaseModel):
    """Reserved replicas of one model: a private copy no other tenant's traffic reaches."""

    model_config = ConfigDict(extra="forbid")

    model: str
    reserved_replicas: int = Field(1, ge=1)
    max_replicas: int | None = Field(None, ge=1)
    spill: bool = True
    replica: ReplicaSpec = ReplicaSpec()

    @model_validator(mode="after")
    def _reservation_fits(self) -> DedicatedSpec:
        if self.max_replicas is not None and self.max_replicas < self.reserved_replicas:
            raise ValueError(
                f"reserved_replicas={self.reserved_replicas} exceeds "
                f"max_replicas={self.max_replicas}"
            )
        return self


class TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    tier: Literal["shared", "dedicated"] = "shared"
    api_key_hashes: list[str] = []
    priority: int = Field(0, description="Band in the shared pool; higher goes first.")
    weight: float = Field(1.0, gt=0)
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    models: list[str] = Field(default_factory=list, description="Allowed models; empty = all.")
    dedicated: DedicatedSpec | None = None

    @model_validator(mode="after")
    def _tier_matches(self) -> TenantSpec:
        if self.tier == "dedicated" and self.dedicated is None:
            raise ValueError(f"tenant {self.name!r}: tier 'dedicated' needs a 'dedicated' section")
        if self.tier == "shared" and self.dedicated is not None:
            raise ValueError(f"tenant {self.name!r}: tier 'shared' cannot have 'dedicated'")
        return self

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models


class DispatchSpec(BaseModel):
    """The shared pool's fair dispatcher."""

    model_config = ConfigDict(extra="forbid")

    queue_deadline_s: float = Field(30.0, gt=0)
    max_queue_len: int = Field(1024, ge=1)


class IngressSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(2, ge=1)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    default_max_tokens: int = Field(256, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)
