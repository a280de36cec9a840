"""Who is calling (the bearer key, its tenant, else a 401), and the JSON body they sent."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from deployments.api.errors import OpenAIError
from deployments.config.tenants import TenantSpec
from deployments.config.tiered import TieredConfig
from deployments.tenancy.keys import KeyRings

# What HTTP allows around a header value (RFC 9110 §5.5: optional whitespace is SP and
# HTAB); str.strip() would also drop Unicode spaces such as U+00A0, and then a key with a
# no-break space after it would authenticate.
_OWS = " \t"


def bearer_token(authorization: str) -> str | None:
    """The token of a `Bearer <token>` header value, exactly as sent apart from SP/HTAB
    around it; None when the scheme is not Bearer or no token follows."""
    scheme, _, token = authorization.strip(_OWS).partition(" ")
    token = token.strip(_OWS)
    return token if scheme.lower() == "bearer" and token else None


def bearer(request: Request) -> str | None:
    return bearer_token(request.headers.get("authorization", ""))


def authenticate(keys: KeyRings, config: TieredConfig, request: Request) -> TenantSpec:
    """The tenant whose key made the request; a 401 for a missing or unknown key."""
    token = bearer(request)
    name = keys.tenants.tenant_for(token)
    tenant = config.tenant(name) if name is not None else None
    if tenant is None:
        message = "Incorrect API key provided." if token else "You didn't provide an API key."
        raise OpenAIError(401, message, code="invalid_api_key")
    if keys.door is not None and tenant.name != keys.door:
        raise OpenAIError(
            403,
            f"This endpoint is tenant {keys.door!r}'s own entry; use the shared endpoint.",
            code="wrong_endpoint",
        )
    return tenant


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OpenAIError(400, "We could not parse the JSON body of your request.") from None
