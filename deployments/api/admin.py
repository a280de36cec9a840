"""The admin endpoints' work, kept out of the ingress class: who may call them, and the
usage report read from the ledger (the database, never an actor's memory).

A bad query parameter is the caller's mistake (400 naming it); a database that cannot
answer is the server's (503, the reason in the log only, never the URL's password).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from deployments.api.errors import UNAVAILABLE_RETRY_S, OpenAIError
from deployments.config.prices import PricesSpec
from deployments.state.errors import StateError
from deployments.state.ledger import Ledger
from deployments.state.report import UsageQueryError, build_usage_report, parse_usage_query
from deployments.tenancy.keys import KeyRings

log = logging.getLogger(__name__)
REPORT_TIMEOUT_S = 30.0
USAGE_PARAMS = ("start", "end", "tenant", "group_by")


def require_admin(keys: KeyRings, token: str | None) -> None:
    """401 for no key or an unknown one, 403 for a tenant's key."""
    if keys.admin.tenant_for(token) is not None:
        return
    if keys.tenants.tenant_for(token) is not None:
        raise OpenAIError(403, "this endpoint needs an admin key", code="forbidden")
    raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")


async def usage_report(
    ledger: Ledger, prices: PricesSpec, params: dict[str, str]
) -> dict[str, Any]:
    """GET /admin/usage?start=&end=&tenant=&group_by=: the report as JSON-ready data."""
    unknown = sorted(set(params) - set(USAGE_PARAMS))
    if unknown:
        raise OpenAIError(
            400, f"unknown query parameter {unknown[0][:40]!r}; use {', '.join(USAGE_PARAMS)}",
            param=unknown[0][:40],
        )
    try:
        query = parse_usage_query(
            params.get("start"), params.get("end"), params.get("tenant"),
            params.get("group_by"), datetime.now(UTC),
        )
    except UsageQueryError as exc:
        raise OpenAIError(400, str(exc), param=exc.param) from None
    try:
        report = await asyncio.wait_for(
            build_usage_report(ledger, prices, query), REPORT_TIMEOUT_S
        )
    except (StateError, SQLAlchemyError, OSError, TimeoutError) as exc:
        log.warning("usage report: the ledger cannot answer (%s)", type(exc).__name__)
        raise OpenAIError(
            503, "The usage ledger is unavailable; retry shortly.",
            code="ledger_unavailable", headers={"retry-after": str(UNAVAILABLE_RETRY_S)},
        ) from None
    return report.model_dump(mode="json")
