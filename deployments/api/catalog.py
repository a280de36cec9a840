"""Which model ids a tenant may send: the config's base models, and the LoRA adapters in
the state store's registry.

An adapter is read from the registry on every request that names one (base-model
requests never touch the database), so an unload through any ingress replica holds on
all of them at once. An adapter the tenant may not use answers exactly like a missing
model (404 model_not_found): adapter names are not probed across tenants.
"""

from __future__ import annotations

import logging
from typing import Any

from deployments.api.errors import OpenAIError, state_unavailable
from deployments.api.prompts import ServedModel
from deployments.config.tenants import TenantSpec
from deployments.config.tiered import TieredConfig
from deployments.state.adapters import Adapter, AdapterRegistry, NewAdapter
from deployments.state.errors import StateError
from deployments.state.store import StateStore
from models.lora import LoRARequest

log = logging.getLogger(__name__)


def configured_adapters(config: TieredConfig) -> list[NewAdapter]:
    return [
        NewAdapter(a.name, m.name, a.path, tuple(a.tenants))
        for m in config.models
        for a in m.adapters
    ]


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(
        404, f"The model '{name}' does not exist", param="model", code="model_not_found"
    )


def check_allowed(tenant: TenantSpec, model: ServedModel) -> None:
    """A base model outside the tenant's list is a 403 (adapters were checked, as 404s,
    when resolved)."""
    _check_base_allowed(tenant, model.base, model.name)


def _check_base_allowed(tenant: TenantSpec, base: str, name: str) -> None:
    if not tenant.may_use(base):
        raise OpenAIError(
            403,
            f"tenant '{tenant.name}' may not use model '{name}'",
            param="model",
            code="model_not_allowed",
        )


def _model_object(name: str, created: int, parent: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"id": name, "object": "model", "created": created, "owned_by": "tiered"}
    if parent is not None:
        body["parent"] = parent
    return body


class ModelCatalog:
    """Base models by name, adapters through the registry."""

    def __init__(
        self, config: TieredConfig, models: dict[str, ServedModel], store: StateStore
    ) -> None:
        self.config = config
        self.models = models
        self.store = store
        self.registry = AdapterRegistry(store)
        self._ready = False

    async def prepare(self) -> None:
        """The store migrated and the config's adapters registered, once per replica
        (retried by the next caller after a failure; the registration is idempotent).
        The admission actor migrates only a database it opened itself (a reused actor
        keeps its own), so each ingress replica prepares the store too."""
        if not self._ready:
            await self.store.prepare()
            await self.registry.sync_config(configured_adapters(self.config))
            self._ready = True

    def usable(self, tenant: TenantSpec, adapter: Adapter) -> ServedModel | None:
        """The adapter as this tenant may serve it, or None (base gone or not allowed)."""
        base = self.models.get(adapter.base_model)
        if base is None or not tenant.may_use(base.name) or not adapter.may_serve(tenant.name):
            return None
        return base.with_adapter(LoRARequest(adapter.name, adapter.version, adapter.path))

    async def resolve(self, tenant: TenantSpec, name: str) -> ServedModel:
        """The model a request names; 404 if none the tenant may use by that name, 503
        if the registry cannot answer for a name that is no base model."""
        model = self.models.get(name)
        if model is not None:
            return model
        if self.config.model(name) is not None:  # configured, but no deployment serves it
            _check_base_allowed(tenant, name, name)
            raise OpenAIError(
                503,
                f"The model '{name}' has no deployment to serve it",
                param="model",
                code="model_not_deployed",
            )
        try:
            await self.prepare()
            adapter = await self.registry.get(name)
        except StateError:
            raise state_unavailable() from None
        served = self.usable(tenant, adapter) if adapter is not None else None
        if served is None:
            raise model_not_found(name)
        return served

    async def listed(self, tenant: TenantSpec) -> list[dict[str, Any]]:
        """GET /v1/models: the base models the tenant may use, then its adapters (with
        `parent`). While the registry cannot answer, the base models alone: listing
        must not fail the clients that only use those."""
        data = [_model_object(m.name, 0) for m in self.config.models if tenant.may_use(m.name)]
        try:
            await self.prepare()
            adapters = await self.registry.active()
        except StateError as exc:
            log.warning("GET /v1/models without adapters: %s", exc)
            return data
        for adapter in adapters:
            served = self.usable(tenant, adapter)
            if served is not None and adapter.loaded_at is not None:
                data.append(
                    _model_object(served.name, int(adapter.loaded_at.timestamp()), served.parent)
                )
        return data
