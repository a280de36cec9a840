"""Scenario loading (errors name the field), the arrival processes (seeded), goals, the
`tiered bench` argument parsing, and every shipped scenario loads."""

from __future__ import annotations

import itertools
import random
import statistics
from pathlib import Path

import pytest
import yaml

from bench import arrivals
from bench.analysis_spec import goal_met
from bench.command import parse_endpoints, parse_goodput
from bench.scenario import (
    Load,
    ScenarioError,
    load_scenario,
    parse_scenario,
    shipped,
)


def minimal(**extra: object) -> dict:
    return {
        "name": "t",
        "model": "m",
        "tenants": {"a": {"key": "k", "load": {"rate": 1}}},
        "phases": [{"name": "p", "duration_s": 5}],
        **extra,
    }


def test_minimal_scenario_and_defaults() -> None:
    s = parse_scenario(minimal())
    assert s.duration_s == 5 and s.phase_loads(s.phases[0])["a"].rate == 1
    assert s.tenants["a"].output_tokens.value == 64
    assert s.phase_windows() == [("p", 0.0, 5.0)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tenants": {"a": {"load": {"rate": 1}}}}, "tenants.a: Value error, give exactly one"),
        ({"tenants": {"a": {"key": "k", "load": {"arrival": "poisson"}}}}, "needs rate"),
        ({"tenants": {"a": {"key": "k", "load": {"rate": 1, "concurrency": 2}}}}, "either"),
        ({"tenants": {"a": {"key": "k", "load": {"arrival": "burst", "rate": 1}}}},
         "burst_size and burst_every_s"),
        ({"tenants": {"a": {"key": "k", "prompt_tokens": {"dist": "uniform", "min": 9}}}},
         "tenants.a.prompt_tokens: Value error, dist 'uniform' needs max"),
        ({"phases": [{"name": "p", "duration_s": 0}]}, "phases.0.duration_s"),
        ({"phases": [{"name": "p", "duration_s": 5, "load": {"ghost": {"rate": 1}}}]},
         "unknown tenant 'ghost'"),
        ({"phases": [{"name": "p", "duration_s": 1}, {"name": "p", "duration_s": 1}]},
         "duplicate names"),
        ({"analysis": [{"kind": "ratio", "name": "r", "metric": "ttft.p42",
                        "numerator": {}, "denominator": {}}]}, "unknown metric 'ttft.p42'"),
        ({"analysis": [{"kind": "count", "name": "c", "select": {"phase": "nope"}}]},
         "unknown phase 'nope'"),
        ({"analysis": [{"kind": "count", "name": "c", "goal": "about 3"}]}, "goal"),
        ({"analysis": [{"kind": "nonsense", "name": "x"}]}, "analysis.0"),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
        ({"target": {"proxy": "nginx"}}, "target.proxy"),
    ],
)
def test_errors_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse_scenario(minimal(**change), Path("s.yaml"))
    assert "s.yaml" in str(err.value)
    assert message in str(err.value)


def test_a_scenario_may_name_its_proxy_mode() -> None:
    assert parse_scenario(minimal(target={"proxy": "serve"})).target.proxy == "serve"
    assert parse_scenario(minimal()).target.proxy is None  # then --proxy, else haproxy


def test_no_load_anywhere_is_an_error() -> None:
    with pytest.raises(ScenarioError, match="no phase has any load"):
        parse_scenario(minimal(tenants={"a": {"key": "k"}}))


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ScenarioError, match=r"bad\.yaml:1:16: not valid YAML/JSON \(") as err:
        load_scenario(bad)
    assert "\n" not in str(err.value)
    bad.write_text("- a list")
    with pytest.raises(ScenarioError, match="mapping at the top level"):
        load_scenario(bad)
    with pytest.raises(ScenarioError, match="no shipped scenario"):
        load_scenario("no_such_scenario")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(minimal()))
    assert load_scenario(good).source == good


def test_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    s = parse_scenario(minimal(tenants={"a": {"key_env": "BENCH_KEY", "load": {"rate": 1}}}))
    monkeypatch.delenv("BENCH_KEY", raising=False)
    with pytest.raises(ScenarioError, match="BENCH_KEY"):
        s.tenants["a"].api_key()
    monkeypatch.setenv("BENCH_KEY", "secret")
    assert s.tenants["a"].api_key() == "secret"


def test_every_shipped_scenario_loads() -> None:
    names = set(shipped())
    assert {"throughput_sweep", "p3_overhead", "p4_isolation", "p5_fairness", "p6_prefix",
            "p7_autoscale", "p8_stateful"} <= names
    for name in names:
        s = load_scenario(name)
        assert s.analysis, name
        # About four minutes at most each (P4 needs >= 300 samples in each phase).
        assert s.duration_s <= 240, name


def test_constant_arrivals() -> None:
    assert arrivals.constant(4, 1.0) == pytest.approx([0.0, 0.25, 0.5, 0.75])
    assert arrivals.constant(2, 1.2) == pytest.approx([0.0, 0.5, 1.0])


def test_poisson_is_seeded_with_the_right_rate() -> None:
    a = arrivals.poisson(10, 200, random.Random(7))
    assert a == arrivals.poisson(10, 200, random.Random(7))
    assert a != arrivals.poisson(10, 200, random.Random(8))
    assert all(0 <= t < 200 for t in a) and a == sorted(a)
    assert len(a) == pytest.approx(2000, rel=0.05)
    gaps = [b - x for x, b in itertools.pairwise(a)]
    # exponential gaps: mean 0.1 s and coefficient of variation 1
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.05)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.1)


def test_gamma_burstiness_changes_the_spread_not_the_rate() -> None:
    bursty = arrivals.gamma(10, 200, random.Random(1), shape=0.25)
    smooth = arrivals.gamma(10, 200, random.Random(1), shape=4.0)
    for times, cv in ((bursty, 2.0), (smooth, 0.5)):  # CV of gamma gaps = 1/sqrt(shape)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(times) == pytest.approx(2000, rel=0.1)
        assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(cv, rel=0.15)


def test_burst_and_schedule() -> None:
    assert arrivals.burst(3, 2.0, 5.0) == [0, 0, 0, 2.0, 2.0, 2.0, 4.0, 4.0, 4.0]
    load = Load(arrival="burst", burst_size=3, burst_every_s=2.0, max_requests=4)
    assert arrivals.schedule(load, 5.0, random.Random(0)) == [0, 0, 0, 2.0]
    assert load.offered_rate == 1.5
    with pytest.raises(ValueError, match="closed-loop"):
        arrivals.schedule(Load(concurrency=2), 5.0, random.Random(0))


def test_goals() -> None:
    assert goal_met("<= 1.25", 1.2) is True
    assert goal_met("<= 1.25", 1.3) is False
    assert goal_met(">= 0.95", 0.97) is True
    assert goal_met("== 0", 0.0) is True
    assert goal_met(None, 3.0) is None and goal_met("<= 1", None) is None
    assert goal_met("<= 1", float("nan")) is None


def test_command_arguments() -> None:
    assert parse_goodput(["ttft:500", "tpot:50"]) == {"ttft": 500.0, "tpot": 50.0}
    assert parse_goodput(None) == {}
    for bad in (["latency:5"], ["ttft:fast"], ["ttft:-1"]):
        with pytest.raises(ScenarioError, match="--goodput"):
            parse_goodput(bad)
    assert parse_endpoints(["echo=http://h:1/echo/v1/"]) == {"echo": "http://h:1/echo/v1"}
    with pytest.raises(ScenarioError, match="--endpoint"):
        parse_endpoints(["echo"])


def conversing(api: str, **extra: object) -> dict:
    tenant = {"key": "k", "api": api, "conversation": {"turns": 3}, "load": {"rate": 1}, **extra}
    return minimal(tenants={"a": tenant})


def test_responses_api_tenants() -> None:
    s = parse_scenario(conversing("responses", ignore_eos=False))
    assert s.tenants["a"].api == "responses" and s.tenants["a"].conversation.turns == 3
    assert s.tenants["a"].first_input("hi") == [{"role": "user", "content": "hi"}]
    # the default ignore_eos (a vLLM extension) is not sent; asking for it is an error
    assert parse_scenario(conversing("responses")).tenants["a"].ignore_eos
    with pytest.raises(ScenarioError, match="api: responses has no ignore_eos"):
        parse_scenario(conversing("responses", ignore_eos=True))
    with pytest.raises(ScenarioError, match="conversations need api: chat or api: responses"):
        parse_scenario(conversing("completions"))
    with pytest.raises(ScenarioError, match=r"tenants\.a\.api"):
        parse_scenario(conversing("assistants"))
    assert parse_scenario(minimal()).tenants["a"].first_input("hi") == [
        {"role": "user", "content": "hi"}]
    completions = minimal(tenants={"a": {"key": "k", "api": "completions", "load": {"rate": 1}}})
    assert parse_scenario(completions).tenants["a"].first_input("hi") == "hi"


def test_conversation_analysis_fields() -> None:
    figure = {"kind": "conversation", "name": "f", "tenant": "a", "figure": "reused_share",
              "goal": ">= 0.9"}
    a = parse_scenario(conversing("chat") | {"analysis": [figure]}).analysis[0]
    assert (a.figure, a.from_turn, a.over, a.phase) == ("reused_share", 2, "worst_turn", None)
    for change, message in (
        ({"tenant": "ghost"}, "unknown tenant 'ghost'"),
        ({"phase": "nope"}, "unknown phase 'nope'"),
        ({"figure": "vibes"}, "analysis.0.conversation.figure"),
        ({"over": "median"}, "analysis.0.conversation.over"),
        ({"from_turn": 0}, "analysis.0.conversation.from_turn"),
    ):
        with pytest.raises(ScenarioError, match=message):
            parse_scenario(conversing("chat") | {"analysis": [figure | change]})


def test_p8_stateful_arms() -> None:
    s = load_scenario("p8_stateful")
    arms = {name: t for name, t in s.tenants.items() if t.conversation}
    assert {t.api for t in arms.values()} == {"chat", "responses"}
    for t in arms.values():
        assert t.conversation is not None and t.conversation.turns == 10
        assert not t.ignore_eos  # the same stopping rule in both arms
    loads = s.phase_loads(s.phases[0])
    assert set(loads) == set(arms)  # side by side, in one phase
    assert all((load.max_requests or 0) >= 20 for load in loads.values())
    kinds = {(a.kind, getattr(a, "figure", None)) for a in s.analysis}
    assert {("conversation", f) for f in ("cached_share", "reused_share", "affinity",
                                          "cost")} <= kinds
