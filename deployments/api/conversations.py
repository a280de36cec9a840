"""The Conversations API and the stored-response reads: tenant-scoped CRUD on the store.

Every lookup is by (tenant, id): another tenant's id is the same 404 as one that never
existed, so ids cannot be probed. Expiry follows the tenant's retention settings.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from deployments.api.conversation_objects import (
    conversation_deleted,
    conversation_object,
    item_list,
    response_deleted,
)
from deployments.api.errors import OpenAIError
from deployments.api.history import not_found
from deployments.api.responses_protocol import (
    parse_conversation_create,
    parse_conversation_update,
    parse_items_create,
    parse_list_params,
)
from deployments.config.tenants import TenantSpec
from deployments.state.conversations import ConversationStore
from deployments.state.responses import ResponseStore
from deployments.state.stored import Page, StoredConversation, UnknownCursorError, page


def expiry(now: datetime, days: float | None) -> datetime | None:
    return None if days is None else now + timedelta(days=days)


def _list(result: Page) -> dict[str, Any]:
    return item_list([i.item for i in result.items], result.has_more)


def _bad_cursor(after: str | None) -> OpenAIError:
    return OpenAIError(400, f"No item with id '{after}' in this list.", param="after")


@dataclass
class StatefulReads:
    """The endpoints that only read or edit what the store holds (no generation)."""

    responses: ResponseStore
    conversations: ConversationStore

    # ---- stored responses -----------------------------------------------------------
    async def get_response(self, tenant: TenantSpec, response_id: str) -> dict[str, Any]:
        stored = await self.responses.get(tenant.name, response_id, _now())
        if stored is None:
            raise not_found("Response", response_id)
        return {**stored.body, "status": stored.status}

    async def delete_response(self, tenant: TenantSpec, response_id: str) -> dict[str, Any]:
        if not await self.responses.delete(tenant.name, response_id):
            raise not_found("Response", response_id)
        return response_deleted(response_id)

    async def input_items(
        self, tenant: TenantSpec, response_id: str, query: Mapping[str, str]
    ) -> dict[str, Any]:
        params = parse_list_params(query)
        stored = await self.responses.get(tenant.name, response_id, _now())
        if stored is None:
            raise not_found("Response", response_id)
        try:
            result = page(stored.input_items, params.after, params.limit, params.order)
        except UnknownCursorError:
            raise _bad_cursor(params.after) from None
        return _list(result)

    async def cancel_response(self, tenant: TenantSpec, response_id: str) -> dict[str, Any]:
        stored = await self.responses.cancel(tenant.name, response_id)
        if stored is None:
            raise not_found("Response", response_id)
        if stored.status != "cancelled":
            raise OpenAIError(
                400, f"Response '{response_id}' has already finished ({stored.status}); only "
                "a response still in progress can be cancelled.", param="response_id",
            )
        return {**stored.body, "status": "cancelled"}

    # ---- conversations --------------------------------------------------------------
    async def create_conversation(self, tenant: TenantSpec, body: Any) -> dict[str, Any]:
        req = parse_conversation_create(body)
        now = _now()
        conv = StoredConversation(
            id="conv_" + uuid.uuid4().hex,
            tenant=tenant.name,
            created_at=now,
            expires_at=expiry(now, tenant.retention.conversations_days),
            metadata=dict(req.metadata or {}),
        )
        await self.conversations.create(conv, req.stored_items())
        return conversation_object(conv.id, int(now.timestamp()), conv.metadata)

    async def _conversation(self, tenant: TenantSpec, conv_id: str) -> StoredConversation:
        conv = await self.conversations.get(tenant.name, conv_id, _now())
        if conv is None:
            raise not_found("Conversation", conv_id)
        return conv

    async def get_conversation(self, tenant: TenantSpec, conv_id: str) -> dict[str, Any]:
        conv = await self._conversation(tenant, conv_id)
        return conversation_object(conv.id, int(conv.created_at.timestamp()), conv.metadata)

    async def update_conversation(
        self, tenant: TenantSpec, conv_id: str, body: Any
    ) -> dict[str, Any]:
        req = parse_conversation_update(body)
        conv = await self.conversations.update_metadata(
            tenant.name, conv_id, dict(req.metadata), _now()
        )
        if conv is None:
            raise not_found("Conversation", conv_id)
        return conversation_object(conv.id, int(conv.created_at.timestamp()), conv.metadata)

    async def delete_conversation(self, tenant: TenantSpec, conv_id: str) -> dict[str, Any]:
        if not await self.conversations.delete(tenant.name, conv_id):
            raise not_found("Conversation", conv_id)
        return conversation_deleted(conv_id)

    async def add_items(self, tenant: TenantSpec, conv_id: str, body: Any) -> dict[str, Any]:
        req = parse_items_create(body)
        items = req.stored_items()
        if not await self.conversations.add_items(tenant.name, conv_id, items, _now()):
            raise not_found("Conversation", conv_id)
        return item_list([i.item for i in items], False)

    async def list_items(
        self, tenant: TenantSpec, conv_id: str, query: Mapping[str, str]
    ) -> dict[str, Any]:
        params = parse_list_params(query)
        try:
            result = await self.conversations.list_items(
                tenant.name, conv_id, _now(), params.after, params.limit, params.order
            )
        except UnknownCursorError:
            raise _bad_cursor(params.after) from None
        if result is None:
            raise not_found("Conversation", conv_id)
        return _list(result)

    async def get_item(self, tenant: TenantSpec, conv_id: str, item_id: str) -> dict[str, Any]:
        await self._conversation(tenant, conv_id)
        item = await self.conversations.get_item(tenant.name, conv_id, item_id, _now())
        if item is None:
            raise not_found("Item", item_id)
        return item.item

    async def delete_item(
        self, tenant: TenantSpec, conv_id: str, item_id: str
    ) -> dict[str, Any]:
        conv = await self._conversation(tenant, conv_id)
        if not await self.conversations.delete_item(tenant.name, conv_id, item_id, _now()):
            raise not_found("Item", item_id)
        return conversation_object(conv.id, int(conv.created_at.timestamp()), conv.metadata)


def _now() -> datetime:
    return datetime.now(UTC)
