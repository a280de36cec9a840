"""Per-request metrics at the ingress: status codes, 429 reasons, latencies and tokens.

The route handlers put what they learn (tenant, tier, model, a 429's reason) into the
request's `state`; a pure ASGI middleware counts every /v1 response from it, including
errors answered before the handler knew anything. `RequestTimer` measures one request's
TTFT, ITL, TPOT and end-to-end time from its arrival, for streams and plain answers alike.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.observability import metrics
from models.outputs import Usage

NO_TIER = "none"
REASON_BY_CODE = {"dedicated_capacity_exceeded": "no_spill"}


def rejection_reason(code: str | None) -> str:
    """The bounded 429 reason from an OpenAI error code (`rate_limit_exceeded:<reason>`)."""
    if code in REASON_BY_CODE:
        return REASON_BY_CODE[code]
    prefix, _, reason = (code or "").partition(":")
    return reason if prefix == "rate_limit_exceeded" and reason else metrics.UNKNOWN


def served_tier(tier: str, spill: bool) -> str:
    """`spill` for a dedicated tenant's overflow on the shared pool: billed apart."""
    return "spill" if spill else tier


class RequestMetricsMiddleware:
    """Counts each /v1 response once, by tenant, tier, model and status code."""

    def __init__(self, app: ASGIApp, prefix: str = "/v1/") -> None:
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        counted = False

        async def counting_send(message: Message) -> None:
            nonlocal counted
            if message["type"] == "http.response.start" and not counted:
                counted = True
                record_response(state, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not counted:
                record_response(state, 500)
            raise


def record_response(state: dict[str, Any], status: int) -> None:
    tenant = state.get("tenant", metrics.UNKNOWN)
    tier = state.get("tier", NO_TIER)
    metrics.inc(
        "tiered_requests_total",
        tenant=tenant,
        tier=tier,
        model=state.get("model", metrics.UNKNOWN),
        code=status,
    )
    if status == 429:
        reason = state.get("reject_reason", metrics.UNKNOWN)
        metrics.inc("tiered_rejections_total", tenant=tenant, tier=tier, reason=reason)


class RequestTimer:
    """One request's latencies, recorded when it closes (however it closes)."""

    def __init__(self, model: str, started: float | None = None) -> None:
        self.model = model
        self.started = time.monotonic() if started is None else started
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.tier = NO_TIER
        self.tenant = metrics.UNKNOWN
        self.spill = False

    def serving(self, tenant: str, tier: str, spill: bool) -> None:
        self.tenant, self.tier, self.spill = tenant, served_tier(tier, spill), spill

    def output(self, now: float | None = None) -> None:
        """An engine output arrived: the first gives TTFT, later ones an ITL sample."""
        now = time.monotonic() if now is None else now
        if self.first_at is None:
            self.first_at = now
            ttft = now - self.started
            metrics.observe("tiered_ttft_seconds", ttft, tenant=self.tenant, **self._labels())
        elif self.last_at is not None:
            metrics.observe("tiered_itl_seconds", now - self.last_at, **self._labels())
        self.last_at = now

    def finish(self, usage: Usage, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        labels = self._labels()
        if self.first_at is not None:
            metrics.observe("tiered_e2e_latency_seconds", now - self.started, **labels)
            if usage.completion_tokens > 1 and self.last_at is not None:
                tpot = (self.last_at - self.first_at) / (usage.completion_tokens - 1)
                metrics.observe("tiered_tpot_seconds", tpot, **labels)
        counted = {"tenant": self.tenant, **labels}
        metrics.inc("tiered_tokens_total", usage.prompt_tokens, kind="prompt", **counted)
        metrics.inc("tiered_tokens_total", usage.cached_tokens, kind="cached", **counted)
        metrics.inc("tiered_tokens_total", usage.completion_tokens, kind="completion", **counted)
        if self.spill:
            metrics.inc("tiered_spill_requests_total", tenant=self.tenant, model=self.model)
            metrics.inc(
                "tiered_spill_tokens_total",
                usage.prompt_tokens + usage.completion_tokens,
                tenant=self.tenant,
                model=self.model,
            )

    def _labels(self) -> dict[str, str]:
        return {"tier": self.tier, "model": self.model}
