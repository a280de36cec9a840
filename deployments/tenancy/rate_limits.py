"""Per-tenant RPM, TPM and concurrency, with reserve-then-settle token accounting.

At admission a request reserves `prompt + max_tokens`; when it ends it settles to what it
really used, streamed responses included, and frees its concurrency slot. Windows slide
over the last 60 s and count a request at its admission time. A reservation never settled
(its ingress died) frees its slot after `reservation_ttl_s`, a backstop: the admission
actor already settles the claims of a silent ingress within a minute.

Plain Python, held by the admission actor; the HTTP side (429s and x-ratelimit-*
headers) lives in deployments.api.limits.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from deployments.tenancy.types import RateLimitStatus, Refusal, RefusalReason

WINDOW_S = 60.0
DEFAULT_TTL_S = 900.0
CONCURRENCY_RETRY_S = 1.0


class LimitsLike(Protocol):
    """Anything with the three limits (Limits, a TenantPolicy, a TenantSpec)."""

    @property
    def rpm(self) -> int | None: ...
    @property
    def tpm(self) -> int | None: ...
    @property
    def max_concurrency(self) -> int | None: ...


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None


@dataclass(frozen=True)
class Decision:
    """The limiter's answer: a reservation to settle later, or why not."""

    reservation_id: int | None
    status: RateLimitStatus
    refusal: Refusal | None = None


@dataclass
class _Entry:
    at: float
    tokens: int
    in_window: bool = True


@dataclass
class _Tenant:
    window: deque[_Entry] = field(default_factory=deque)  # admission order = time order
    tokens: int = 0  # sum of tokens of entries in the window
    open: dict[int, _Entry] = field(default_factory=dict)  # unsettled: holding a slot

    def expire(self, now: float, ttl: float) -> list[int]:
        """Drop entries older than the window; reclaim slots open longer than `ttl`
        (never settled: the reserved tokens stay counted). Returns reclaimed ids."""
        while self.window and now - self.window[0].at >= WINDOW_S:
            entry = self.window.popleft()
            entry.in_window = False
            self.tokens -= entry.tokens
        reclaimed = [r for r, e in self.open.items() if now - e.at > ttl]
        for rid in reclaimed:
            del self.open[rid]
        return reclaimed


class RateLimitState:
    """Sliding 60-s windows per tenant plus open reservations (concurrency slots)."""

    def __init__(self, reservation_ttl_s: float = DEFAULT_TTL_S) -> None:
        self.ttl = reservation_ttl_s
        self._tenants: dict[str, _Tenant] = {}
        self._owner: dict[int, str] = {}
        self._ids = itertools.count(1)

    def reserve(
        self, tenant: str, tokens: int, lim: LimitsLike, now: float | None = None
    ) -> Decision:
        """Admit and reserve `tokens` (prompt + max_tokens), or say which limit and when."""
        now = time.monotonic() if now is None else now
        state = self._state(tenant, now)
        tokens = max(0, tokens)
        reason: RefusalReason | None = None
        retry, too_large = 0.0, False
        if lim.max_concurrency is not None and len(state.open) >= lim.max_concurrency:
            reason, retry = "concurrency", CONCURRENCY_RETRY_S
        elif lim.rpm is not None and len(state.window) >= lim.rpm:
            # the oldest entries must leave until one request fits
            reason = "rpm"
            retry = state.window[len(state.window) - lim.rpm].at + WINDOW_S - now
        elif lim.tpm is not None and state.tokens + tokens > lim.tpm:
            reason, too_large = "tpm", tokens > lim.tpm
            retry = WINDOW_S if too_large else _tokens_free_in(state, tokens, lim.tpm, now)
        if reason is not None:
            refusal = Refusal(reason, max(0.0, retry), too_large)
            return Decision(None, self._status(state, lim, now), refusal)
        rid = self.restore(tenant, tokens, now, now)
        return Decision(rid, self._status(state, lim, now))

    def restore(self, tenant: str, tokens: int, at: float, now: float | None = None) -> int:
        """Count a reservation admitted at `at` without checking limits: a claim an
        ingress re-registers after the actor restarted. Returns its reservation id."""
        state = self._state(tenant, time.monotonic() if now is None else now)
        rid = next(self._ids)
        entry = _Entry(at, max(0, tokens))
        window = state.window
        # keep the window in time order: a restored entry may be older than the newest
        index = len(window)
        while index and window[index - 1].at > at:
            index -= 1
        window.insert(index, entry)
        state.tokens += entry.tokens
        state.open[rid] = entry
        self._owner[rid] = tenant
        return rid

    def settle(self, reservation_id: int | None, actual_tokens: int) -> None:
        """Replace the reservation by the tokens really used and free the slot. Settling an
        unknown, already settled or TTL-reclaimed reservation is a no-op."""
        if reservation_id is None:
            return
        tenant = self._owner.pop(reservation_id, None)
        if tenant is None:
            return
        state = self._tenants[tenant]
        entry = state.open.pop(reservation_id, None)
        if entry is None:
            return
        actual = max(0, actual_tokens)
        if entry.in_window:
            state.tokens += actual - entry.tokens
        entry.tokens = actual

    def usage(self, tenant: str, now: float | None = None) -> dict[str, int]:
        """Requests and tokens in the current window, and slots held."""
        state = self._state(tenant, time.monotonic() if now is None else now)
        return {"requests": len(state.window), "tokens": state.tokens, "open": len(state.open)}

    def _state(self, tenant: str, now: float) -> _Tenant:
        state = self._tenants.setdefault(tenant, _Tenant())
        for rid in state.expire(now, self.ttl):
            self._owner.pop(rid, None)
        return state

    @staticmethod
    def _status(state: _Tenant, lim: LimitsLike, now: float) -> RateLimitStatus:
        # "reset": time until the window is back to its initial (empty) state.
        reset = max(0.0, state.window[-1].at + WINDOW_S - now) if state.window else 0.0
        rpm, tpm = lim.rpm, lim.tpm
        return RateLimitStatus(
            limit_requests=rpm,
            remaining_requests=None if rpm is None else max(0, rpm - len(state.window)),
            reset_requests_s=None if rpm is None else reset,
            limit_tokens=tpm,
            remaining_tokens=None if tpm is None else max(0, tpm - state.tokens),
            reset_tokens_s=None if tpm is None else reset,
        )


def _tokens_free_in(state: _Tenant, tokens: int, tpm: int, now: float) -> float:
    """Seconds until enough of the oldest entries leave the window for `tokens` to fit."""
    total = state.tokens
    for entry in state.window:
        total -= entry.tokens
        if total + tokens <= tpm:
            return entry.at + WINDOW_S - now
    return WINDOW_S
