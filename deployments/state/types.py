"""What the ledger takes and answers, as typed records (the write side is UsageRecord)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, get_args

GroupKey = Literal["tenant", "tier", "model", "day", "spill", "adapter"]
GROUP_KEYS: tuple[GroupKey, ...] = get_args(GroupKey)


def _aware(name: str, value: datetime | None) -> None:
    if value is not None and value.tzinfo is None:
        raise ValueError(f"{name} must be timezone-aware (UTC)")


@dataclass(frozen=True)
class ReservationSeconds:
    """Seconds one reserved replica was alive within one UTC hour (`hour` is its start)."""

    tenant: str
    model: str
    replica_id: str
    hour: datetime
    seconds: float

    def __post_init__(self) -> None:
        _aware("hour", self.hour)
        if (self.hour.minute, self.hour.second, self.hour.microsecond) != (0, 0, 0):
            raise ValueError("hour must be the start of an hour")
        if not 0 <= self.seconds <= 3600:
            raise ValueError("seconds must be within [0, 3600]")


@dataclass(frozen=True)
class UsageQuery:
    """Rows whose `ended_at` is in [start, end) (None: unbounded), optionally one tenant,
    summed per distinct value of the `group_by` keys (none: one total row)."""

    start: datetime | None = None
    end: datetime | None = None
    tenant: str | None = None
    group_by: tuple[GroupKey, ...] = ()

    def __post_init__(self) -> None:
        _aware("start", self.start)
        _aware("end", self.end)
        unknown = [k for k in self.group_by if k not in GROUP_KEYS]
        if unknown:
            raise ValueError(f"unknown group keys {unknown}; choose from {list(GROUP_KEYS)}")
        if len(set(self.group_by)) != len(self.group_by):
            raise ValueError("group_by repeats a key")


@dataclass(frozen=True)
class UsageAggregate:
    """One group's sums. `key` values are strings: day "YYYY-MM-DD" (UTC), spill
    "true"/"false"."""

    key: dict[GroupKey, str] = field(default_factory=dict)
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
