"""What crosses the admission boundary (ingress <-> admission actor), as typed records.

One request makes two calls: `admit(AdmissionRequest) -> Admission` when it arrives and
`finish(claim_id, UsageRecord | None)` when it ends, however it ends. Everything the
actor needs to decide (limits, weights, tier, spill) comes from the tenant's policy,
which the actor holds; the request carries only what varies per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from deployments.config.plan import BilledTier, Tier
from deployments.state.config import StateSpec

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
    # Admitted by the tenant's own shard, which reserved its limits: the shared shard
    # only seats it in the shared pool (deployments.tenancy.shards).
    limits_reserved: bool = False


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
    # Admitted by a tenant's shard, which has no shared pool: the spill is seated by the
    # shared shard next (deployments.tenancy.shards).
    seat_elsewhere: bool = False

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
    tier: BilledTier  # training: a fine-tuning job's trained tokens, as prompt_tokens
    spill: bool
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    started_at: float  # wall clock
    ended_at: float
    status: UsageStatus = "ok"
    adapter: str | None = None

    def __post_init__(self) -> None:
        """A record that cannot be real is refused when made, not billed."""
        if self.tier not in ("shared", "dedicated", "training"):
            raise ValueError(f"tier must be 'shared', 'dedicated' or 'training', got {self.tier!r}")
        if self.spill and self.tier != "shared":
            raise ValueError("spilled requests are served by the shared pool")
        if min(self.prompt_tokens, self.cached_tokens, self.completion_tokens) < 0:
            raise ValueError("token counts must be >= 0")
        if self.cached_tokens > self.prompt_tokens:
            raise ValueError(
                f"cached_tokens {self.cached_tokens} > prompt_tokens {self.prompt_tokens}"
            )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class ServedUsage:
    """What a model server produced for one claim's request, as the usage record the
    ingress would have made. Admission keeps it with the claim and bills it only if the
    claim ends as an orphan (its ingress died before finishing it); a finish drops it."""

    claim_id: str
    record: UsageRecord


@dataclass(frozen=True)
class LedgerStatus:
    """What the admission actor knows of some request ids' usage records. An id in
    neither set is unknown to it (it restarted, losing what it had not written): the
    ingress that holds the record sends it again."""

    committed: frozenset[str]  # in the database
    pending: frozenset[str]  # queued in the actor's writer


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
    model: str = ""
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
    state: StateSpec | None = None  # the ledger's database; None: usage is not kept
    shard: str | None = None  # a dedicated tenant's own shard; None: the shared one
    node_resource: str | None = None  # the shard actor runs where this resource is


@dataclass(frozen=True)
class HeartbeatReply:
    config_version: float
    restored: int  # claims of this ingress the actor did not know (it restarted)
    reclaimed: int  # claims of silent ingress replicas released on this beat


@dataclass(frozen=True)
class PoolState:
    capacity: int
    in_use: int
    queued: int = 0
    queued_by_band: dict[int, int] = field(default_factory=dict)
    served_tokens: dict[str, int] = field(default_factory=dict)  # tenant -> tokens really used


@dataclass(frozen=True)
class AdmissionSnapshot:
    """The body of GET /admin/state: seats and queues now (usage is in the ledger)."""

    pools: dict[str, PoolState]
    dedicated: dict[str, PoolState]
