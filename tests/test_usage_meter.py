"""Usage per (tenant, model, tier): counters, spill apart, replays counted once, bad input."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from deployments.tenancy.types import UsageRecord
from deployments.tenancy.usage import UsageMeter

_ids = itertools.count()


def _record(tenant: str, tier: Any, spill: bool = False, model: str = "m", **tokens: int):
    counts = {"prompt_tokens": 10, "cached_tokens": 4, "completion_tokens": 5, **tokens}
    return UsageRecord(f"r{next(_ids)}", tenant, model, tier, spill, started_at=0.0,
                       ended_at=1.0, **counts)


def test_counters_per_tenant_model_and_tier_with_spill_apart() -> None:
    meter = UsageMeter()
    meter.record(_record("acme", "dedicated"))
    meter.record(_record("acme", "dedicated", prompt_tokens=20, cached_tokens=0))
    meter.record(_record("acme", "shared", spill=True, completion_tokens=7))  # overflow
    meter.record(_record("globex", "shared"))
    meter.record(_record("globex", "shared", model="other", prompt_tokens=1, cached_tokens=0))
    rows = {(r.tenant, r.model, r.service_tier): r for r in meter.snapshot()}
    assert list(rows) == sorted(rows)
    dedicated = rows[("acme", "m", "dedicated")]
    assert (dedicated.requests, dedicated.prompt_tokens, dedicated.cached_tokens) == (2, 30, 4)
    assert dedicated.completion_tokens == 10 and dedicated.spill_requests == 0
    spilled = rows[("acme", "m", "shared")]
    assert (spilled.spill_requests, spilled.spill_tokens) == (1, 17)
    assert rows[("globex", "m", "shared")].spill_tokens == 0
    assert rows[("globex", "other", "shared")].prompt_tokens == 1


def test_a_replayed_record_is_counted_once() -> None:
    meter = UsageMeter()
    record = _record("acme", "shared")
    assert meter.record(record) and not meter.record(record)
    (row,) = meter.snapshot()
    assert row.requests == 1 and row.prompt_tokens == 10


def test_snapshots_are_copies() -> None:
    meter = UsageMeter()
    meter.record(_record("acme", "shared"))
    (before,) = meter.snapshot()
    meter.record(_record("acme", "shared"))
    assert before.requests == 1 and meter.snapshot()[0].requests == 2


@pytest.mark.parametrize(
    ("tier", "spill", "tokens"),
    [
        ("gold", False, {}),
        ("dedicated", True, {}),  # spill is served by the shared pool
        ("shared", False, {"prompt_tokens": -1}),
        ("shared", False, {"cached_tokens": 11}),  # more cached than prompt
    ],
)
def test_impossible_records_are_refused(tier: str, spill: bool, tokens: dict) -> None:
    meter = UsageMeter()
    with pytest.raises(ValueError):
        meter.record(_record("acme", tier, spill, **tokens))
    assert meter.snapshot() == []
