"""Rate limits: exact RPM/TPM over a sliding minute, reserve-then-settle, concurrency
slots, TTL reclaim, OpenAI's headers; and one limiter actor shared by two callers."""

from __future__ import annotations

import uuid

import pytest

from deployments.config.tenants import TenantSpec
from deployments.tenancy.rate_limits import (
    Limits,
    RateLimitState,
    duration,
    get_rate_limiter,
    ratelimit_headers,
    retry_headers,
    too_many_requests,
)


def test_rpm_is_exact_over_a_sliding_minute() -> None:
    state = RateLimitState()
    limits = Limits(rpm=10)
    results = [state.reserve("t", 1, limits, now=100.0 + i) for i in range(12)]
    assert [r.allowed for r in results] == [True] * 10 + [False] * 2
    denied = results[10]
    assert denied.reason == "rpm" and denied.retry_after_s == pytest.approx(100 + 60 - 110)
    assert results[0].remaining_requests == 9 and results[9].remaining_requests == 0
    assert not state.reserve("t", 1, limits, now=159.9).allowed
    assert state.reserve("t", 1, limits, now=160.0).allowed  # the first left the window
    assert not state.reserve("t", 1, limits, now=160.5).allowed  # and only the first
    assert state.reserve("other", 1, limits, now=160.5).allowed  # tenants are separate


def test_tpm_reserves_prompt_plus_max_tokens_then_settles_to_real_usage() -> None:
    state = RateLimitState()
    limits = Limits(tpm=1000)
    first = state.reserve("t", 800, limits, now=0.0)
    assert first.allowed and first.remaining_tokens == 200
    blocked = state.reserve("t", 300, limits, now=1.0)
    assert not blocked.allowed and blocked.reason == "tpm" and not blocked.too_large
    assert blocked.retry_after_s == pytest.approx(59.0)  # when the 800 leave the window
    state.settle(first.reservation_id, 150)  # it used far less than it reserved
    second = state.reserve("t", 300, limits, now=2.0)
    assert second.allowed and second.remaining_tokens == 1000 - 150 - 300
    state.settle(second.reservation_id, 900)  # more than reserved still counts, as used
    assert state.usage("t", now=3.0)["tokens"] == 1050
    assert state.reserve("t", 0, limits, now=3.0).reason == "tpm"
    assert state.reserve("t", 10, limits, now=61.0).allowed  # 150 gone: 900 + 10 <= 1000
    huge = state.reserve("t", 5000, limits, now=200.0)
    assert not huge.allowed and huge.too_large


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
    assert not denied.allowed and denied.reason == "concurrency" and denied.retry_after_s > 0
    state.settle(a.reservation_id, 1)
    assert state.reserve("t", 1, limits, now=2.0).allowed
    state.release(b.reservation_id)  # never ran: slot back, its reserved tokens stay
    assert state.usage("t", now=2.0) == {"requests": 3, "tokens": 3, "open": 1}


def test_unsettled_reservations_are_reclaimed_after_the_ttl() -> None:
    state = RateLimitState(reservation_ttl_s=120.0)
    limits = Limits(max_concurrency=1, tpm=100)
    lost = state.reserve("t", 80, limits, now=0.0)  # its ingress died: settle never comes
    assert not state.reserve("t", 1, limits, now=100.0).allowed
    assert state.reserve("t", 1, limits, now=121.0).allowed
    state.settle(lost.reservation_id, 5)  # too late: a no-op, not a second free slot
    assert state.usage("t", now=121.0)["open"] == 1


def test_limits_come_from_a_tenant_a_dict_or_the_configured_default() -> None:
    tenant = TenantSpec(name="t", rpm=1)
    state = RateLimitState(limits={"t": tenant})
    assert state.reserve("t", 1, now=0.0).allowed and not state.reserve("t", 1, now=1.0).allowed
    assert state.reserve("u", 1, {"rpm": 1}, now=0.0).allowed
    assert not state.reserve("u", 1, tenant, now=1.0).allowed
    unlimited = state.reserve("v", 10**9, now=0.0)
    assert unlimited.allowed and unlimited.headers == {}


def test_openai_headers_on_success_and_on_429() -> None:
    state = RateLimitState()
    limits = Limits(rpm=2, tpm=100)
    ok = state.reserve("t", 30, limits, now=0.0)
    assert ok.headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "70",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    state.reserve("t", 30, limits, now=30.0)
    denied = state.reserve("t", 1, limits, now=30.25)
    assert denied.headers["retry-after"] == "30" and denied.headers["retry-after-ms"] == "29750"
    assert denied.headers["x-ratelimit-reset-requests"] == "59.75s"
    assert ratelimit_headers(denied) == denied.headers
    error = too_many_requests(denied, "t")
    assert (error.status, error.type, error.code) == (429, "requests", "rate_limit_exceeded")
    assert error.headers["retry-after"] == "30" and "RPM" in error.message
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


# ---- one actor, two callers ------------------------------------------------------------
def test_one_limiter_actor_holds_limits_across_two_callers(local_ray) -> None:  # type: ignore[no-untyped-def]
    ray = local_ray
    name = f"limits-{uuid.uuid4().hex[:8]}"

    @ray.remote(num_cpus=0)
    class Caller:
        """Stands in for an ingress replica: its own process, the limiter found by name."""

        def __init__(self, name: str) -> None:
            self.limiter = get_rate_limiter(name, namespace="tiered-test")

        async def reserve(self, tenant: str, n: int, limits: dict) -> list[dict]:
            return [await self.limiter.reserve.remote(tenant, 10, limits) for _ in range(n)]

        async def settle(self, reservation_id: int, tokens: int) -> None:
            await self.limiter.settle.remote(reservation_id, tokens)

    first, second = Caller.remote(name), Caller.remote(name)
    rpm = {"rpm": 10, "tpm": None, "max_concurrency": None}
    results = ray.get([first.reserve.remote("acme", 8, rpm), second.reserve.remote("acme", 8, rpm)])
    decisions = [d for batch in results for d in batch]
    assert sum(d["allowed"] for d in decisions) == 10  # not 8 + 8: the window is shared
    assert {d["reason"] for d in decisions if not d["allowed"]} == {"rpm"}

    slot = {"rpm": None, "tpm": None, "max_concurrency": 1}
    (held,) = ray.get(first.reserve.remote("beta", 1, slot))
    (blocked,) = ray.get(second.reserve.remote("beta", 1, slot))
    assert held["allowed"] and not blocked["allowed"] and blocked["reason"] == "concurrency"
    ray.get(first.settle.remote(held["reservation_id"], 3))  # the stream closed
    (got,) = ray.get(second.reserve.remote("beta", 1, slot))
    assert got["allowed"]

    limiter = get_rate_limiter(name, namespace="tiered-test")  # the same actor, by name
    assert ray.get(limiter.usage.remote("beta")) == {"requests": 2, "tokens": 13, "open": 1}
    for actor in (first, second, limiter):
        ray.kill(actor)
