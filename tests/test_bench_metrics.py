"""The bench metric maths on synthetic request timestamps, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from bench.client import RequestRecord
from bench.metrics import (
    backlogged,
    backlogged_jain,
    binned,
    describe,
    e2el,
    intersect,
    is_good,
    itls,
    jain_index,
    percentile,
    served_in,
    summarize,
    tpot,
    ttft,
    union,
    weighted_jain,
)


def rec(send: float, chunks: list[float], end: float | None = None, *, tokens: int | None = None,
        tenant: str = "a", status: int = 200, tier: str = "shared", prompt: int = 10,
        cached: int = 0) -> RequestRecord:
    return RequestRecord(
        tenant=tenant, phase="p", send=send, chunks=chunks,
        end=end if end is not None else (chunks[-1] if chunks else send),
        status=status, service_tier=tier, prompt_tokens=prompt,
        completion_tokens=tokens if tokens is not None else len(chunks), cached_tokens=cached,
        error=None if status == 200 else f"http_{status}: x",
    )


def test_ttft_tpot_itl_e2e_of_one_request() -> None:
    # sent at 10.0; chunks at 10.2, 10.3, 10.5, 10.6; stream closes at 10.65
    r = rec(10.0, [10.2, 10.3, 10.5, 10.6], 10.65)
    assert ttft(r) == pytest.approx(0.2)
    assert e2el(r) == pytest.approx(0.65)
    # TPOT = (0.65 - 0.2) / (4 - 1) = 0.15
    assert tpot(r) == pytest.approx(0.15)
    assert itls(r) == pytest.approx([0.1, 0.2, 0.1])


def test_tpot_uses_usage_tokens_not_chunks() -> None:
    # two chunks, but usage says 5 tokens (a chunk may carry several): (1.0 - 0.2) / 4
    r = rec(0.0, [0.2, 1.0], 1.0, tokens=5)
    assert tpot(r) == pytest.approx(0.2)
    assert rec(0.0, [0.3], 0.3).output_tokens == 1
    assert tpot(rec(0.0, [0.3], 0.3)) is None  # one token: no TPOT


def test_failed_request_has_no_latencies() -> None:
    r = rec(0.0, [], 0.05, status=429, tokens=0)
    assert not r.ok and r.error_key == "429"
    assert ttft(r) is None and e2el(r) is None and tpot(r) is None and itls(r) == []


def test_percentile_is_linear_interpolation() -> None:
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4
    assert percentile(xs, 50) == pytest.approx(2.5)
    assert percentile(xs, 99) == pytest.approx(3.97)  # 1 + 0.99 * 3 = index 2.97
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert math.isnan(percentile([], 50))
    d = describe([0.1, 0.2, 0.3])
    assert d["mean"] == pytest.approx(200.0) and d["median"] == pytest.approx(200.0)
    assert d["p90"] == pytest.approx(280.0)  # 0.1 + 0.9 * 2 * 0.1 = 0.28 s


def test_summary_throughput_goodput_errors_and_tiers() -> None:
    records = [
        rec(0.0, [0.1, 0.2, 0.3], tokens=3, tier="dedicated", prompt=10, cached=4),  # TPOT 100
        rec(0.0, [0.6, 0.7], tokens=2, tier="shared", prompt=20),  # TTFT 600 ms: misses SLO
        rec(1.0, [1.1, 1.5, 1.9], tokens=3, tier="dedicated", prompt=30),  # TPOT 400 ms
        rec(1.0, [], 1.01, status=429, tokens=0),
        rec(1.5, [], 1.6, status=503, tokens=0),
    ]
    s = summarize(records, duration_s=2.0, slo_ms={"ttft": 500, "tpot": 200})
    assert (s["completed"], s["failed"]) == (3, 2)
    assert s["errors"] == {"429": 1, "503": 1}
    assert s["service_tiers"] == {"dedicated": 2, "shared": 1}
    assert s["prompt_tokens"] == 60 and s["output_tokens"] == 8 and s["cached_tokens"] == 4
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(4.0)
    assert s["total_token_throughput"] == pytest.approx(34.0)
    assert s["goodput"] == pytest.approx(0.5)  # only the first request meets both SLOs
    assert s["ttft"]["mean"] == pytest.approx((100 + 600 + 100) / 3)
    # TPOTs: 100 ms, 100 ms, 400 ms
    assert s["tpot"]["median"] == pytest.approx(100.0)
    assert s["tpot"]["mean"] == pytest.approx(200.0)
    # ITLs pooled: 100, 100, 100, 400, 400
    assert s["itl"]["mean"] == pytest.approx(220.0)
    assert s["e2el"]["max"] == pytest.approx(900.0)


def test_goodput_slo_on_e2el_and_one_token_answers() -> None:
    one = rec(0.0, [0.1], 0.1, tokens=1)
    assert is_good(one, {"ttft": 200, "tpot": 1})  # no TPOT: that SLO does not apply
    assert not is_good(one, {"e2el": 50})
    assert summarize([one], 1.0)["goodput"] is None  # no SLO given: no goodput


def test_jain_index() -> None:
    assert jain_index([5, 5, 5]) == pytest.approx(1.0)
    assert jain_index([1, 0]) == pytest.approx(0.5)  # one of two takes all: 1/n
    assert jain_index([1, 3]) == pytest.approx(16 / 20)  # (1+3)^2 / (2 * (1+9))
    assert math.isnan(jain_index([0, 0]))
    # weight 3 against 1: 300 and 100 served is exactly fair
    assert weighted_jain({"a": 300, "b": 100}, {"a": 3, "b": 1}) == pytest.approx(1.0)


def test_intervals() -> None:
    assert union([(3, 4), (0, 1), (0.5, 2)]) == [(0, 2), (3, 4)]
    assert intersect([(0, 2), (3, 5)], [(1, 4)]) == [(1, 2), (3, 4)]
    # waiting for the first token: [send, first chunk)
    records = [rec(0.0, [1.0, 1.2]), rec(0.5, [2.0]), rec(5.0, [5.5])]
    assert backlogged(records) == [(0.0, 2.0), (5.0, 5.5)]
    assert served_in(records, [(1.1, 2.1)]) == pytest.approx(2.0)  # chunks at 1.2 and 2.0


def test_jain_while_both_backlogged() -> None:
    # a is waiting over [0, 4) and [6, 8); b over [1, 7): both backlogged [1, 4) and [6, 7)
    a = [rec(0.0, [4.0, 4.5, 6.5], tenant="a"), rec(6.0, [8.0], tenant="a")]
    b = [rec(1.0, [7.0], tenant="b"), rec(1.5, [2.0, 3.0, 3.5, 6.2, 9.0], tenant="b")]
    # In [1, 4) ∪ [6, 7): a served 6.5 -> 1 token; b served 2.0, 3.0, 3.5, 6.2 -> 4 tokens.
    out = backlogged_jain({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, start=0.0, end=10.0)
    assert out["backlogged_s"] == pytest.approx(4.0)
    assert out["served_tokens"] == {"a": pytest.approx(1.0), "b": pytest.approx(4.0)}
    assert out["index"] == pytest.approx(25 / 34)  # (1+4)^2 / (2 * (1+16))
    # with b weighted 4, its 4 tokens are its fair share: perfectly fair
    fair = backlogged_jain({"a": a, "b": b}, {"a": 1.0, "b": 4.0}, start=0.0, end=10.0)
    assert fair["index"] == pytest.approx(1.0)


def test_binned_rates() -> None:
    events = [(0.1, 2.0), (0.9, 1.0), (1.5, 4.0), (9.0, 1.0)]
    assert binned(events, 0.0, 2.0, 1.0) == [3.0, 4.0]  # the event at 9.0 is outside
    assert binned(events, 0.0, 2.0, 2.0) == [3.5]
