"""OpenAI's Conversation object, item lists (and their cursor query), deleted receipts.

Shapes follow openai.types.conversations (Conversation, ConversationItemList,
ConversationDeletedResource) and openai.types.responses.ResponseItemList; the tests
validate each against those types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from deployments.api.errors import OpenAIError

LIST_LIMIT_DEFAULT, LIST_LIMIT_MAX = 20, 100


def conversation_object(
    conversation_id: str, created_at: int, metadata: Mapping[str, str] | None
) -> dict[str, Any]:
    return {
        "id": conversation_id,
        "object": "conversation",
        "created_at": created_at,
        "metadata": dict(metadata or {}),
    }


def conversation_deleted(conversation_id: str) -> dict[str, Any]:
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


def response_deleted(response_id: str) -> dict[str, Any]:
    """OpenAI answers DELETE /v1/responses/{id} with this receipt (the SDK returns None)."""
    return {"id": response_id, "object": "response.deleted", "deleted": True}


def item_list(items: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A page of items, as both conversation items and a response's input_items are
    listed. OpenAI's schema types first_id/last_id as strings; an empty page has no
    items to name, so they are null there (the SDK's client parses them leniently)."""
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


@dataclass(frozen=True)
class ListParams:
    """The cursor query of item lists: GET .../items and .../input_items."""

    after: str | None = None
    limit: int = LIST_LIMIT_DEFAULT
    order: Literal["asc", "desc"] = "desc"


def parse_list_params(query: Mapping[str, str]) -> ListParams:
    """Query parameters -> ListParams; a bad value is a 400 naming it. Other parameters
    are ignored, as HTTP APIs do; `include` (the SDK sends `include[]`) is refused."""
    if "include" in query or "include[]" in query:
        raise OpenAIError(
            400, "'include' is not supported by this server", param="include",
            code="unsupported_parameter",
        )  # fmt: skip
    after = query.get("after")
    if after is not None and not after:
        raise OpenAIError(400, "Invalid value for 'after': empty.", param="after")
    raw = query.get("limit")
    limit = LIST_LIMIT_DEFAULT
    if raw is not None:
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= LIST_LIMIT_MAX:
            raise OpenAIError(
                400,
                f"Invalid value for 'limit': {raw!r}; expected an integer from 1 to "
                f"{LIST_LIMIT_MAX}.",
                param="limit",
                code="invalid_value",
            )
        limit = int(raw)
    order = query.get("order", "desc")
    if order == "asc":
        return ListParams(after, limit, "asc")
    if order == "desc":
        return ListParams(after, limit, "desc")
    raise OpenAIError(
        400, f"Invalid value for 'order': {order!r}; expected 'asc' or 'desc'.",
        param="order", code="invalid_value",
    )  # fmt: skip
