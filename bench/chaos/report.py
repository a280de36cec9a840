"""What one fault cost, from the load's records and the cluster's state afterwards."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.chaos.load import ChaosRecord


def outcome(r: ChaosRecord) -> str:
    """How a request ended. `fake_done` is a stream that said [DONE] short of its tokens:
    the one ending a fault must never produce."""
    rec = r.record
    if r.hung:
        return "hung"
    if r.disconnected:
        return f"disconnected_{r.disconnected}"
    if rec.status and rec.status != 200:
        return f"http_{rec.status}" + ("_as_meant" if r.bad and rec.status == 400 else "")
    if r.bad:
        return "bad_request_accepted"
    if rec.error:
        kind = rec.error.split(":", 1)[0]
        return "error_event" if kind == "stream_error" else kind
    if rec.completion_tokens != rec.max_tokens:
        return "fake_done"
    return "completed"


def received_tokens(r: ChaosRecord) -> int:
    """Completion tokens the client got: the usage of a completed stream, else the
    tokens its chunks' logprobs listed (a stream cut short has no usage)."""
    rec = r.record
    return rec.completion_tokens if rec.completion_tokens is not None else rec.logprob_tokens


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class FaultReport:
    fault: str
    requests: int
    in_flight_at_fault: int
    in_flight_ended: dict[str, int]  # outcome -> count, of the requests in flight at the fault
    started_ended: dict[str, int]  # the same, of those that had their first token before it
    unstarted_ended: dict[str, int]
    outcomes: dict[str, int]  # every request of the run
    hung: int
    http_5xx: dict[str, int]
    healthy_after_s: float | None
    tokens_billed: int | None  # completion tokens in the ledger for the load's tenants
    tokens_received: int
    kv_blocks_idle: int
    seats_idle: int
    extra: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        self.checks.append(Check(name, passed, detail))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def summarise(fault: str, records: list[ChaosRecord], fault_at: float) -> FaultReport:
    """The load's part of the report (cluster figures are filled in by the runner)."""
    at_fault = [r for r in records if r.record.send <= fault_at < r.record.end]
    started = [r for r in at_fault if r.record.chunks and r.record.chunks[0] <= fault_at]
    unstarted = [r for r in at_fault if r not in started]
    ended = [outcome(r) for r in records]
    counts = Counter(ended)
    cut = [r for r, how in zip(records, ended, strict=True) if how == "transport"]
    # What the streams cut with their ingress had still to come: billed minus received
    # would be this much had their model servers run them on to max_tokens.
    extra = {"unreceived_of_cut_streams": sum(r.record.max_tokens - received_tokens(r)
                                              for r in cut)} if cut else {}
    return FaultReport(
        fault=fault,
        requests=len(records),
        in_flight_at_fault=len(at_fault),
        in_flight_ended=dict(Counter(outcome(r) for r in at_fault)),
        started_ended=dict(Counter(outcome(r) for r in started)),
        unstarted_ended=dict(Counter(outcome(r) for r in unstarted)),
        outcomes=dict(counts),
        hung=counts.get("hung", 0),
        http_5xx={k[5:]: v for k, v in counts.items() if k.startswith("http_5")},
        healthy_after_s=None,
        tokens_billed=None,
        tokens_received=sum(received_tokens(r) for r in records),
        kv_blocks_idle=-1,
        seats_idle=-1,
        extra=extra,
    )


def _fmt(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def render(reports: list[FaultReport]) -> str:
    """One block per fault: the figures, then each check with PASS/FAIL."""
    lines = []
    for r in reports:
        healthy = f"{r.healthy_after_s:.1f} s" if r.healthy_after_s is not None else "never"
        billed = "-" if r.tokens_billed is None else str(r.tokens_billed)
        lines += [
            f"== {r.fault}: {'PASS' if r.passed else 'FAIL'}",
            f"  requests               {r.requests} ({_fmt(r.outcomes)})",
            f"  in flight at fault     {r.in_flight_at_fault} ({_fmt(r.in_flight_ended)})",
            f"    had a token          {_fmt(r.started_ended)}",
            f"    had no token         {_fmt(r.unstarted_ended)}",
            f"  hung                   {r.hung}",
            f"  5xx by code            {_fmt(r.http_5xx)}",
            f"  healthy again after    {healthy}",
            f"  tokens billed/received {billed} / {r.tokens_received}",
            f"  at idle                KV blocks {r.kv_blocks_idle}, seats {r.seats_idle}",
            *(f"  {k:<22} {v}" for k, v in r.extra.items()),
            *(f"  [{'PASS' if c.passed else 'FAIL'}] {c.name}"
              + (f": {c.detail}" if c.detail else "") for c in r.checks),
        ]
    return "\n".join(lines)
