"""The metric maths, on request records only (no I/O), with the standard definitions.

As `vllm bench serve`, llmperf and genai-perf define them:
- TTFT: first chunk carrying choices − send;
- e2e latency (E2EL): end of stream − send;
- TPOT: (E2EL − TTFT) / (output tokens − 1), per request, for requests of 2+ tokens;
- ITL: the gaps between consecutive chunks, pooled over requests;
- request throughput: completed requests / duration; token throughputs likewise;
- goodput: completed requests meeting every SLO given (TTFT, TPOT, E2EL, in ms) /
  duration; a one-token answer has no TPOT and passes that SLO;
- percentiles: linear interpolation between order statistics (numpy's default).
Jain's index is (Σx)² / (n·Σx²) on weight-normalised shares: 1 is perfectly fair, 1/n is
one tenant taking everything.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol

Interval = tuple[float, float]


class Record(Protocol):
    tenant: str
    send: float
    end: float
    chunks: list[float]
    service_tier: str | None
    prompt_tokens: int | None
    cached_tokens: int | None

    @property
    def ok(self) -> bool: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def error_key(self) -> str | None: ...


def percentile(values: Sequence[float], q: float) -> float:
    """q in [0, 100]; NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def describe(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """mean, median, std and percentiles, multiplied by `scale` (seconds → ms)."""
    if not values:
        return {k: math.nan for k in ("mean", "median", "std", "p50", "p90", "p95", "p99",
                                      "min", "max")}
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    out = {"mean": mean, "median": percentile(values, 50), "std": std}
    out |= {f"p{q}": percentile(values, q) for q in (50, 90, 95, 99)}
    out |= {"min": min(values), "max": max(values)}
    return {k: v * scale for k, v in out.items()}


def ttft(r: Record) -> float | None:
    return r.chunks[0] - r.send if r.ok else None


def e2el(r: Record) -> float | None:
    return r.end - r.send if r.ok else None


def tpot(r: Record) -> float | None:
    """Time per output token after the first; None below two tokens."""
    if not r.ok or r.output_tokens < 2:
        return None
    return (r.end - r.send - (r.chunks[0] - r.send)) / (r.output_tokens - 1)


def itls(r: Record) -> list[float]:
    return [b - a for a, b in zip(r.chunks, r.chunks[1:], strict=False)] if r.ok else []


def is_good(r: Record, slo_ms: dict[str, float]) -> bool:
    if not r.ok:
        return False
    values = {"ttft": ttft(r), "tpot": tpot(r), "e2el": e2el(r)}
    return all(values[k] is None or values[k] * 1000 <= bound for k, bound in slo_ms.items())


def token_times(r: Record) -> list[tuple[float, float]]:
    """(time, tokens) per chunk: the request's output tokens spread over its chunks
    (a chunk may carry more than one token; usage only gives the total)."""
    if not r.ok:
        return []
    per = r.output_tokens / len(r.chunks)
    return [(t, per) for t in r.chunks]


def summarize(
    records: Sequence[Record], duration_s: float, slo_ms: dict[str, float] | None = None
) -> dict:
    """Every figure of one group of requests (a tenant, a phase, or all of them)."""
    done = [r for r in records if r.ok]
    errors = Counter(r.error_key for r in records if not r.ok)
    tiers = Counter(r.service_tier or "unknown" for r in done)
    prompt = sum(r.prompt_tokens or 0 for r in done)
    output = sum(r.output_tokens for r in done)
    dur = duration_s if duration_s > 0 else math.nan
    out = {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": dict(sorted(errors.items())),
        "service_tiers": dict(sorted(tiers.items())),
        "duration_s": duration_s,
        "prompt_tokens": prompt,
        "output_tokens": output,
        "cached_tokens": sum(r.cached_tokens or 0 for r in done),
        "mean_prompt_tokens": prompt / len(done) if done else math.nan,
        "mean_cached_tokens": sum(r.cached_tokens or 0 for r in done) / len(done)
        if done
        else math.nan,
        "request_throughput": len(done) / dur,
        "output_throughput": output / dur,
        "total_token_throughput": (prompt + output) / dur,
        "peak_output_throughput": peak_rate(
            [tt for r in done for tt in token_times(r)], bin_s=1.0
        ),
        "goodput": None,
        "ttft": describe([v for r in done if (v := ttft(r)) is not None]),
        "tpot": describe([v for r in done if (v := tpot(r)) is not None]),
        "itl": describe([g for r in done for g in itls(r)]),
        "e2el": describe([v for r in done if (v := e2el(r)) is not None]),
    }
    if slo_ms:
        out["goodput"] = sum(is_good(r, slo_ms) for r in done) / dur
        out["slo_ms"] = dict(slo_ms)
    return out


def metric_value(summary: dict, name: str) -> float:
    """`ttft.p99` or `request_throughput` out of a summary."""
    base, _, stat = name.partition(".")
    value = summary[base][stat] if stat else summary[base]
    return math.nan if value is None else float(value)


def peak_rate(events: Iterable[tuple[float, float]], bin_s: float = 1.0) -> float:
    """The largest amount in any bin of `bin_s` seconds, per second."""
    bins: Counter[int] = Counter()
    for t, amount in events:
        bins[math.floor(t / bin_s)] += amount
    return max(bins.values()) / bin_s if bins else 0.0


def binned(
    events: Iterable[tuple[float, float]], start: float, end: float, bin_s: float
) -> list[float]:
    """Amount per second in consecutive bins of [start, end)."""
    n = max(1, math.ceil((end - start) / bin_s))
    out = [0.0] * n
    for t, amount in events:
        i = math.floor((t - start) / bin_s)
        if 0 <= i < n:
            out[i] += amount / bin_s
    return out


def jain_index(values: Sequence[float]) -> float:
    """(Σx)² / (n·Σx²); NaN when every value is zero (nothing to share)."""
    squares = sum(x * x for x in values)
    if not values or squares == 0:
        return math.nan
    return sum(values) ** 2 / (len(values) * squares)


def weighted_jain(served: dict[str, float], weights: dict[str, float]) -> float:
    """Jain's index on served amounts divided by each tenant's weight."""
    return jain_index([served[t] / weights.get(t, 1.0) for t in served])


def union(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def intersect(xs: list[Interval], ys: list[Interval]) -> list[Interval]:
    """Intersection of two sorted, disjoint interval lists."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def clip(intervals: list[Interval], start: float, end: float) -> list[Interval]:
    return intersect(intervals, [(start, end)])


def length(intervals: Iterable[Interval]) -> float:
    return sum(b - a for a, b in intervals)


def backlogged(records: Iterable[Record]) -> list[Interval]:
    """When a tenant had a request waiting: sent, first token not yet received (or not
    yet ended, for one that never produced a token)."""
    return union((r.send, r.chunks[0] if r.chunks else r.end) for r in records)


def served_in(records: Iterable[Record], intervals: list[Interval]) -> float:
    """Output tokens delivered inside the intervals (sorted and disjoint)."""
    starts = [a for a, _ in intervals]
    total = 0.0
    for r in records:
        for t, amount in token_times(r):
            i = bisect.bisect_right(starts, t) - 1
            if i >= 0 and t < intervals[i][1]:
                total += amount
    return total


def backlogged_jain(
    by_tenant: dict[str, list[Record]],
    weights: dict[str, float],
    start: float,
    end: float,
) -> dict:
    """Jain's index on weight-normalised tokens served while every tenant was backlogged,
    within [start, end); with the window's length and each tenant's token rate in it."""
    window = [(start, end)]
    for records in by_tenant.values():
        window = intersect(window, backlogged(records))
    seconds = length(window)
    served = {t: served_in(rs, window) for t, rs in by_tenant.items()}
    return {
        "index": weighted_jain(served, weights) if seconds > 0 else math.nan,
        "backlogged_s": seconds,
        "served_tokens": served,
        "tokens_per_s": {t: (v / seconds if seconds else math.nan) for t, v in served.items()},
        "weights": {t: weights.get(t, 1.0) for t in by_tenant},
    }
