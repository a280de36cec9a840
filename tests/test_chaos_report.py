"""The chaos report's figures from the load's records (no cluster: the records are what
the load generator writes)."""

from __future__ import annotations

from bench.chaos.load import ChaosRecord
from bench.chaos.report import outcome, summarise
from bench.client import RequestRecord


def _stream(send: float, end: float, max_tokens: int, *, got: int, cut: bool) -> ChaosRecord:
    record = RequestRecord(tenant="t", phase="chaos", send=send, end=end, status=200,
                           max_tokens=max_tokens, chunks=[send + 0.1] * got,
                           logprob_tokens=got)
    if cut:
        record.error = "transport: RemoteProtocolError: peer closed connection"
    else:
        record.completion_tokens = got
    return ChaosRecord(record)


def test_cut_streams_report_what_they_had_still_to_come() -> None:
    """Two streams cut with their ingress (12 of 64 and 40 of 64 received) had 76 tokens
    still to come: what billed minus received would be had the engine run them on."""
    records = [
        _stream(0.0, 2.0, 64, got=12, cut=True),
        _stream(0.5, 2.0, 64, got=40, cut=True),
        _stream(0.0, 3.0, 64, got=64, cut=False),
    ]
    report = summarise("ingress_kill", records, fault_at=1.0)
    assert [outcome(r) for r in records] == ["transport", "transport", "completed"]
    assert report.in_flight_ended == {"transport": 2, "completed": 1}
    assert report.tokens_received == 12 + 40 + 64
    assert report.extra["unreceived_of_cut_streams"] == 52 + 24


def test_no_cut_stream_no_unreceived_figure() -> None:
    report = summarise("replica_kill", [_stream(0.0, 3.0, 64, got=64, cut=False)], 1.0)
    assert "unreceived_of_cut_streams" not in report.extra
