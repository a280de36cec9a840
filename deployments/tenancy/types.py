"""What crosses the admission boundary (ingress <-> admission actor), as typed records.

One request makes two calls: `admit(AdmissionRequest) -> Admission` when it arrives and
`finish(claim_id, UsageRecord | None)` when it ends, however it ends. Everything the
actor needs to decide (limits, weights, tier, spill) comes from the tenant's policy,
which the actor holds; the request carries only what varies per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from deployments.config.plan import Tier

RefusalReason = Literal[
    "rpm",  # requests per minute
    "tpm",  # tokens per minute
    "concurrency",  # too many requests in flight
    "dedicated_saturated",  # the private copy is full and the tenant chose no spill
    "queue_deadline",  # waited for a shared seat past the deadline
    "queue_full",  # too many waiters already
    "no_shared_pool",  # the model has no shared pool to serve or spill to
    "unknown_tenant",  # a config rollout in progress: this actor does not know the tenant
    "abandoned",  # the caller gave up while it waited
]
UsageStatus = Literal["ok", "client_disconnect", "error"]
# Refusals a retry soon cannot fix by itself answer 503, the rest 429.
UNAVAILABLE_REASONS = frozenset({"no_shared_pool", "unknown_tenant"})


@dataclass(frozen=True)
class AdmissionRequest:
    """One request asking for admission; `claim_id` names everything it will hold."""

    claim_id: str
    tenant: str
    model: str
    cost: int  # tokens reserved against TPM and charged to fair share: prompt + max_tokens * n
    prefer_dedicated: bool = True  # False for service_tier "default": go to the shared pool
    owner: str = ""  # the ingress replica, whose death frees the claim


@dataclass(frozen=True)
class RateLimitStatus:
    """The numbers behind OpenAI's x-ratelimit-* headers (None: no such limit)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


@dataclass(frozen=True)
class Refusal:
    reason: RefusalReason
    retry_after_s: float
    too_large: bool = False  # the cost alone exceeds the TPM limit: retrying cannot help

    @property
    def status(self) -> int:
        return 503 if self.reason in UNAVAILABLE_REASONS else 429


@dataclass(frozen=True)
class Admission:
    """Admission's answer: where the request runs, or why it may not."""

    claim_id: str
    limits: RateLimitStatus = field(default_factory=RateLimitStatus)
    tier: Tier | None = None
    spill: bool = False  # a dedicated tenant's overflow served by the shared pool
    band: int = 0  # engine priority: the tenant's band, shared priority when spilled
    waited_s: float = 0.0
    refusal: Refusal | None = None

    @property
    def admitted(self) -> bool:
        return self.refusal is None


@dataclass(frozen=True)
class HeldClaim:
    """A claim an ingress replica still holds; re-registered after the actor restarts."""

    request: AdmissionRequest
    admission: Admission
    admitted_at: float  # wall clock (time.time()), so it means the same after a restart


@dataclass(frozen=True)
class UsageRecord:
    """One finished request, as billing reads it (the ledger's row)."""

    request_id: str
    tenant: str
    model: str
    tier: Tier
    spill: bool
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    started_at: float  # wall clock
    ended_at: float
    status: UsageStatus = "ok"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TenantPolicy:
    """What admission applies to one tenant, from its config entry."""

    name: str
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    priority: int = 0
    weight: float = 1.0
    dedicated_model: str | None = None
    spill: bool = True


@dataclass(frozen=True)
class PoolSeats:
    """A pool's seats before any replica reports (floor x max_num_seqs), and its facts."""

    key: str
    tier: Tier
    seats: int
    price_per_replica_hour: float = 0.0
    fixed_replicas: int | None = None  # None when autoscaled: the policy exports desired


@dataclass(frozen=True)
class AdmissionConfig:
    """Everything the admission actor applies, derived from the Tiered config. A newer
    `version` replaces an older one in place: windows, seats and usage are kept."""

    tenants: dict[str, TenantPolicy]
    pools: dict[str, PoolSeats]
    max_queue_len: int = 1024
    queue_deadline_s: float = 30.0
    version: float = 0.0


@dataclass(frozen=True)
class HeartbeatReply:
    config_version: float
    restored: int  # claims of this ingress the actor did not know (it restarted)
    reclaimed: int  # claims of silent ingress replicas released on this beat


@dataclass
class UsageRow:
    """Usage summed per (tenant, model, tier served); spilled requests count under the
    shared tier and again in the spill counters, since they are billed at shared prices."""

    tenant: str
    model: str
    service_tier: Tier
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    spill_requests: int = 0
    spill_tokens: int = 0


@dataclass(frozen=True)
class PoolState:
    capacity: int
    in_use: int
    queued: int = 0
    queued_by_band: dict[int, int] = field(default_factory=dict)
    served_tokens: dict[str, int] = field(default_factory=dict)  # tenant -> tokens really used


@dataclass(frozen=True)
class AdmissionSnapshot:
    """The body of GET /admin/usage."""

    usage: list[UsageRow]
    pools: dict[str, PoolState]
    dedicated: dict[str, PoolState]
