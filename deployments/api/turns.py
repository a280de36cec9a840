"""`POST /v1/responses`: a stateful turn from its stored history to its saved result.

Order: the history (one store read), the prompt through the chat template, admission
(as for chat: tier, spill, fair queue, limits; TPM counts the full input), the row
`in_progress` (store: true), generation on the replica that served the previous turn,
then the saved row and conversation items before the last event reaches the client.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from fastapi.responses import Response
from ray.serve.handle import DeploymentHandle

from deployments.api.completions import Served
from deployments.api.conversations import expiry
from deployments.api.errors import OpenAIError, state_unavailable
from deployments.api.history import Turn, load_turn
from deployments.api.prompts import Prompt, ServedModel
from deployments.api.response_objects import ResponseDraft, response_object
from deployments.api.response_run import ResponseRun, respond_response
from deployments.api.responses_protocol import ResponsesRequest, message_item
from deployments.api.upkeep import Upkeep
from deployments.config.tenants import TenantSpec
from deployments.config.tiered import TieredConfig
from deployments.state.conversations import ConversationStore
from deployments.state.errors import StateError
from deployments.state.responses import ResponseStore
from deployments.state.stored import StoredItem, StoredResponse

RESPONSE_ID_PREFIX = "resp_"


class Dispatched(NamedTuple):
    served: Served
    handle: DeploymentHandle
    headers: dict[str, str]


# (prompt, service_tier, claim id, request id, affinity replica) -> the admitted job
Dispatch = Callable[[Prompt, str | None, str, str, str | None], Awaitable[Dispatched]]


@dataclass
class TurnService:
    config: TieredConfig
    responses: ResponseStore
    conversations: ConversationStore
    upkeep: Upkeep

    async def serve(
        self, tenant: TenantSpec, model: ServedModel, req: ResponsesRequest, dispatch: Dispatch
    ) -> Response:
        now = datetime.now(UTC)
        try:
            turn = await load_turn(req, tenant.name, self.responses, self.conversations, now)
        except StateError:
            raise state_unavailable() from None
        prompt = await asyncio.to_thread(  # off the loop, as in Ingress._serve
            model.turn_prompt,
            turn.messages, turn.sampled, req.max_output_tokens, req.sampling(),
            self.config.ingress.default_max_tokens,
        )
        claim_id = uuid.uuid4().hex
        response_id = RESPONSE_ID_PREFIX + claim_id
        served, handle, headers = await dispatch(
            prompt, req.service_tier, claim_id, response_id, turn.affinity_replica
        )
        draft = ResponseDraft(
            id=response_id, created_at=int(now.timestamp()), model=model.name,
            message_id="msg_" + uuid.uuid4().hex, instructions=req.instructions,
            previous_response_id=req.previous_response_id,
            conversation_id=req.conversation_id, store=req.store,
            service_tier=served.tier, metadata=dict(req.metadata or {}),
            temperature=prompt.params.temperature, top_p=prompt.params.top_p,
            max_output_tokens=req.max_output_tokens, user=req.user,
        )
        if req.store:
            try:
                await self.responses.create(StoredResponse(
                    id=response_id, tenant=tenant.name, model=model.name, status="in_progress",
                    created_at=now, expires_at=expiry(now, tenant.retention.responses_days),
                    previous_response_id=req.previous_response_id,
                    conversation_id=req.conversation_id, body=response_object(draft),
                    input_items=turn.input_items, output_items=[], replica_id=None,
                ))
            except StateError:
                await served.close("error")  # nothing generated: the claim goes back
                raise state_unavailable() from None
        run = ResponseRun(
            served, draft, model.tokenizer.eos_token_ids, self._saver(tenant, turn),
            cancelled=self.upkeep.track(response_id),
        )
        try:
            return await respond_response(run, handle, req.stream, headers)
        except OpenAIError as exc:
            exc.headers = {**headers, **exc.headers}
            raise
        finally:
            if not req.stream:
                self.upkeep.untrack(response_id)

    def _saver(self, tenant: TenantSpec, turn: Turn) -> Callable[[ResponseRun], Awaitable[None]]:
        """How a finished turn is kept: its row (store: true) and, in a conversation, the
        new input and output appended (completed or incomplete turns only)."""

        async def save(run: ResponseRun) -> None:
            self.upkeep.untrack(run.draft.id)
            draft = run.draft
            output: list[StoredItem] = []
            if draft.status in ("completed", "incomplete", "cancelled"):
                item = message_item(draft.message_id, "assistant", draft.text, output=True)
                output = [StoredItem(draft.message_id, item, list(run.token_ids))]
            if draft.store:
                await self.responses.complete(
                    tenant.name, draft.id, status=draft.status, body=response_object(draft),
                    output_items=output, replica_id=run.replica_id,
                )
            if draft.conversation_id and draft.status in ("completed", "incomplete"):
                await self.conversations.add_items(
                    tenant.name, draft.conversation_id, [*turn.input_items, *output],
                    datetime.now(UTC),
                )

        return save
