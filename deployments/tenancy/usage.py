"""Usage per (tenant, model, tier): what billing and capacity planning read.

Spilled requests (a dedicated tenant's overflow served by the shared pool) are counted
under tier "shared" and also in the spill counters, because they are billed at the
shared price. `UsageMeter` is plain Python; `UsageMeterActor` is the one instance every
ingress replica records into and GET /admin/usage reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import ray

ACTOR_NAME = "tiered-usage"
ACTOR_NAMESPACE = "tiered"
Tier = Literal["shared", "dedicated"]


@dataclass
class UsageCounters:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    spill_requests: int = 0
    spill_tokens: int = 0

    def add(self, other: UsageCounters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class UsageMeter:
    def __init__(self) -> None:
        self._counters: dict[tuple[str, str, str], UsageCounters] = {}

    def record(
        self,
        tenant: str,
        model: str,
        tier: str,
        *,
        spill: bool,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
    ) -> None:
        """One finished request. Raises ValueError for counts that cannot be real."""
        if tier not in ("shared", "dedicated"):
            raise ValueError(f"tier must be 'shared' or 'dedicated', got {tier!r}")
        if spill and tier != "shared":
            raise ValueError("spilled requests are served by the shared pool")
        if min(prompt_tokens, cached_tokens, completion_tokens) < 0:
            raise ValueError("token counts must be >= 0")
        if cached_tokens > prompt_tokens:
            raise ValueError(f"cached_tokens {cached_tokens} > prompt_tokens {prompt_tokens}")
        c = self._counters.setdefault((tenant, model, tier), UsageCounters())
        c.requests += 1
        c.prompt_tokens += prompt_tokens
        c.cached_tokens += cached_tokens
        c.completion_tokens += completion_tokens
        if spill:
            c.spill_requests += 1
            c.spill_tokens += prompt_tokens + completion_tokens

    def snapshot(self) -> list[dict[str, Any]]:
        """One row per (tenant, model, service_tier), sorted; the body of /admin/usage."""
        return [
            {"tenant": t, "model": m, "service_tier": tier, **asdict(c)}
            for (t, m, tier), c in sorted(self._counters.items())
        ]

    def totals(self) -> dict[str, dict[str, int]]:
        """Counters summed per tenant over models and tiers."""
        out: dict[str, UsageCounters] = {}
        for (tenant, _, _), c in self._counters.items():
            out.setdefault(tenant, UsageCounters()).add(c)
        return {tenant: asdict(c) for tenant, c in sorted(out.items())}


@ray.remote(num_cpus=0)
class UsageMeterActor:
    """The shared meter. Async methods: recording never blocks a request path."""

    def __init__(self) -> None:
        self.meter = UsageMeter()

    async def record(self, usage: dict[str, Any]) -> None:
        self.meter.record(**usage)

    async def snapshot(self) -> list[dict[str, Any]]:
        return self.meter.snapshot()

    async def totals(self) -> dict[str, dict[str, int]]:
        return self.meter.totals()


def get_usage_meter(
    name: str = ACTOR_NAME, namespace: str = ACTOR_NAMESPACE, *, detached: bool = False
) -> ray.actor.ActorHandle:
    """The named meter, created by whichever caller comes first (get-if-exists).

    Pass detached=True in production so the counts outlive the replica that created it.
    """
    options: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    return UsageMeterActor.options(**options).remote()
