"""Usage per (tenant, model, tier): what billing and capacity planning read."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class UsageCounters:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    spill_requests: int = 0
    spill_tokens: int = 0


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
        c = self._counters.setdefault((tenant, model, tier), UsageCounters())
        c.requests += 1
        c.prompt_tokens += prompt_tokens
        c.cached_tokens += cached_tokens
        c.completion_tokens += completion_tokens
        if spill:
            c.spill_requests += 1
            c.spill_tokens += prompt_tokens + completion_tokens

    def snapshot(self) -> list[dict]:
        return [
            {"tenant": t, "model": m, "service_tier": tier, **asdict(c)}
            for (t, m, tier), c in sorted(self._counters.items())
        ]
