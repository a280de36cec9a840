"""The bench metric maths on synthetic request timestamps, against hand-computed values
(conversation figures included: cache shares, affinity, cost at the configured prices)."""

from __future__ import annotations

import math

import pytest

from bench import conversation_metrics as cm
from bench.analysis import analyse, summaries
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
from bench.report import render_text
from bench.runner import RunResult
from bench.scenario import SCENARIO_DIR, parse_scenario
from deployments.config.prices import TokenPrice


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


# ---- conversations (bench.conversation_metrics, analysis kind `conversation`) ----------
def turn(conv: int, n: int, send: float, *, prompt: int, cached: int, reusable: int | None,
         replica: str, previous: str | None, tokens: int = 4, tenant: str = "a",
         status: int = 200, end: float | None = None) -> RequestRecord:
    r = rec(send, [send + 0.1] if status == 200 else [], end, tokens=tokens, tenant=tenant,
            status=status, prompt=prompt, cached=cached)
    r.turn, r.conversation, r.replica, r.previous_replica = n, conv, replica, previous
    r.reusable_tokens = reusable
    return r


def two_conversations() -> list[RequestRecord]:
    # conversation 1 stays on r1; conversation 2 moves to r2 at turn 2 (a cold prefix)
    return [
        turn(1, 1, 0.0, prompt=100, cached=0, reusable=None, replica="r1", previous=None),
        turn(1, 2, 1.0, prompt=200, cached=96, reusable=104, replica="r1", previous="r1"),
        turn(1, 3, 2.0, prompt=300, cached=192, reusable=204, replica="r1", previous="r1"),
        turn(2, 1, 0.5, prompt=100, cached=0, reusable=None, replica="r1", previous=None),
        turn(2, 2, 1.5, prompt=200, cached=0, reusable=104, replica="r2", previous="r1"),
        turn(2, 3, 2.5, prompt=300, cached=192, reusable=204, replica="r2", previous="r2"),
    ]


def test_cached_and_reused_shares_per_turn() -> None:
    records = two_conversations()
    later = [r for r in records if r.turn >= 2]
    # cached / input: (96 + 192 + 0 + 192) / (200 + 300 + 200 + 300) = 480 / 1000
    assert cm.cached_share(later) == pytest.approx(0.48)
    # cached / reusable: 480 / (104 + 204 + 104 + 204) = 480 / 616; turn 1 has nothing to reuse
    assert cm.reused_share(records) == pytest.approx(480 / 616)
    assert math.isnan(cm.reused_share([r for r in records if r.turn == 1]))
    # worst turn: turn 2 reuses 96 of 208, turn 3 384 of 408
    assert cm.over_turns(records, cm.reused_share) == pytest.approx(96 / 208)
    assert cm.over_turns(records, cm.reused_share, over="pooled") == pytest.approx(480 / 616)
    assert cm.over_turns(records, cm.reused_share, from_turn=3) == pytest.approx(384 / 408)
    rows = {row["turn"]: row for row in cm.turn_rows(records)}
    assert rows[1]["completed"] == 2 and math.isnan(rows[1]["reused_share"])
    assert rows[2]["cached_share"] == pytest.approx(96 / 400)
    assert rows[3]["mean_reusable_tokens"] == pytest.approx(204)
    assert rows[3]["ttft_p50_ms"] == pytest.approx(100.0)


def test_affinity_and_replica_load() -> None:
    records = two_conversations()
    # continuations: r1->r1, r1->r1, r1->r2 (moved), r2->r2
    assert cm.affinity_counts(records) == (3, 4)
    assert cm.affinity_rate(records) == pytest.approx(0.75)
    failed = turn(3, 2, 3.0, prompt=1, cached=0, reusable=1, replica="r2", previous="r1",
                  status=503)
    unknown = turn(4, 2, 3.0, prompt=1, cached=0, reusable=1, replica="r2", previous=None)
    assert cm.affinity_counts([*records, failed, unknown]) == (3, 4)  # neither counts
    assert cm.peak_in_flight([(0, 2), (1, 3), (2, 4), (2.5, 2.6)]) == 3
    assert cm.peak_in_flight([(0, 1), (1, 2)]) == 1  # back to back is no overlap
    records[0].end = 1.2  # conversation 1's turn 1 still streaming when its turn 2 starts
    load = cm.replica_load(records)
    assert load["r1"]["requests"] == 4 and load["r1"]["share"] == pytest.approx(4 / 6)
    assert load["r1"]["peak_in_flight"] == 2 and load["r2"]["peak_in_flight"] == 1


def test_conversation_cost_at_the_configured_prices() -> None:
    price = TokenPrice(model="m", tier="shared", input_per_1m=1.0, cached_input_per_1m=0.5,
                       output_per_1m=2.0)
    records = two_conversations()
    records.append(turn(3, 1, 3.0, prompt=100, cached=0, reusable=None, replica="r1",
                        previous=None))  # a conversation cut after turn 1

    def cost(r: cm.TurnRecord) -> float:
        return price.cost(r.prompt_tokens or 0, r.cached_tokens or 0, r.output_tokens)

    # conversation 1: uncached 100+104+108 at 1, cached 96+192 at 0.5, output 12 at 2 per 1M
    one = (312 * 1.0 + 288 * 0.5 + 12 * 2.0) / 1e6
    two = (100 + 200 + 108 + 192 * 0.5 + 12 * 2.0) / 1e6
    assert cm.conversation_costs(records, cost, turns=3) == pytest.approx([one, two])
    assert len(cm.conversation_costs(records, cost)) == 3  # no turn count: the cut one too
    assert cm.conversation_costs(records, lambda r: None, turns=3) == []  # no price


def conversation_result(records: list[RequestRecord]) -> RunResult:
    tenant = {"key": "k", "api": "responses", "ignore_eos": False, "conversation": {"turns": 3},
              "load": {"concurrency": 1}}
    figures = [
        {"kind": "conversation", "name": name, "tenant": "a", "figure": figure, **extra}
        for name, figure, extra in (
            ("reuse", "reused_share", {"goal": ">= 0.9"}),
            ("cached", "cached_share", {"over": "pooled"}),
            ("affinity", "affinity", {"goal": ">= 0.95"}),
            ("cost", "cost", {}),
        )
    ]
    scenario = parse_scenario({
        "name": "conv", "model": "tiny-llama",
        "target": {"tiered_config": "configs/p8-stateful.yaml"},
        "tenants": {"a": tenant}, "phases": [{"name": "p", "duration_s": 5}],
        "analysis": figures,
    }, SCENARIO_DIR / "conv.yaml")
    for r in records:
        r.service_tier = "shared"
    return RunResult(scenario, {}, t0=0.0, started_at="", records=records, finished=3.0)


def test_conversation_figures_in_the_analysis_and_report() -> None:
    result = conversation_result(two_conversations())
    figures = {f["name"]: f for f in analyse(result, {})}
    assert figures["reuse"]["value"] == pytest.approx(96 / 208) and figures["reuse"]["met"] is False
    assert figures["reuse"]["details"]["pooled"] == pytest.approx(480 / 616)
    assert figures["cached"]["value"] == pytest.approx(0.48) and figures["cached"]["met"] is None
    aff = figures["affinity"]
    assert aff["value"] == pytest.approx(0.75) and aff["met"] is False
    assert aff["details"]["seats_per_replica"] == 8 and aff["details"]["saturated"] == []
    # the p8 config's shared price: 0.20 input, 0.10 cached, 0.80 output per 1M tokens
    one = (312 * 0.20 + 288 * 0.10 + 12 * 0.80) / 1e6
    two = (408 * 0.20 + 192 * 0.10 + 12 * 0.80) / 1e6
    cost = figures["cost"]
    assert cost["value"] == pytest.approx((one + two) / 2) and cost["unit"] == "USD/conversation"
    assert cost["details"]["completed_conversations"] == 2
    text = render_text("conv", summaries(result, {}), list(figures.values()))
    for expected in ("Conversations per turn", "46.2%", "75.0%", "USD/conversation",
                     "3 of 4", "turns 2+: 46% 94%"):
        assert expected in text, expected
