"""Per-tenant RPM, TPM and concurrency, with reserve-then-settle token accounting.

At admission a request reserves `prompt + max_tokens`; when it ends it settles to what it
really used, streamed responses included, and frees its concurrency slot. Windows slide
over the last 60 s and count a request at its admission time. A reservation never settled
(its ingress died) frees its slot after `reservation_ttl_s`, so nothing leaks.

`RateLimitState` is plain Python; `RateLimiterActor` shares one instance between every
ingress replica, so the limits hold for the tenant, not per replica.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import ray

from deployments.api.errors import OpenAIError

WINDOW_S = 60.0
DEFAULT_TTL_S = 900.0
CONCURRENCY_RETRY_S = 1.0
ACTOR_NAME = "tiered-rate-limits"
ACTOR_NAMESPACE = "tiered"


class LimitsLike(Protocol):
    """Anything with the three limits (Limits, or a TenantSpec)."""

    rpm: int | None
    tpm: int | None
    max_concurrency: int | None


@dataclass
class Limits:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None


@dataclass
class Decision:
    """Admission's answer, with the numbers behind OpenAI's x-ratelimit-* headers."""

    allowed: bool
    reservation_id: int | None = None
    reason: str | None = None  # "rpm" | "tpm" | "concurrency"
    retry_after_s: float = 0.0
    too_large: bool = False  # tokens alone exceed the TPM limit: retrying cannot help
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


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


def duration(seconds: float) -> str:
    """OpenAI's (Go's) duration format: "250ms", "6s", "1.5s", "6m0s", "1h0m0s"."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def retry_headers(retry_after_s: float) -> dict[str, str]:
    """Retry-After (whole seconds, rounded up, at least 1) and retry-after-ms."""
    seconds = max(0.0, retry_after_s)
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


def ratelimit_headers(decision: Decision | dict[str, Any]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the limits a tenant has; Retry-After on denial."""
    d = decision if isinstance(decision, dict) else asdict(decision)
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        if d.get(f"limit_{kind}") is not None:
            headers[f"x-ratelimit-limit-{kind}"] = str(d[f"limit_{kind}"])
            headers[f"x-ratelimit-remaining-{kind}"] = str(d[f"remaining_{kind}"])
            headers[f"x-ratelimit-reset-{kind}"] = duration(d[f"reset_{kind}_s"] or 0.0)
    if not d["allowed"]:
        headers.update(retry_headers(d["retry_after_s"]))
    return headers


def too_many_requests(decision: Decision | dict[str, Any], tenant: str) -> OpenAIError:
    """The 429 for a denied Decision, in OpenAI's shape and with its headers."""
    d = decision if isinstance(decision, dict) else asdict(decision)
    reason = d.get("reason") or "rpm"
    kinds = {"rpm": "requests per min (RPM)", "tpm": "tokens per min (TPM)"}
    if reason == "concurrency":
        message = f"Too many concurrent requests for tenant '{tenant}'."
    elif d.get("too_large"):
        message = (
            f"Request too large for tenant '{tenant}' on tokens per min (TPM): "
            f"Limit {d.get('limit_tokens')}. Reduce the prompt or max_tokens."
        )
    else:
        message = (
            f"Rate limit reached for tenant '{tenant}' on {kinds[reason]}. "
            f"Please try again in {duration(d['retry_after_s'])}."
        )
    kind = {"rpm": "requests", "tpm": "tokens"}.get(reason, "rate_limit_error")
    headers = d.get("headers") or ratelimit_headers(d)
    return OpenAIError(429, message, type=kind, code="rate_limit_exceeded", headers=headers)


class RateLimitState:
    """Sliding 60-s windows per tenant plus open reservations (concurrency slots)."""

    def __init__(
        self,
        reservation_ttl_s: float = DEFAULT_TTL_S,
        limits: dict[str, LimitsLike] | None = None,
    ) -> None:
        self.ttl = reservation_ttl_s
        self.limits: dict[str, LimitsLike] = dict(limits or {})
        self._tenants: dict[str, _Tenant] = {}
        self._owner: dict[int, str] = {}
        self._ids = itertools.count(1)

    def reserve(
        self,
        tenant: str,
        tokens: int,
        limits: LimitsLike | dict[str, Any] | None = None,
        now: float | None = None,
    ) -> Decision:
        """Admit and reserve `tokens` (prompt + max_tokens), or say which limit and when."""
        now = time.monotonic() if now is None else now
        lim = _as_limits(limits if limits is not None else self.limits.get(tenant))
        state = self._state(tenant, now)
        tokens = max(0, tokens)
        reason, retry, too_large = None, 0.0, False
        if lim.max_concurrency is not None and len(state.open) >= lim.max_concurrency:
            reason, retry = "concurrency", CONCURRENCY_RETRY_S
        elif lim.rpm is not None and len(state.window) >= lim.rpm:
            # the oldest entries must leave until one request fits
            reason = "rpm"
            retry = state.window[len(state.window) - lim.rpm].at + WINDOW_S - now
        elif lim.tpm is not None and state.tokens + tokens > lim.tpm:
            reason, too_large = "tpm", tokens > lim.tpm
            retry = WINDOW_S if too_large else _tokens_free_in(state, tokens, lim.tpm, now)
        decision = Decision(allowed=reason is None, reason=reason, too_large=too_large)
        decision.retry_after_s = max(0.0, retry)
        if decision.allowed:
            rid = next(self._ids)
            entry = _Entry(now, tokens)
            state.window.append(entry)
            state.tokens += tokens
            state.open[rid] = entry
            self._owner[rid] = tenant
            decision.reservation_id = rid
        self._fill(decision, state, lim, now)
        return decision

    def settle(self, reservation_id: int | None, actual_tokens: int) -> None:
        """Replace the reservation by the tokens really used and free the slot. Settling an
        unknown, already settled or TTL-reclaimed reservation is a no-op."""
        tenant = self._owner.pop(reservation_id, None) if reservation_id is not None else None
        if tenant is None:
            return
        state = self._tenants[tenant]
        entry = state.open.pop(reservation_id, None)  # type: ignore[arg-type]
        if entry is None:
            return
        actual = max(0, actual_tokens)
        if entry.in_window:
            state.tokens += actual - entry.tokens
        entry.tokens = actual

    def release(self, reservation_id: int | None) -> None:
        """Free the slot keeping the reserved tokens counted (the request never ran)."""
        tenant = self._owner.pop(reservation_id, None) if reservation_id is not None else None
        if tenant is not None:
            self._tenants[tenant].open.pop(reservation_id, None)  # type: ignore[arg-type]

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
    def _fill(decision: Decision, state: _Tenant, lim: Limits, now: float) -> None:
        # "reset": time until the window is back to its initial (empty) state.
        reset = max(0.0, state.window[-1].at + WINDOW_S - now) if state.window else 0.0
        if lim.rpm is not None:
            decision.limit_requests = lim.rpm
            decision.remaining_requests = max(0, lim.rpm - len(state.window))
            decision.reset_requests_s = reset
        if lim.tpm is not None:
            decision.limit_tokens = lim.tpm
            decision.remaining_tokens = max(0, lim.tpm - state.tokens)
            decision.reset_tokens_s = reset
        decision.headers = ratelimit_headers(decision)


def _as_limits(limits: LimitsLike | dict[str, Any] | None) -> Limits:
    if limits is None:
        return Limits()
    if isinstance(limits, dict):
        return Limits(**limits)
    return Limits(limits.rpm, limits.tpm, limits.max_concurrency)


def _tokens_free_in(state: _Tenant, tokens: int, tpm: int, now: float) -> float:
    """Seconds until enough of the oldest entries leave the window for `tokens` to fit."""
    total = state.tokens
    for entry in state.window:
        total -= entry.tokens
        if total + tokens <= tpm:
            return entry.at + WINDOW_S - now
    return WINDOW_S


@ray.remote(num_cpus=0)
class RateLimiterActor:
    """One RateLimitState for all ingress replicas. Returns plain dicts over Ray."""

    def __init__(self, reservation_ttl_s: float = DEFAULT_TTL_S) -> None:
        self.state = RateLimitState(reservation_ttl_s)

    async def reserve(self, tenant: str, tokens: int, limits: dict[str, Any]) -> dict[str, Any]:
        return asdict(self.state.reserve(tenant, tokens, limits))

    async def settle(self, reservation_id: int | None, actual_tokens: int) -> None:
        self.state.settle(reservation_id, actual_tokens)

    async def release(self, reservation_id: int | None) -> None:
        self.state.release(reservation_id)

    async def usage(self, tenant: str) -> dict[str, int]:
        return self.state.usage(tenant)


def get_rate_limiter(
    name: str = ACTOR_NAME,
    namespace: str = ACTOR_NAMESPACE,
    *,
    detached: bool = False,
    reservation_ttl_s: float = DEFAULT_TTL_S,
) -> ray.actor.ActorHandle:
    """The named limiter, created by whichever caller comes first (get-if-exists).

    Not detached by default: it then lives as long as the replica that created it.
    Pass detached=True when it must outlive any one ingress replica (production).
    """
    options: dict[str, Any] = {"name": name, "namespace": namespace, "get_if_exists": True}
    if detached:
        options["lifetime"] = "detached"
    return RateLimiterActor.options(**options).remote(reservation_ttl_s)
