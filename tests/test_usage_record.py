"""A usage record that cannot be real is refused when it is made, so it is never billed."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.tenancy.types import UsageRecord


def _record(tier: Any, spill: bool, **tokens: int) -> UsageRecord:
    counts = {"prompt_tokens": 10, "cached_tokens": 4, "completion_tokens": 5, **tokens}
    return UsageRecord("r1", "acme", "m", tier, spill, started_at=0.0, ended_at=1.0, **counts)


def test_a_real_record_totals_prompt_and_completion() -> None:
    assert _record("shared", True).total_tokens == 15


@pytest.mark.parametrize(
    ("tier", "spill", "tokens", "message"),
    [
        ("gold", False, {}, "tier must be"),
        ("dedicated", True, {}, "spilled requests are served by the shared pool"),
        ("shared", False, {"prompt_tokens": -1}, "token counts must be >= 0"),
        ("shared", False, {"cached_tokens": 11}, "cached_tokens 11 > prompt_tokens 10"),
    ],
)
def test_impossible_records_are_refused(
    tier: str, spill: bool, tokens: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _record(tier, spill, **tokens)
