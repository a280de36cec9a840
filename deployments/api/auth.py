"""Who is calling: the bearer key, and the tenant it belongs to (401 otherwise)."""

from __future__ import annotations

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
