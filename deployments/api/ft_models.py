"""`DELETE /v1/models/{model}` (OpenAI's shape) for the fine-tuned models a tenant trained.

Only a succeeded job's `ft:` model is deleted, by the tenant it belongs to: it is retired
from the adapter registry at once on every ingress replica (requests for it are then 404s)
and replicas drop its weights as their caches turn over, as for an unloaded adapter. A
model the tenant cannot see is the same 404 as a missing one; a base model or an adapter
from the config or an admin's load is a 403. The job and its checkpoints stay.
"""

from __future__ import annotations

from typing import Any

from deployments.api.catalog import ModelCatalog, model_not_found
from deployments.api.errors import OpenAIError
from deployments.api.files import state_call
from deployments.config.tenants import TenantSpec


def _not_deletable(model_id: str) -> OpenAIError:
    return OpenAIError(
        403,
        f"The model '{model_id[:256]}' cannot be deleted: only fine-tuned models a tenant "
        "trained can be.",
        param="model",
        code="model_not_deletable",
    )


async def delete_fine_tuned_model(
    catalog: ModelCatalog, tenant: TenantSpec, model_id: str
) -> dict[str, Any]:
    if model_id in catalog.models:
        if tenant.may_use(model_id):
            raise _not_deletable(model_id)
        raise model_not_found(model_id)
    await state_call(catalog.prepare())
    adapter = await state_call(catalog.registry.get(model_id))
    if adapter is None or catalog.usable(tenant, adapter) is None:
        raise model_not_found(model_id)
    if adapter.source != "fine_tune" or adapter.tenants != (tenant.name,):
        raise _not_deletable(model_id)
    if await state_call(catalog.registry.unload(model_id)) is None:
        raise model_not_found(model_id)  # deleted meanwhile
    return {"id": model_id, "object": "model", "deleted": True}
