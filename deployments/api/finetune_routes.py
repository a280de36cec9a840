"""The Files API's routes (and, next, the Fine-tuning API's), mixed into the Ingress.

`serve.ingress` binds every route whose endpoint belongs to a class in the Ingress's MRO,
routers included with `include_router` too, so these routes live here and the ingress
module stays the request path. The work is in deployments.api.files.
"""

# No `from __future__ import annotations`: FastAPI must resolve `Request` at runtime.
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from deployments.api.auth import authenticate
from deployments.api.files import FilesApi
from deployments.config.tiered import TieredConfig
from deployments.tenancy.keys import KeyRings

router = APIRouter()


class FineTuningRoutes:
    """Routes over `self.files`; the Ingress sets it, `keys` and `config`."""

    keys: KeyRings
    config: TieredConfig
    files: FilesApi

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
