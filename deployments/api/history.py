"""A Responses turn's context: the stored history it continues, plus its new input.

The history comes from the state store, read once per request: the whole
`previous_response_id` chain in one query, or a conversation's items. It is rendered
through the model's chat template with this turn's `instructions` first (they are not
carried over, as at OpenAI), then every stored item in order, then the new input. A
stored reply carries the ids the model sampled, so the rendered history is token for
token the prompt the replica already holds in its prefix cache.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime

from deployments.api.errors import OpenAIError
from deployments.api.responses_protocol import ResponsesRequest, message_item
from deployments.state.conversations import ConversationStore
from deployments.state.responses import ResponseStore
from deployments.state.stored import BrokenChainError, StoredItem

# Roles the chat template knows; OpenAI's "developer" is the system prompt of newer models.
TEMPLATE_ROLE = {"developer": "system"}


def new_item_id() -> str:
    return "msg_" + uuid.uuid4().hex


def not_found(kind: str, object_id: str, param: str | None = None) -> OpenAIError:
    """The same 404 for an id that never existed, expired, or is another tenant's."""
    return OpenAIError(404, f"{kind} with id '{object_id}' not found.", param=param)


@dataclass(frozen=True)
class Turn:
    messages: list[dict[str, str]]  # what the chat template renders
    sampled: dict[int, list[int]]  # message index -> the ids the model sampled for it
    input_items: list[StoredItem]  # this turn's new input, as stored items
    affinity_replica: str | None = None  # the replica that served the previous turn
    history_items: list[StoredItem] = field(default_factory=list)


def item_text(item: StoredItem) -> tuple[str, str]:
    """(role, text) of a stored message item: its text parts joined."""
    body = item.item
    parts = body.get("content") or []
    text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
    return str(body.get("role", "user")), text


def render(
    instructions: str | None, history: list[StoredItem], new: list[StoredItem]
) -> tuple[list[dict[str, str]], dict[int, list[int]]]:
    messages: list[dict[str, str]] = []
    sampled: dict[int, list[int]] = {}
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in [*history, *new]:
        role, text = item_text(item)
        if item.token_ids is not None and role == "assistant":
            sampled[len(messages)] = list(item.token_ids)
        messages.append({"role": TEMPLATE_ROLE.get(role, role), "content": text})
    return messages, sampled


def input_items(req: ResponsesRequest) -> list[StoredItem]:
    return [
        StoredItem(item_id, message_item(item_id, m.role, m.text, output=m.role == "assistant"))
        for m in req.messages()
        for item_id in (new_item_id(),)
    ]


async def load_turn(
    req: ResponsesRequest,
    tenant: str,
    responses: ResponseStore,
    conversations: ConversationStore,
    now: datetime,
) -> Turn:
    """The history this request continues; 404 for an id the tenant cannot see."""
    history: list[StoredItem] = []
    affinity = None
    if req.previous_response_id is not None:
        try:
            chain = await responses.chain(tenant, req.previous_response_id, now)
        except BrokenChainError as exc:
            raise OpenAIError(
                400,
                f"Response '{exc.missing_id}', part of the history of "
                f"'{req.previous_response_id}', was deleted or has expired, so this chain "
                "can no longer be continued. Start a new response or a conversation.",
                param="previous_response_id",
                code="previous_response_not_found",
            ) from None
        if chain is None:
            raise not_found("Previous response", req.previous_response_id,
                            "previous_response_id")
        last = chain[-1]
        if last.status == "in_progress":
            raise OpenAIError(
                400, f"Response '{last.id}' is still in progress; continue from it once it "
                "has completed.", param="previous_response_id",
            )
        for stored in chain:
            history += stored.input_items + stored.output_items
        affinity = last.replica_id
    elif req.conversation_id is not None:
        items = await conversations.all_items(tenant, req.conversation_id, now)
        if items is None:
            raise not_found("Conversation", req.conversation_id, "conversation")
        history = items
        affinity = await responses.latest_replica(tenant, req.conversation_id, now)
    new = input_items(req)
    messages, sampled = render(req.instructions, history, new)
    return Turn(messages, sampled, new, affinity, history)
