"""Usage per (tenant, model, tier): what billing and capacity planning read.

`record(UsageRecord)` is the one path every finished request takes. Spilled requests (a
dedicated tenant's overflow served by the shared pool) are counted under tier "shared"
and also in the spill counters, because they are billed at the shared price. A record
replayed after an outage (same request id) is counted once.

This meter keeps the sums in memory; the durable ledger replaces it behind the same
`record` call.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace

from deployments.tenancy.types import UsageRecord, UsageRow

RECENT_IDS = 100_000  # request ids remembered to drop replays


class UsageMeter:
    def __init__(self) -> None:
        self._rows: dict[tuple[str, str, str], UsageRow] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()

    def record(self, usage: UsageRecord) -> bool:
        """Count one finished request; False for a replay already counted. Raises
        ValueError for counts that cannot be real."""
        if usage.tier not in ("shared", "dedicated"):
            raise ValueError(f"tier must be 'shared' or 'dedicated', got {usage.tier!r}")
        if usage.spill and usage.tier != "shared":
            raise ValueError("spilled requests are served by the shared pool")
        if min(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) < 0:
            raise ValueError("token counts must be >= 0")
        if usage.cached_tokens > usage.prompt_tokens:
            raise ValueError(
                f"cached_tokens {usage.cached_tokens} > prompt_tokens {usage.prompt_tokens}"
            )
        if usage.request_id in self._seen:
            return False
        self._seen[usage.request_id] = None
        if len(self._seen) > RECENT_IDS:
            self._seen.popitem(last=False)
        key = (usage.tenant, usage.model, usage.tier)
        row = self._rows.setdefault(key, UsageRow(usage.tenant, usage.model, usage.tier))
        row.requests += 1
        row.prompt_tokens += usage.prompt_tokens
        row.cached_tokens += usage.cached_tokens
        row.completion_tokens += usage.completion_tokens
        if usage.spill:
            row.spill_requests += 1
            row.spill_tokens += usage.total_tokens
        return True

    def snapshot(self) -> list[UsageRow]:
        """One row per (tenant, model, service_tier), sorted."""
        return [replace(self._rows[key]) for key in sorted(self._rows)]
