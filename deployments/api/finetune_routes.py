"""The Files and Fine-tuning APIs' routes (and deleting a fine-tuned model), mixed into the
Ingress.

`serve.ingress` binds every route whose endpoint belongs to a class in the Ingress's MRO,
routers included with `include_router` too, so these routes live here and the ingress
module stays the request path. The work is in deployments.api.files and .jobs.
"""

# No `from __future__ import annotations`: FastAPI must resolve `Request` at runtime.
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deployments.api.auth import authenticate, json_body
from deployments.api.catalog import ModelCatalog
from deployments.api.files import FilesApi
from deployments.api.ft_models import delete_fine_tuned_model
from deployments.api.jobs import JobsApi, job_object
from deployments.config.tiered import TieredConfig
from deployments.tenancy.keys import KeyRings

router = APIRouter()


class FineTuningRoutes:
    """Routes over `files`, `jobs` and `catalog`; the Ingress sets them, `keys`, `config`."""

    config: TieredConfig
    files: FilesApi
    jobs: JobsApi
    catalog: ModelCatalog

    @property
    def keys(self) -> KeyRings:
        """The API keys (the Ingress re-reads them when the key file changes)."""
        raise NotImplementedError

    @router.post("/v1/files")
    async def create_file(self, request: Request) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self.files.create(tenant.name, request)

    @router.get("/v1/files")
    async def list_files(self, request: Request) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self.files.list(tenant.name, dict(request.query_params))

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(self, request: Request, file_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self.files.get(tenant.name, file_id)

    @router.get("/v1/files/{file_id}/content")
    async def file_content(self, request: Request, file_id: str) -> Response:
        tenant = authenticate(self.keys, self.config, request)
        return await self.files.content(tenant.name, file_id)

    @router.delete("/v1/files/{file_id}")
    async def delete_file(self, request: Request, file_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self.files.delete(tenant.name, file_id)

    # ---- fine-tuning jobs (deployments.api.jobs) -------------------------------------------
    @router.post("/v1/fine_tuning/jobs")
    async def create_fine_tuning_job(self, request: Request) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self.jobs.create(tenant.name, await json_body(request))

    @router.get("/v1/fine_tuning/jobs")
    async def list_fine_tuning_jobs(self, request: Request) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self.jobs.list(tenant.name, dict(request.query_params))

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_fine_tuning_job(self, request: Request, job_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return job_object(await self.jobs.get(tenant.name, job_id))

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_fine_tuning_job(self, request: Request, job_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self.jobs.cancel(tenant.name, job_id)

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def fine_tuning_job_events(self, request: Request, job_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self.jobs.events(tenant.name, job_id, dict(request.query_params))

    @router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    async def fine_tuning_job_checkpoints(self, request: Request, job_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self.jobs.checkpoints(tenant.name, job_id, dict(request.query_params))

    @router.delete("/v1/models/{model_id:path}")
    async def delete_model(self, request: Request, model_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await delete_fine_tuned_model(self.catalog, tenant, model_id)
