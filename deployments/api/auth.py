"""Who is calling (the bearer key, its tenant, else a 401), and the JSON body they sent."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from deployments.api.errors import OpenAIError
from deployments.config.tenants import TenantSpec
from deployments.config.tiered import TieredConfig
from deployments.tenancy.keys import KeyRings


def bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def authenticate(keys: KeyRings, config: TieredConfig, request: Request) -> TenantSpec:
    """The tenant whose key made the request; a 401 for a missing or unknown key."""
    token = bearer(request)
    name = keys.tenants.tenant_for(token)
    tenant = config.tenant(name) if name is not None else None
    if tenant is None:
        message = "Incorrect API key provided." if token else "You didn't provide an API key."
        raise OpenAIError(401, message, code="invalid_api_key")
    return tenant


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OpenAIError(400, "We could not parse the JSON body of your request.") from None
