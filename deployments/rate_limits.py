"""Per-tenant RPM, TPM and concurrency, with reserve-then-settle token accounting.

At admission a request reserves `prompt + max_tokens`; at the end it settles to what it
really used, streamed responses included. Windows slide over the last 60 s. A reservation
that is never settled (its ingress died) is reclaimed after `reservation_ttl_s`.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60.0


@dataclass
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None


@dataclass
class Decision:
    allowed: bool
    reservation_id: int | None = None
    reason: str | None = None  # "rpm" | "tpm" | "concurrency"
    retry_after_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Entry:
    at: float
    tokens: int
    open: bool = True


@dataclass
class _TenantWindow:
    entries: dict[int, _Entry] = field(default_factory=dict)
    order: deque[int] = field(default_factory=deque)

    def expire(self, now: float, ttl: float) -> None:
        while self.order and now - self.entries[self.order[0]].at > WINDOW_S:
            entry = self.entries[self.order[0]]
            if entry.open and now - entry.at < ttl:
                break  # still streaming: its slot and tokens stay counted
            del self.entries[self.order.popleft()]
        for entry in self.entries.values():
            if entry.open and now - entry.at > ttl:
                entry.open = False

    def requests(self, now: float) -> int:
        return sum(1 for e in self.entries.values() if now - e.at <= WINDOW_S)

    def tokens(self) -> int:
        return sum(e.tokens for e in self.entries.values())

    def in_flight(self) -> int:
        return sum(1 for e in self.entries.values() if e.open)


def duration(seconds: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "120ms"."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    minutes, secs = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class RateLimitState:
    def __init__(self, reservation_ttl_s: float = 900.0) -> None:
        self._windows: dict[str, _TenantWindow] = {}
        self._owner: dict[int, str] = {}
        self._ids = itertools.count(1)
        self.ttl = reservation_ttl_s

    def reserve(
        self, tenant: str, tokens: int, limits: Limits, now: float | None = None
    ) -> Decision:
        now = time.monotonic() if now is None else now
        window = self._windows.setdefault(tenant, _TenantWindow())
        window.expire(now, self.ttl)
        used_requests, used_tokens = window.requests(now), window.tokens()
        reason, retry = None, 0.0
        if limits.max_concurrency is not None and window.in_flight() >= limits.max_concurrency:
            reason, retry = "concurrency", 1.0
        elif limits.rpm is not None and used_requests >= limits.rpm:
            oldest = min(e.at for e in window.entries.values())
            reason, retry = "rpm", oldest + WINDOW_S - now
        elif limits.tpm is not None and used_tokens + tokens > limits.tpm:
            reason, retry = "tpm", self._tokens_free_in(window, tokens, limits.tpm, now)
        allowed = reason is None
        rid = None
        if allowed:
            rid = next(self._ids)
            window.entries[rid] = _Entry(now, tokens)
            window.order.append(rid)
            self._owner[rid] = tenant
            used_requests, used_tokens = used_requests + 1, used_tokens + tokens
        headers = self._headers(window, limits, used_requests, used_tokens, now)
        return Decision(allowed, rid, reason, max(retry, 0.0), headers)

    def settle(self, reservation_id: int, actual_tokens: int) -> None:
        """Replace the reservation by real usage and free the concurrency slot."""
        tenant = self._owner.pop(reservation_id, None)
        if tenant is None:
            return
        entry = self._windows[tenant].entries.get(reservation_id)
        if entry is not None:
            entry.tokens = actual_tokens
            entry.open = False

    @staticmethod
    def _tokens_free_in(window: _TenantWindow, tokens: int, tpm: int, now: float) -> float:
        if tokens > tpm:
            return WINDOW_S  # can never fit; retrying later will not help, say so plainly
        total = window.tokens()
        for rid in window.order:
            entry = window.entries[rid]
            total -= entry.tokens
            if total + tokens <= tpm:
                return entry.at + WINDOW_S - now
        return WINDOW_S

    @staticmethod
    def _headers(
        window: _TenantWindow, limits: Limits, requests: int, tokens: int, now: float
    ) -> dict[str, str]:
        headers: dict[str, str] = {}
        oldest = min((e.at for e in window.entries.values()), default=now)
        reset = duration(max(0.0, oldest + WINDOW_S - now))
        if limits.rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(limits.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - requests))
            headers["x-ratelimit-reset-requests"] = reset
        if limits.tpm is not None:
            headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - tokens))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers
