"""The stateful API's read, delete and cancel routes, and Conversations, mixed into the
Ingress (as deployments.api.finetune_routes is: `serve.ingress` binds the routes of every
class in the Ingress's MRO). `POST /v1/responses` is on the request path, in the ingress.
The work is in deployments.api.conversations.
"""

# No `from __future__ import annotations`: FastAPI must resolve `Request` at runtime.
from collections.abc import Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Request

from deployments.api.auth import authenticate, json_body
from deployments.api.catalog import ModelCatalog
from deployments.api.conversations import StatefulReads
from deployments.api.errors import state_unavailable
from deployments.api.upkeep import Upkeep
from deployments.config.tiered import TieredConfig
from deployments.state.errors import StateError
from deployments.tenancy.keys import KeyRings

T = TypeVar("T")
router = APIRouter()


class StatefulRoutes:
    """Routes over `reads` and `upkeep`; the Ingress sets them, `keys`, `config`, `catalog`."""

    config: TieredConfig
    catalog: ModelCatalog
    reads: StatefulReads
    upkeep: Upkeep

    @property
    def keys(self) -> KeyRings:
        """The API keys (the Ingress re-reads them when the key file changes)."""
        raise NotImplementedError

    async def _stored(self, work: Coroutine[Any, Any, T]) -> T:
        """Await a state-store call: an outage is a 503, never a 500."""
        try:
            await self.catalog.prepare()
            return await work
        except StateError:
            raise state_unavailable() from None
        finally:
            work.close()  # a no-op once awaited; else the call never started

    @router.get("/v1/responses/{response_id}")
    async def get_response(self, request: Request, response_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self._stored(self.reads.get_response(tenant, response_id))

    @router.delete("/v1/responses/{response_id}")
    async def delete_response(self, request: Request, response_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self._stored(self.reads.delete_response(tenant, response_id))

    @router.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(self, request: Request, response_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        query = dict(request.query_params)
        return await self._stored(self.reads.input_items(tenant, response_id, query))

    @router.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(self, request: Request, response_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        body = await self._stored(self.reads.cancel_response(tenant, response_id))
        self.upkeep.cancel_here(response_id)
        return body

    @router.post("/v1/conversations")
    async def create_conversation(self, request: Request) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        body = await json_body(request)
        return await self._stored(self.reads.create_conversation(tenant, body))

    @router.get("/v1/conversations/{conv_id}")
    async def get_conversation(self, request: Request, conv_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self._stored(self.reads.get_conversation(tenant, conv_id))

    @router.post("/v1/conversations/{conv_id}")
    async def update_conversation(self, request: Request, conv_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        body = await json_body(request)
        return await self._stored(self.reads.update_conversation(tenant, conv_id, body))

    @router.delete("/v1/conversations/{conv_id}")
    async def delete_conversation(self, request: Request, conv_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self._stored(self.reads.delete_conversation(tenant, conv_id))

    @router.post("/v1/conversations/{conv_id}/items")
    async def add_conversation_items(self, request: Request, conv_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        body = await json_body(request)
        return await self._stored(self.reads.add_items(tenant, conv_id, body))

    @router.get("/v1/conversations/{conv_id}/items")
    async def list_conversation_items(self, request: Request, conv_id: str) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        query = dict(request.query_params)
        return await self._stored(self.reads.list_items(tenant, conv_id, query))

    @router.get("/v1/conversations/{conv_id}/items/{item_id}")
    async def get_conversation_item(
        self, request: Request, conv_id: str, item_id: str
    ) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self._stored(self.reads.get_item(tenant, conv_id, item_id))

    @router.delete("/v1/conversations/{conv_id}/items/{item_id}")
    async def delete_conversation_item(
        self, request: Request, conv_id: str, item_id: str
    ) -> dict[str, Any]:
        tenant = authenticate(self.keys, self.config, request)
        return await self._stored(self.reads.delete_item(tenant, conv_id, item_id))
