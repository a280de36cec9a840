"""Hot-loading LoRA adapters: vLLM's `POST /v1/load_lora_adapter` and
`/v1/unload_lora_adapter`, for admin keys.

A load reserves a new version in the registry, asks one replica of the base model (its
shared pool, else a dedicated copy) to load it, which validates it fully (a bad adapter
is a 400 naming the field, and that replica keeps serving), and only then makes it
visible. Other replicas load it on the first request that needs it. An unload retires
the name in the registry at once for every ingress replica; replicas still holding the
weights drop them as their LRU caches turn over (no request can name that version again).
Adapters from the config are the config's: unloading one is refused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from ray.serve.handle import DeploymentHandle

from deployments.api.catalog import ModelCatalog
from deployments.api.errors import (
    OpenAIError,
    from_engine_error,
    parse_body,
    state_unavailable,
    unavailable,
)
from deployments.config.models import ModelId
from deployments.config.plan import deployment_plan
from deployments.config.tenants import TenantName
from deployments.state.adapters import (
    Adapter,
    AdapterExistsError,
    ConfiguredAdapterError,
    NewAdapter,
)
from deployments.state.errors import StateError
from models.lora import LoRARequest

log = logging.getLogger(__name__)
T = TypeVar("T")
AdapterName = Annotated[ModelId, Field(max_length=256)]


class LoadAdapterBody(BaseModel):
    """vLLM's load request, plus who may use it and, with several base models, which."""

    model_config = ConfigDict(extra="forbid")

    lora_name: AdapterName
    lora_path: str = Field(min_length=1, max_length=4096)
    tenants: list[TenantName] | None = None  # None or []: every tenant of the base model
    base_model: str | None = None  # required only when several base models are served


class UnloadAdapterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lora_name: str = Field(min_length=1, max_length=256)


def _adapter_object(adapter: Adapter, **extra: Any) -> dict[str, Any]:
    return {
        "object": "lora_adapter",
        "id": adapter.name,
        "version": adapter.version,
        "parent": adapter.base_model,
        "tenants": list(adapter.tenants),
        **extra,
    }


class AdapterAdmin:
    """The two admin endpoints' work (the ingress checks the admin key first)."""

    def __init__(
        self, catalog: ModelCatalog, handles: dict[str, DeploymentHandle], timeout_s: float
    ) -> None:
        self.catalog = catalog
        self.handles = handles
        self.timeout_s = timeout_s
        # base model -> its pools (key, owner), shared pool first (deployment_plan's order)
        self.pools: dict[str, list[tuple[str, str | None]]] = {}
        for plan in deployment_plan(catalog.config):
            self.pools.setdefault(plan.model.name, []).append((plan.key, plan.tenant))

    async def load(self, body: Any) -> dict[str, Any]:
        req = parse_body(LoadAdapterBody, body)
        if self.catalog.config.model(req.lora_name) is not None:
            raise OpenAIError(
                400, f"'{req.lora_name}' is the name of a base model", param="lora_name"
            )
        base = self._base(req.base_model)
        tenants = tuple(dict.fromkeys(req.tenants or ()))
        self._check_tenants(base, tenants)
        new = NewAdapter(req.lora_name, base, req.lora_path, tenants)
        reserved = await self._registry_call(self._reserve(new))
        try:
            seconds = await self._load_on_replica(base, reserved)
        except BaseException:
            await self._discard(reserved)
            raise
        try:
            active = await self._registry_call(self.catalog.registry.activate(reserved))
        except OpenAIError:
            await self._discard(reserved)
            raise
        return _adapter_object(active, load_seconds=round(seconds, 3))

    async def unload(self, body: Any) -> dict[str, Any]:
        req = parse_body(UnloadAdapterBody, body)
        gone = await self._registry_call(self._unload(req.lora_name))
        if gone is None:
            raise OpenAIError(
                404,
                f"The LoRA adapter '{req.lora_name}' cannot be found.",
                param="lora_name",
                code="lora_adapter_not_found",
            )
        return _adapter_object(gone, deleted=True)

    # ---- steps ---------------------------------------------------------------------------
    def _base(self, named: str | None) -> str:
        bases = [m.name for m in self.catalog.config.models]  # served or not, as configured
        if named is None:
            if len(bases) > 1:
                raise OpenAIError(
                    400,
                    f"several base models are configured ({', '.join(bases)}): name one in "
                    "'base_model'",
                    param="base_model",
                )
            named = bases[0]
        if named not in bases:
            raise OpenAIError(
                400,
                f"base_model '{named[:256]}' is not served here",
                param="base_model",
                code="model_not_found",
            )
        if not self.pools.get(named):
            raise OpenAIError(
                400,
                f"base model '{named}' has no replicas to load an adapter onto",
                param="base_model",
            )
        return named

    def _check_tenants(self, base: str, tenants: tuple[str, ...]) -> None:
        for i, name in enumerate(tenants):
            tenant = self.catalog.config.tenant(name)
            if tenant is None:
                raise OpenAIError(400, f"unknown tenant '{name}'", param=f"tenants.{i}")
            if not tenant.may_use(base):
                raise OpenAIError(
                    400,
                    f"tenant '{name}' may not use the base model '{base}'",
                    param=f"tenants.{i}",
                )

    async def _reserve(self, new: NewAdapter) -> Adapter:
        await self.catalog.prepare()
        return await self.catalog.registry.reserve(new, "api")

    async def _unload(self, name: str) -> Adapter | None:
        await self.catalog.prepare()
        return await self.catalog.registry.unload(name)

    async def _registry_call(self, work: Coroutine[Any, Any, T]) -> T:
        """A registry call: a taken name or a config adapter is a 400, an outage a 503,
        never a 500."""
        try:
            return await work
        except AdapterExistsError as exc:
            raise OpenAIError(
                400,
                f"The LoRA adapter '{exc.name}' is already loaded; unload it first.",
                param="lora_name",
                code="lora_adapter_exists",
            ) from None
        except ConfiguredAdapterError as exc:
            raise OpenAIError(
                400,
                f"The LoRA adapter '{exc.name}' is defined in the config "
                "(models[].adapters); remove it there and redeploy.",
                param="lora_name",
                code="lora_adapter_in_config",
            ) from None
        except StateError:
            raise state_unavailable() from None

    def _pool_for(self, base: str, tenants: tuple[str, ...]) -> str:
        """Where an adapter is first loaded: the private copy of its tenant when it is for
        dedicated tenants only (they run it there), else the shared pool."""
        private = {owner: key for key, owner in self.pools[base] if owner is not None}
        if tenants and all(t in private for t in tenants):
            return private[tenants[0]]
        return self.pools[base][0][0]

    async def _load_on_replica(self, base: str, reserved: Adapter) -> float:
        """One replica of the base validates and loads it: the engine's LoRALoadError
        (bad path, weights, rank, base) comes back as a 400 naming its param."""
        handle = self.handles[self._pool_for(base, reserved.tenants)]
        lora = LoRARequest(reserved.name, reserved.version, reserved.path)
        response = handle.load_lora.remote(lora)
        try:
            return float(await asyncio.wait_for(response, self.timeout_s))
        except TimeoutError:
            response.cancel()
            raise unavailable(
                f"Loading the LoRA adapter '{reserved.name}' took over {self.timeout_s:g}s; "
                "retry shortly.",
                code="lora_load_timeout",
            ) from None
        except Exception as exc:
            mapped = from_engine_error(exc)
            if mapped is None:
                raise
            raise mapped from None

    async def _discard(self, reserved: Adapter) -> None:
        """Retire a reservation that did not become active; an outage only leaves it
        reserved, which is never visible."""
        try:
            await asyncio.shield(self.catalog.registry.discard(reserved))
        except StateError as exc:
            log.warning("adapter %s v%d left reserved: %s", reserved.name, reserved.version, exc)
