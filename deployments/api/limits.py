"""Admission's answers over HTTP: OpenAI's x-ratelimit-* headers and the one 429/503
builder for every refusal (rate limits, no spill, a saturated pool, admission down)."""

from __future__ import annotations

import math
from dataclasses import replace

from deployments.api.errors import OpenAIError
from deployments.tenancy.types import Admission, RateLimitStatus, Refusal

# The bounded `reason` label of tiered_rejections_total, per refusal.
REJECTION_REASON = {"dedicated_saturated": "no_spill"}


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


def ratelimit_headers(limits: RateLimitStatus) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the limits the tenant has."""
    headers: dict[str, str] = {}
    if limits.limit_requests is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.limit_requests)
        headers["x-ratelimit-remaining-requests"] = str(limits.remaining_requests)
        headers["x-ratelimit-reset-requests"] = duration(limits.reset_requests_s or 0.0)
    if limits.limit_tokens is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.limit_tokens)
        headers["x-ratelimit-remaining-tokens"] = str(limits.remaining_tokens)
        headers["x-ratelimit-reset-tokens"] = duration(limits.reset_tokens_s or 0.0)
    return headers


def rejection_reason(refusal: Refusal) -> str:
    return REJECTION_REASON.get(refusal.reason, refusal.reason)


def refusal_error(admission: Admission, tenant: str) -> OpenAIError:
    """The 429 (or 503) for a refused admission, in OpenAI's shape and with its headers."""
    refusal = admission.refusal
    assert refusal is not None
    headers = {**ratelimit_headers(admission.limits), **retry_headers(refusal.retry_after_s)}
    reason = refusal.reason
    if reason == "concurrency":
        message = f"Too many concurrent requests for tenant '{tenant}'."
    elif reason == "tpm" and refusal.too_large:
        message = (
            f"Request too large for tenant '{tenant}' on tokens per min (TPM): "
            f"Limit {admission.limits.limit_tokens}. Reduce the prompt or max_tokens."
        )
    elif reason in ("rpm", "tpm"):
        what = "requests per min (RPM)" if reason == "rpm" else "tokens per min (TPM)"
        message = (
            f"Rate limit reached for tenant '{tenant}' on {what}. "
            f"Please try again in {duration(refusal.retry_after_s)}."
        )
    elif reason == "dedicated_saturated":
        message = (
            f"The dedicated capacity of tenant '{tenant}' is saturated and spillover is "
            "disabled."
        )
        return OpenAIError(429, message, code="dedicated_capacity_exceeded", headers=headers)
    elif reason in ("queue_deadline", "queue_full", "abandoned"):
        message = "The shared pool is saturated; retry later."
        return OpenAIError(429, message, code="pool_saturated", headers=headers)
    elif reason == "no_shared_pool":
        message = "This model has no shared pool to serve the request."
        return OpenAIError(503, message, code="no_shared_pool", headers=headers)
    else:  # unknown_tenant: a configuration rollout is in progress
        message = "The service is being reconfigured; retry shortly."
        return OpenAIError(503, message, code="service_unavailable", headers=headers)
    kind = {"rpm": "requests", "tpm": "tokens"}.get(reason, "rate_limit_error")
    return OpenAIError(429, message, type=kind, code="rate_limit_exceeded", headers=headers)


def with_retry_after(admission: Admission, retry_after_s: float) -> Admission:
    """A remembered refusal, answered again with the time left until it lifts."""
    assert admission.refusal is not None
    return replace(admission, refusal=replace(admission.refusal, retry_after_s=retry_after_s))


def admission_unavailable() -> OpenAIError:
    """Admission cannot be reached (its actor restarting): a clean 503, come back soon."""
    return OpenAIError(
        503,
        "The service is temporarily unavailable; retry shortly.",
        code="service_unavailable",
        headers=retry_headers(1.0),
    )
