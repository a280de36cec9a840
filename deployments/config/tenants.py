"""Tenants, tiers, limits and admission settings (the `tenants:` part of the YAML).

Validation happens here, at load time, so that a typo in a key hash or a dedicated
section fails `tiered serve` with the field named instead of denying traffic later.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from deployments.config.models import ReplicaSpec

HASH_PREFIX = "sha256:"
# A stored API key: "sha256:" + 64 hex digits, kept lowercased (see tenancy.keys.hash_key).
HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
TENANT_NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
TenantName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=TENANT_NAME_PATTERN)
]
_TENANT_NAME = TypeAdapter(TenantName)


def is_tenant_name(name: str) -> bool:
    """TenantSpec.name's own check, for tools outside pydantic (`tiered keys new`)."""
    try:
        _TENANT_NAME.validate_python(name)
    except ValidationError:
        return False
    return True


def key_hash(value: str) -> str:
    """A well-formed stored hash, lowercased; else ValueError. The value is never echoed:
    a plaintext key pasted where a hash belongs must not end up in logs."""
    text = value.strip().lower()
    if not HASH_RE.fullmatch(text):
        raise ValueError(
            "not a key hash: expected 'sha256:' and 64 hex digits (`tiered keys new` prints one)"
        )
    return text


KeyHash = Annotated[str, AfterValidator(key_hash)]


def check_unique_keys(entries: Iterable[tuple[str, str]]) -> None:
    """(where, hash) pairs from every source: a hash listed twice is refused naming both
    places, since one key must grant exactly one identity (tenant or admin)."""
    first: dict[str, str] = {}
    for where, digest in entries:
        if digest in first:
            raise ValueError(
                f"{where}: the same key as {first[digest]}; a key may be listed only once"
            )
        first[digest] = where


class FrontDoorSpec(BaseModel):
    """A dedicated tenant's own entry: ingress replicas of its own, placed on its node type
    (`replica.node_type_resource`) and reached through the Serve proxy of those nodes, with
    its own admission shard, so none of its requests queue behind shared traffic."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(1, ge=1)
    route_prefix: str | None = Field(
        None, description="URL prefix of this tenant's entry; default /tenants/<name>."
    )

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value):
            raise ValueError(
                f"{value!r}: a path like /tenants/acme (starts with '/', no trailing '/')"
            )
        return value


class DedicatedSpec(BaseModel):
    """Reserved replicas of one model: a private copy no other tenant's traffic reaches."""

    model_config = ConfigDict(extra="forbid")

    model: str
    reserved_replicas: int = Field(1, ge=1)
    max_replicas: int | None = Field(None, ge=1)
    spill: bool = True
    replica: ReplicaSpec = ReplicaSpec()
    front_door: FrontDoorSpec | None = Field(
        None, description="Give this tenant its own ingress, proxy and admission shard."
    )
    fine_tune_on_reservation: bool = Field(
        False,
        description="Train this tenant's fine-tuning jobs of `model` on its own reserved "
        "node type (replica.node_type_resource) instead of the shared pool's.",
    )

    @model_validator(mode="after")
    def _reservation_fits(self) -> DedicatedSpec:
        if self.max_replicas is not None and self.max_replicas < self.reserved_replicas:
            raise ValueError(
                f"reserved_replicas={self.reserved_replicas} exceeds "
                f"max_replicas={self.max_replicas}"
            )
        if self.fine_tune_on_reservation and self.replica.node_type_resource is None:
            raise ValueError(
                "fine_tune_on_reservation needs replica.node_type_resource (the reserved "
                "node type to train on)"
            )
        return self


class RetentionSpec(BaseModel):
    """How long the stateful API keeps a tenant's objects; None keeps them until deleted.
    OpenAI keeps responses 30 days and conversations until deleted."""

    model_config = ConfigDict(extra="forbid")

    responses_days: float | None = Field(30.0, gt=0)
    conversations_days: float | None = Field(None, gt=0)


class TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: TenantName
    tier: Literal["shared", "dedicated"] = "shared"
    api_key_hashes: list[KeyHash] = []
    priority: int = Field(0, description="Band in the shared pool; higher goes first.")
    weight: float = Field(1.0, gt=0, description="Share of tokens against others in its band.")
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_concurrency: int | None = Field(None, ge=1)
    models: list[str] = Field(default_factory=list, description="Allowed models; empty = all.")
    dedicated: DedicatedSpec | None = None
    retention: RetentionSpec = RetentionSpec()

    @model_validator(mode="after")
    def _tier_matches(self) -> TenantSpec:
        if self.tier == "dedicated" and self.dedicated is None:
            raise ValueError(f"tenant {self.name!r}: tier 'dedicated' needs a 'dedicated' section")
        if self.tier == "shared" and self.dedicated is not None:
            raise ValueError(f"tenant {self.name!r}: tier 'shared' cannot have 'dedicated'")
        if self.dedicated is not None and not self.may_use(self.dedicated.model):
            raise ValueError(
                f"tenant {self.name!r}: dedicated model {self.dedicated.model!r} "
                f"is not among its allowed models {self.models}"
            )
        return self

    def may_use(self, model: str) -> bool:
        return not self.models or model in self.models


def tenant_key_places(tenants: Iterable[TenantSpec]) -> list[tuple[str, str]]:
    """(where, hash) for every tenant key in the YAML, `where` naming field and tenant."""
    return [
        (f"tenants[{i}].api_key_hashes[{j}] (tenant {t.name!r})", digest)
        for i, t in enumerate(tenants)
        for j, digest in enumerate(t.api_key_hashes)
    ]


def check_tenants(tenants: list[TenantSpec]) -> list[TenantSpec]:
    """Names unique; no key hash listed twice (under two tenants it would authenticate as
    either, and the last one would win)."""
    names = [t.name for t in tenants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate tenant names: {duplicates}")
    check_unique_keys(tenant_key_places(tenants))
    return tenants


# `tenants: Tenants = []` in a config model applies check_tenants at load time.
Tenants = Annotated[list[TenantSpec], AfterValidator(check_tenants)]


class DispatchSpec(BaseModel):
    """The fair dispatcher of each shared pool (the same settings for every pool)."""

    model_config = ConfigDict(extra="forbid")

    queue_deadline_s: float = Field(30.0, gt=0, description="Longest wait for a slot, then 429.")
    max_queue_len: int = Field(1024, ge=1, description="Waiters per pool beyond which 429.")


class IngressSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(2, ge=1)
    node_type_resource: str | None = Field(
        None,
        description="Custom resource that pins the shared front door (ingress replicas, "
        "the shared admission shard, the fine-tuning runner) to one node type.",
    )
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description="At most this many ingress replicas on one node (Serve's option), so "
        "losing a node cannot take every ingress replica; leave unset on a one-node cluster.",
    )
    max_body_bytes: int = Field(1_048_576, ge=1024)
    default_max_tokens: int = Field(256, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)
    stream_coalesce_ms: float = Field(
        2.0, ge=0, le=100, description="A streamed token waits at most this long for the "
        "next ones, to go out in one SSE event (0: one event per engine step); the first "
        "never waits.",
    )
    shed_loop_lag_ms: float = Field(
        1000.0, ge=0, description="While an ingress replica's event loop runs this much "
        "late, it answers new requests 503 with Retry-After at once (0: never sheds).",
    )
