"""From a run's records to the figures: summaries per tenant, per phase and overall, and
the scenario's own analyses (ratios between selections, error counts, Jain's index while
backlogged, a rate sweep, an autoscaling step, conversation figures), each judged against
its goal."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import conversation_metrics as cm
from bench.analysis_spec import (
    AutoscaleAnalysis,
    ConversationAnalysis,
    CountAnalysis,
    JainAnalysis,
    RatioAnalysis,
    Selection,
    SweepAnalysis,
    goal_met,
)
from bench.client import RequestRecord
from bench.metrics import backlogged_jain, metric_value, summarize, ttft
from bench.runner import RunResult
from bench.scenario import Scenario


def _windows(result: RunResult) -> dict[str, tuple[float, float]]:
    """Each phase's (start, end), absolute perf_counter() seconds."""
    return {n: (result.t0 + a, result.t0 + b) for n, a, b in result.scenario.phase_windows()}


def select(result: RunResult, sel: Selection) -> list[RequestRecord]:
    start = _windows(result)[sel.phase][0] if sel.phase else result.t0
    return [
        r
        for r in result.records
        if (sel.tenant is None or r.tenant == sel.tenant)
        and (sel.phase is None or r.phase == sel.phase)
        and (sel.turn is None or r.turn == sel.turn)
        and r.send >= start + sel.skip_s
    ]


def _duration(result: RunResult, sel: Selection) -> float:
    """A phase's own length (less the skipped start); the whole run's otherwise."""
    if sel.phase:
        a, b = _windows(result)[sel.phase]
        return b - a - sel.skip_s
    return result.finished - result.t0 - sel.skip_s


def summaries(result: RunResult, slo_ms: dict[str, float]) -> dict:
    """overall, per tenant, and per phase (all tenants and each tenant)."""
    everything = Selection()
    out: dict = {
        "overall": summarize(result.records, _duration(result, everything), slo_ms),
        "tenants": {},
        "phases": {},
    }
    for tenant in result.scenario.tenants:
        sel = Selection(tenant=tenant)
        out["tenants"][tenant] = summarize(select(result, sel), _duration(result, sel), slo_ms)
    for phase in result.scenario.phases:
        sel = Selection(phase=phase.name)
        dur = _duration(result, sel)
        entry = {"all": summarize(select(result, sel), dur, slo_ms), "tenants": {}}
        for tenant in result.scenario.tenants:
            records = select(result, Selection(tenant=tenant, phase=phase.name))
            if records:
                entry["tenants"][tenant] = summarize(records, dur, slo_ms)
        out["phases"][phase.name] = entry
    return out


def _figure(a, value: float | None, unit: str, details: dict) -> dict:  # type: ignore[no-untyped-def]
    goal = getattr(a, "goal", None)
    if value is not None and math.isnan(value):
        value = None
    return {
        "name": a.name,
        "kind": a.kind,
        "value": value,
        "unit": unit,
        "goal": goal,
        "met": goal_met(goal, value),
        "details": details,
    }


def _ratio(result: RunResult, a: RatioAnalysis, slo_ms: dict[str, float]) -> dict:
    parts = {}
    for side, sel in (("numerator", a.numerator), ("denominator", a.denominator)):
        records = select(result, sel)
        summary = summarize(records, _duration(result, sel), slo_ms)
        parts[side] = {
            "selection": sel.model_dump(exclude_defaults=True),
            "value": metric_value(summary, a.metric),
            "completed": summary["completed"],
            "failed": summary["failed"],
            "mean_prompt_tokens": summary["mean_prompt_tokens"],
            "mean_cached_tokens": summary["mean_cached_tokens"],
        }
    num, den = parts["numerator"]["value"], parts["denominator"]["value"]
    ratio = num / den if den and not math.isnan(den) else math.nan
    details = {"metric": a.metric, **parts, "difference": num - den}
    return _figure(a, ratio, "×", details)


def _count(result: RunResult, a: CountAnalysis) -> dict:
    records = select(result, a.select)
    if a.status is None:
        bad = [r for r in records if not r.ok]
    else:
        bad = [r for r in records if not r.ok and r.status == a.status]
    keys: dict[str, int] = defaultdict(int)
    for r in bad:
        keys[r.error_key or "?"] += 1
    details = {"selection": a.select.model_dump(exclude_defaults=True), "of": len(records),
               "by_error": dict(keys)}
    return _figure(a, float(len(bad)), "requests", details)


def _jain(result: RunResult, a: JainAnalysis) -> dict:
    start, end = _windows(result)[a.phase]
    by_tenant = {
        t: [r for r in result.records if r.tenant == t and r.phase == a.phase] for t in a.tenants
    }
    weights = {t: result.scenario.tenants[t].weight for t in a.tenants}
    out = backlogged_jain(by_tenant, weights, start + a.skip_s, end)
    return _figure(a, out.pop("index"), "", out)


def _offered(result: RunResult, phase_name: str, tenant: str | None) -> dict:
    phase = next(p for p in result.scenario.phases if p.name == phase_name)
    loads = result.scenario.phase_loads(phase)
    loads = {t: v for t, v in loads.items() if tenant is None or t == tenant}
    rates = [v.offered_rate for v in loads.values()]
    return {
        "offered_rate": sum(rates) if rates and None not in rates else None,  # type: ignore[arg-type]
        "concurrency": sum(v.concurrency or 0 for v in loads.values()) or None,
    }


def _sweep(result: RunResult, a: SweepAnalysis, slo_ms: dict[str, float]) -> dict:
    rows = []
    for phase in result.scenario.phases:
        sel = Selection(tenant=a.tenant, phase=phase.name, skip_s=a.skip_s)
        s = summarize(select(result, sel), _duration(result, sel), slo_ms)
        rows.append(
            {
                "phase": phase.name,
                **_offered(result, phase.name, a.tenant),
                "request_throughput": s["request_throughput"],
                "output_throughput": s["output_throughput"],
                "completed": s["completed"],
                "failed": s["failed"],
                "ttft_p50_ms": s["ttft"]["p50"],
                "ttft_p99_ms": s["ttft"]["p99"],
                "tpot_p50_ms": s["tpot"]["p50"],
                "tpot_p99_ms": s["tpot"]["p99"],
                "goodput": s["goodput"],
            }
        )
    peak = max((r["output_throughput"] for r in rows), default=math.nan)
    return _figure(a, peak, "tok/s peak", {"rows": rows})


def _median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000 if values else math.nan


def _autoscale(result: RunResult, a: AutoscaleAnalysis) -> dict:
    step_start, step_end = _windows(result)[a.step_phase]
    base = [r for r in result.records if r.tenant == a.tenant and r.phase == a.baseline_phase]
    step = [r for r in result.records if r.tenant == a.tenant and r.phase == a.step_phase]
    known = {r.replica for r in base if r.replica}
    fresh = [r for r in step if r.ok and r.replica and r.replica not in known]
    first_new = min((r.chunks[0] for r in fresh), default=math.nan)
    before = [v for r in step if r.ok and r.send < first_new and (v := ttft(r)) is not None]
    after = [v for r in step if r.ok and r.send >= first_new and (v := ttft(r)) is not None]
    details = {
        "replicas_before_step": sorted(known),
        "new_replicas": sorted({r.replica for r in fresh}),  # type: ignore[type-var]
        "requests_in_step": len(step),
        "served_by_new_replicas": len(fresh),
        "ttft_p50_baseline_ms": _median_ms([v for r in base if (v := ttft(r)) is not None]),
        "ttft_p50_before_new_replica_ms": _median_ms(before),
        "ttft_p50_after_new_replica_ms": _median_ms(after),
        "ttft_recovery_s": _recovery(step, step_start, step_end, a.recovery_factor),
    }
    details |= _replica_marks(result, a.deployment, step_start, step_end)
    return _figure(a, first_new - step_start, "s", details)


def _recovery(step: list[RequestRecord], start: float, end: float, factor: float) -> float:
    """Seconds from the step until TTFT stays within `factor` of its settled level (the
    median of the last third of the step), in 2 s bins of send time after the worst bin."""
    pairs = [(r.send, v) for r in step if (v := ttft(r)) is not None]
    if not pairs:
        return math.nan
    settled = statistics.median(v for t, v in pairs if t >= end - (end - start) / 3)
    bins: dict[int, list[float]] = defaultdict(list)
    for t, v in pairs:
        bins[int((t - start) // 2)].append(v)
    medians = sorted((i, statistics.median(vs)) for i, vs in bins.items())
    worst = max(range(len(medians)), key=lambda j: medians[j][1])
    for j in range(worst, len(medians)):
        if all(m <= factor * settled for _, m in medians[j:]):
            return medians[j][0] * 2.0
    return math.nan


def _replica_marks(
    result: RunResult, deployment: str | None, step_start: float, step_end: float
) -> dict:
    """From the sampled replica states: when the step made Serve start a replica, when it
    was RUNNING, and when the pool was back at its size after the step."""
    samples = [s for s in result.samples if deployment and s["deployment"] == deployment]
    if not samples:
        return {}
    before = [s["running"] for s in samples if s["t"] < step_start]
    floor = before[-1] if before else samples[0]["running"]
    starting = next((s["t"] for s in samples if s["t"] >= step_start and s["starting"]), None)
    running = next(
        (s["t"] for s in samples if s["t"] >= step_start and s["running"] > floor), None
    )
    back = next(
        (s["t"] for s in samples if s["t"] >= step_end and s["running"] <= floor), None
    )

    def since(t: float | None, origin: float) -> float | None:
        return None if t is None else t - origin

    return {
        "replicas_at_step": floor,
        "max_replicas_seen": max(s["running"] for s in samples),
        "step_to_replica_starting_s": since(starting, step_start),
        "step_to_replica_running_s": since(running, step_start),
        "replica_start_s": since(running, starting) if starting and running else None,
        "idle_to_scaled_back_s": since(back, step_end),
    }


def tiered_config(scenario: Scenario) -> Any:
    """The scenario's Tiered config (target.tiered_config, or the default one) for its
    prices and engine sizes; None when it cannot be read."""
    from deployments.config.tiered import DEFAULT_CONFIG, load_config

    path = DEFAULT_CONFIG
    if scenario.target.tiered_config:
        base = scenario.source.parent if scenario.source else Path.cwd()
        path = base / scenario.target.tiered_config
    try:
        return load_config(path, checkpoints=False)
    except (OSError, ValueError):
        return None


def _model(scenario: Scenario, tenant: str) -> str:
    return scenario.tenants[tenant].model or scenario.model


def _cost_details(
    result: RunResult, a: ConversationAnalysis, records: list[RequestRecord], config: Any
) -> tuple[float, dict]:
    spec = result.scenario.tenants[a.tenant]
    prices = config.prices if config is not None else None
    model = _model(result.scenario, a.tenant)

    def cost(r: cm.TurnRecord) -> float | None:
        price = prices.price(model, r.service_tier or "shared") if prices else None
        if price is None or r.prompt_tokens is None:
            return None
        return float(price.cost(r.prompt_tokens, r.cached_tokens or 0, r.output_tokens))

    turns = spec.conversation.turns if spec.conversation else None
    costs = cm.conversation_costs(records, cost, turns)
    details = {
        "currency": prices.currency if prices else None,
        "prices": [p.model_dump() for p in prices.tokens if p.model == model] if prices else [],
        "conversations": len(cm.conversations(records)),
        "completed_conversations": len(costs),
        "median": statistics.median(costs) if costs else math.nan,
        "total": sum(costs),
    }
    return (sum(costs) / len(costs) if costs else math.nan), details


def _conversation(result: RunResult, a: ConversationAnalysis, config: Any) -> dict:
    records = select(result, Selection(tenant=a.tenant, phase=a.phase))
    details: dict = {"tenant": a.tenant, "api": result.scenario.tenants[a.tenant].api,
                     "figure": a.figure, "turns": cm.turn_rows(records)}
    if a.figure == "cost":
        value, more = _cost_details(result, a, records, config)
        unit = more["currency"] or ""
        return _figure(a, value, f"{unit}/conversation".strip("/"), details | more)
    if a.figure == "affinity":
        same, of = cm.affinity_counts(r for r in records if r.turn >= a.from_turn)
        pool = select(result, Selection(phase=a.phase))  # every tenant on the pool
        model = config.model(_model(result.scenario, a.tenant)) if config else None
        seats = model.engine.max_num_seqs if model else None
        load = cm.replica_load(pool)
        details |= {
            "same_replica": same, "continuations": of, "replicas": load,
            "seats_per_replica": seats,
            "saturated": [k for k, v in load.items() if seats and v["peak_in_flight"] >= seats],
        }
        return _figure(a, cm.share(same, of), "share", details)
    figure = cm.cached_share if a.figure == "cached_share" else cm.reused_share
    value = cm.over_turns(records, figure, a.from_turn, a.over)
    details |= {"from_turn": a.from_turn, "over": a.over,
                "pooled": cm.over_turns(records, figure, a.from_turn, "pooled")}
    return _figure(a, value, "share", details)


def analyse(result: RunResult, slo_ms: dict[str, float]) -> list[dict]:
    out = []
    wanted = any(isinstance(a, ConversationAnalysis) for a in result.scenario.analysis)
    config = tiered_config(result.scenario) if wanted else None  # prices, engine sizes
    for a in result.scenario.analysis:
        if isinstance(a, RatioAnalysis):
            out.append(_ratio(result, a, slo_ms))
        elif isinstance(a, CountAnalysis):
            out.append(_count(result, a))
        elif isinstance(a, JainAnalysis):
            out.append(_jain(result, a))
        elif isinstance(a, SweepAnalysis):
            out.append(_sweep(result, a, slo_ms))
        elif isinstance(a, AutoscaleAnalysis):
            out.append(_autoscale(result, a))
        elif isinstance(a, ConversationAnalysis):
            out.append(_conversation(result, a, config))
    return out
