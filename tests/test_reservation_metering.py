"""Reserved replica-seconds from dedicated replicas' heartbeats: split at UTC hours, gaps
(a replica gone) and first beats count nothing, and the admission core writes them."""

from __future__ import annotations

from datetime import UTC, datetime

from deployments.tenancy.metering import ReservationClock, split_by_hour

T0 = datetime(2026, 12, 3, 10, 59, 55, tzinfo=UTC).timestamp()


def test_split_at_the_hour_boundary() -> None:
    parts = split_by_hour(T0, T0 + 10)
    assert [(h.hour, s) for h, s in parts] == [(10, 5.0), (11, 5.0)]
    assert all(h.minute == h.second == 0 and h.tzinfo is UTC for h, _ in parts)


def test_first_beat_and_gaps_count_nothing() -> None:
    clock = ReservationClock(max_gap_s=15)
    assert clock.beat("acme", "m", "r1", now=T0) == []
    rows = clock.beat("acme", "m", "r1", now=T0 + 10)
    assert [(r.tenant, r.replica_id, r.hour.hour, r.seconds) for r in rows] == [
        ("acme", "r1", 10, 5.0), ("acme", "r1", 11, 5.0)
    ]
    assert clock.beat("acme", "m", "r1", now=T0 + 40) == []  # 30 s silent: it was gone
    assert sum(r.seconds for r in clock.beat("acme", "m", "r1", now=T0 + 50)) == 10.0
    assert clock.beat("acme", "m", "r2", now=T0 + 50) == []  # another replica's first beat
