"""Rate limits: exact RPM/TPM over a sliding minute, reserve-then-settle, concurrency
slots, TTL reclaim, restored claims, and OpenAI's headers and 429s for a refusal."""

from __future__ import annotations

import pytest

from deployments.api.limits import duration, ratelimit_headers, refusal_error, retry_headers
from deployments.config.tenants import TenantSpec
from deployments.tenancy.rate_limits import Decision, Limits, RateLimitState
from deployments.tenancy.types import Admission


def allowed(d: Decision) -> bool:
    return d.refusal is None


def reason(d: Decision) -> str | None:
    return d.refusal.reason if d.refusal else None


def test_rpm_is_exact_over_a_sliding_minute() -> None:
    state = RateLimitState()
    limits = Limits(rpm=10)
    results = [state.reserve("t", 1, limits, now=100.0 + i) for i in range(12)]
    assert [allowed(r) for r in results] == [True] * 10 + [False] * 2
    denied = results[10]
    assert reason(denied) == "rpm" and denied.refusal.retry_after_s == pytest.approx(100 + 60 - 110)
    assert results[0].status.remaining_requests == 9 and results[9].status.remaining_requests == 0
    assert not allowed(state.reserve("t", 1, limits, now=159.9))
    assert allowed(state.reserve("t", 1, limits, now=160.0))  # the first left the window
    assert not allowed(state.reserve("t", 1, limits, now=160.5))  # and only the first
    assert allowed(state.reserve("other", 1, limits, now=160.5))  # tenants are separate


def test_tpm_reserves_prompt_plus_max_tokens_then_settles_to_real_usage() -> None:
    state = RateLimitState()
    limits = Limits(tpm=1000)
    first = state.reserve("t", 800, limits, now=0.0)
    assert allowed(first) and first.status.remaining_tokens == 200
    blocked = state.reserve("t", 300, limits, now=1.0)
    assert not allowed(blocked) and reason(blocked) == "tpm" and not blocked.refusal.too_large
    assert blocked.refusal.retry_after_s == pytest.approx(59.0)  # when the 800 leave the window
    state.settle(first.reservation_id, 150)  # it used far less than it reserved
    second = state.reserve("t", 300, limits, now=2.0)
    assert allowed(second) and second.status.remaining_tokens == 1000 - 150 - 300
    state.settle(second.reservation_id, 900)  # more than reserved still counts, as used
    assert state.usage("t", now=3.0)["tokens"] == 1050
    assert reason(state.reserve("t", 0, limits, now=3.0)) == "tpm"
    assert allowed(state.reserve("t", 10, limits, now=61.0))  # 150 gone: 900 + 10 <= 1000
    huge = state.reserve("t", 5000, limits, now=200.0)
    assert not allowed(huge) and huge.refusal.too_large


def test_settling_twice_or_unknown_ids_changes_nothing() -> None:
    state = RateLimitState()
    limits = Limits(tpm=100, max_concurrency=5)
    d = state.reserve("t", 50, limits, now=0.0)
    state.settle(d.reservation_id, 10)
    state.settle(d.reservation_id, 90)
    state.settle(123456, 1)
    state.settle(None, 1)
    assert state.usage("t", now=0.0) == {"requests": 1, "tokens": 10, "open": 0}


def test_concurrency_slot_is_held_until_the_stream_closes() -> None:
    state = RateLimitState()
    limits = Limits(max_concurrency=2)
    a, b = (state.reserve("t", 1, limits, now=0.0) for _ in range(2))
    denied = state.reserve("t", 1, limits, now=1.0)
    assert reason(denied) == "concurrency" and denied.refusal.retry_after_s > 0
    state.settle(a.reservation_id, 1)
    assert allowed(state.reserve("t", 1, limits, now=2.0))
    state.settle(b.reservation_id, 0)  # never ran: slot back, nothing used
    assert state.usage("t", now=2.0) == {"requests": 3, "tokens": 2, "open": 1}


def test_a_restored_reservation_counts_from_its_admission_time() -> None:
    state = RateLimitState()
    limits = Limits(rpm=2, max_concurrency=2)
    state.reserve("t", 1, limits, now=50.0)
    state.restore("t", 1, at=10.0, now=50.0)  # re-registered after an actor restart
    assert state.usage("t", now=50.0) == {"requests": 2, "tokens": 2, "open": 2}
    assert not allowed(state.reserve("t", 1, limits, now=69.0))
    assert reason(state.reserve("t", 1, Limits(rpm=2), now=70.0)) is None  # 10 + 60 left


def test_unsettled_reservations_are_reclaimed_after_the_ttl() -> None:
    state = RateLimitState(reservation_ttl_s=120.0)
    limits = Limits(max_concurrency=1, tpm=100)
    lost = state.reserve("t", 80, limits, now=0.0)  # its ingress died: settle never comes
    assert not allowed(state.reserve("t", 1, limits, now=100.0))
    assert allowed(state.reserve("t", 1, limits, now=121.0))
    state.settle(lost.reservation_id, 5)  # too late: a no-op, not a second free slot
    assert state.usage("t", now=121.0)["open"] == 1


def test_limits_come_from_any_object_with_the_three_fields() -> None:
    state = RateLimitState()
    tenant = TenantSpec(name="t", rpm=1)
    assert allowed(state.reserve("t", 1, tenant, now=0.0))
    assert not allowed(state.reserve("t", 1, tenant, now=1.0))
    unlimited = state.reserve("v", 10**9, Limits(), now=0.0)
    assert allowed(unlimited) and ratelimit_headers(unlimited.status) == {}


def test_openai_headers_on_success_and_on_429() -> None:
    state = RateLimitState()
    limits = Limits(rpm=2, tpm=100)
    ok = state.reserve("t", 30, limits, now=0.0)
    assert ratelimit_headers(ok.status) == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "70",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    state.reserve("t", 30, limits, now=30.0)
    denied = state.reserve("t", 1, limits, now=30.25)
    error = refusal_error(Admission("c", denied.status, refusal=denied.refusal), "t")
    assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
    assert error.headers["retry-after"] == "30" and error.headers["retry-after-ms"] == "29750"
    assert error.headers["x-ratelimit-reset-requests"] == "59.75s" and "RPM" in error.message
    assert retry_headers(0.0) == {"retry-after": "1", "retry-after-ms": "1"}
    assert retry_headers(2.0001)["retry-after"] == "3"


def test_reset_duration_format() -> None:
    cases = {
        0: "0s",
        0.25: "250ms",
        0.0004: "1ms",
        1: "1s",
        1.5: "1.5s",
        6: "6s",
        86.4: "1m26.4s",
        360: "6m0s",
        3600: "1h0m0s",
    }
    assert {s: duration(s) for s in cases} == cases
