"""The maths of multi-turn conversations, on request records only (no I/O).

A turn's record knows its conversation and turn number, the tokens of the previous turn's
prompt and output (`reusable_tokens`: the history a prefix cache could hold), and the
replica that served the previous turn. From those:
- cached share: cached / input tokens (pooled over the requests);
- reused share: cached tokens / reusable tokens (the part of the history not recomputed);
- affinity: continuations served by the previous turn's replica / continuations whose two
  replicas are known;
- the peak number of requests in flight per replica (send to end), from the client's side;
- billed cost per completed conversation (every turn answered), by a per-request price.
Shares over several turns are either pooled or the worst turn's.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Literal, Protocol

from bench.metrics import Record, describe, ttft


class TurnRecord(Record, Protocol):
    turn: int
    conversation: int | None
    replica: str | None
    previous_replica: str | None
    reusable_tokens: int | None
    completion_tokens: int | None


Over = Literal["worst_turn", "pooled"]


def share(part: float, whole: float) -> float:
    """part / whole; NaN when there is nothing to share."""
    return part / whole if whole else math.nan


def cached_share(records: Iterable[TurnRecord]) -> float:
    done = [r for r in records if r.ok and r.prompt_tokens]
    return share(sum(r.cached_tokens or 0 for r in done), sum(r.prompt_tokens or 0 for r in done))


def reused_share(records: Iterable[TurnRecord]) -> float:
    """Cached tokens over the tokens this prompt repeats from the previous turn's prompt
    and output; requests without a previous turn do not count."""
    done = [r for r in records if r.ok and r.reusable_tokens]
    return share(sum(r.cached_tokens or 0 for r in done), sum(r.reusable_tokens or 0 for r in done))


def affinity_counts(records: Iterable[TurnRecord]) -> tuple[int, int]:
    """(served by the previous turn's replica, continuations with both replicas known)."""
    pairs = [
        (r.replica, r.previous_replica)
        for r in records
        if r.ok and r.turn >= 2 and r.replica and r.previous_replica
    ]
    return sum(a == b for a, b in pairs), len(pairs)


def affinity_rate(records: Iterable[TurnRecord]) -> float:
    same, of = affinity_counts(records)
    return share(same, of)


def by_turn(records: Iterable[TurnRecord]) -> dict[int, list[TurnRecord]]:
    out: dict[int, list[TurnRecord]] = defaultdict(list)
    for r in records:
        out[r.turn].append(r)
    return dict(sorted(out.items()))


def over_turns(
    records: Sequence[TurnRecord],
    figure: Callable[[list[TurnRecord]], float],
    from_turn: int = 2,
    over: Over = "worst_turn",
) -> float:
    """The figure on turns >= from_turn: pooled, or the lowest of the turns that have one."""
    later = [r for r in records if r.turn >= from_turn]
    if over == "pooled":
        return figure(later)
    values = [v for rs in by_turn(later).values() if not math.isnan(v := figure(rs))]
    return min(values) if values else math.nan


def turn_rows(records: Sequence[TurnRecord]) -> list[dict]:
    """One row per turn: requests, TTFT, mean tokens, the shares and the affinity."""
    rows = []
    for turn, rs in by_turn(records).items():
        done = [r for r in rs if r.ok]
        n = len(done) or math.nan
        same, of = affinity_counts(rs)
        lat = describe([v for r in done if (v := ttft(r)) is not None])
        rows.append({
            "turn": turn,
            "completed": len(done),
            "failed": len(rs) - len(done),
            "ttft_p50_ms": lat["p50"],
            "ttft_p90_ms": lat["p90"],
            "mean_input_tokens": sum(r.prompt_tokens or 0 for r in done) / n,
            "mean_cached_tokens": sum(r.cached_tokens or 0 for r in done) / n,
            "mean_reusable_tokens": sum(r.reusable_tokens or 0 for r in done) / n,
            "cached_share": cached_share(done),
            "reused_share": reused_share(done),
            "same_replica": same,
            "continuations": of,
            "affinity": share(same, of),
        })
    return rows


def peak_in_flight(intervals: Iterable[tuple[float, float]]) -> int:
    """The most intervals open at once ([start, end): one ending as another starts is
    not an overlap)."""
    events = sorted(e for a, b in intervals for e in ((a, 1), (b, -1)))
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def replica_load(records: Iterable[TurnRecord]) -> dict[str, dict]:
    """Per replica (the header of answered requests): requests, share, peak in flight."""
    served: dict[str, list[TurnRecord]] = defaultdict(list)
    for r in records:
        if r.replica:
            served[r.replica].append(r)
    total = sum(len(rs) for rs in served.values())
    return {
        replica: {
            "requests": len(rs),
            "share": share(len(rs), total),
            "peak_in_flight": peak_in_flight((r.send, r.end) for r in rs),
        }
        for replica, rs in sorted(served.items())
    }


def conversations(records: Iterable[TurnRecord]) -> dict[tuple[str, int], list[TurnRecord]]:
    """(tenant, conversation) -> its requests in turn order."""
    out: dict[tuple[str, int], list[TurnRecord]] = defaultdict(list)
    for r in records:
        if r.conversation is not None:
            out[(r.tenant, r.conversation)].append(r)
    return {k: sorted(rs, key=lambda r: r.turn) for k, rs in out.items()}


def conversation_costs(
    records: Iterable[TurnRecord],
    cost: Callable[[TurnRecord], float | None],
    turns: int | None = None,
) -> list[float]:
    """The billed cost of each completed conversation (every turn answered, `turns` of
    them when given), as the sum of its requests' costs; a conversation with a request
    that has no price does not count."""
    out = []
    for rs in conversations(records).values():
        if not all(r.ok for r in rs) or (turns is not None and len(rs) != turns):
            continue
        costs = [cost(r) for r in rs]
        if all(c is not None for c in costs):
            out.append(sum(c for c in costs if c is not None))
    return out
