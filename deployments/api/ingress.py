"""The OpenAI-compatible ingress: auth, validation, admission, tier choice, dispatch.

Order per request: key → tenant; strict body validation; prompt rendering and token count;
rate limits (reserve prompt + max_tokens); tier (the tenant's dedicated copy, else spill to
the shared pool or 429); the shared pool's fair queue; stream from a model-server replica;
settle tokens, release the slot and meter usage when the stream closes, however it closes.
"""

import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve

from deployments.api.claims import AdmittedRequest, ClosingStreamingResponse
from deployments.api.errors import (
    OpenAIError,
    bearer_token,
    from_engine_error,
    install_error_handlers,
    rate_limited,
)
from deployments.api.protocol import ChatCompletionRequest, CompletionRequest
from deployments.api.responses import SSE_DONE, ResponseBuilder, sse
from deployments.config.models import initial_replicas
from deployments.config.tenants import TenantSpec
from deployments.config.tiered import TieredConfig
from deployments.observability.admission import pool_facts
from deployments.observability.requests import (
    RequestMetricsMiddleware,
    RequestTimer,
    rejection_reason,
)
from deployments.tenancy.admission import admission_actor_name, get_admission
from deployments.tenancy.keys import KeyRing, external_keys
from models.default_model import resolve_model_path
from models.errors import InvalidRequestError
from models.outputs import Usage
from models.sampling_params import SamplingParams
from models.tokenizer import Tokenizer

log = logging.getLogger(__name__)
TIER_HEADER = "x-tiered-service-tier"
REPLICA_HEADER = "x-tiered-replica"

app = FastAPI(title="Tiered", version="0.1.0", description="OpenAI-compatible multi-tenant API")
install_error_handlers(app)
app.add_middleware(RequestMetricsMiddleware)


@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, shared: dict[str, Any], dedicated: dict[str, Any]) -> None:
        self.config = TieredConfig.model_validate(config)
        self.shared = shared
        self.dedicated = dedicated
        extra = external_keys()
        self.keys = KeyRing(
            {t.name: t.api_key_hashes + extra.get(t.name, []) for t in self.config.tenants},
            self.config.revoked_key_hashes,
        )
        self.admin_keys = KeyRing(
            {"admin": self.config.admin_key_hashes + extra.get("admin", [])},
            self.config.revoked_key_hashes,
        )
        self.tokenizers: dict[str, Tokenizer] = {}
        self.context: dict[str, int] = {}
        for m in self.config.models:
            path = resolve_model_path(m.path)
            self.tokenizers[m.name] = Tokenizer.from_pretrained(path)
            max_pos = json.loads((path / "config.json").read_text())["max_position_embeddings"]
            self.context[m.name] = min(m.engine.max_model_len or max_pos, max_pos)
        pools = {
            m.name: initial_replicas(m.shared_pool) * m.engine.max_num_seqs
            for m in self.config.models
        }
        dedicated_caps = {
            t.name: t.dedicated.reserved_replicas
            * self.config.model(t.dedicated.model).engine.max_num_seqs  # type: ignore[union-attr]
            for t in self.config.tenants
            if t.dedicated
        }
        self.owner = serve.get_replica_context().replica_id.unique_id
        self.admission = get_admission(
            admission_actor_name(config),
            pools,
            dedicated_caps,
            self.config.dispatch.max_queue_len,
            pool_facts(self.config),
        )

    async def check_health(self) -> None:
        """Serve's periodic health check doubles as this replica's heartbeat to the
        admission actor, which frees the seats of replicas that stop reporting."""
        self.admission.ingress_heartbeat.remote(self.owner)

    # ---- plain endpoints ------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        tenant = self._authenticate(request)
        data = [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "tiered"}
            for m in self.config.models
            if tenant.may_use(m.name)
        ]
        return {"object": "list", "data": data}

    @app.get("/admin/usage")
    async def usage(self, request: Request) -> dict:
        token = bearer_token(request)
        if self.admin_keys.tenant_for(token) is None:
            if self.keys.tenant_for(token) is not None:
                raise OpenAIError(403, "this endpoint needs an admin key", code="forbidden")
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return await self.admission.snapshot.remote()

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):  # type: ignore[no-untyped-def]
        return await self._complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request):  # type: ignore[no-untyped-def]
        return await self._complete(request, "completion")

    # ---- the request path -----------------------------------------------------------
    def _authenticate(self, request: Request) -> TenantSpec:
        token = bearer_token(request)
        name = self.keys.tenant_for(token)
        if name is None:
            message = (
                "Incorrect API key provided." if token else "You didn't provide an API key."
            )
            raise OpenAIError(401, message, code="invalid_api_key")
        tenant = self.config.tenant(name)
        assert tenant is not None
        return tenant

    async def _read_body(self, request: Request, kind: str):  # type: ignore[no-untyped-def]
        limit = self.config.ingress.max_body_bytes
        if int(request.headers.get("content-length") or 0) > limit:
            raise OpenAIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise OpenAIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OpenAIError(400, "We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        schema = ChatCompletionRequest if kind == "chat" else CompletionRequest
        try:
            parsed = schema.model_validate(body)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            if first["type"] == "extra_forbidden":
                raise OpenAIError(
                    400, f"Unrecognized request argument supplied: {param}", param=param
                ) from None
            raise OpenAIError(
                400, f"Invalid value for '{param}': {first['msg']}", param=param
            ) from None
        parsed.refuse_unsupported()
        return parsed

    async def _complete(self, request: Request, kind: str):  # type: ignore[no-untyped-def]
        """The request path, with its labels left in request.state for the metrics."""
        timer = RequestTimer(model="unknown")
        try:
            return await self._serve(request, kind, timer)
        except OpenAIError as exc:
            if exc.status == 429:
                request.state.reject_reason = rejection_reason(exc.code)
                if exc.code == "dedicated_capacity_exceeded":
                    request.state.tier = "dedicated"
            raise

    async def _serve(self, request: Request, kind: str, timer: RequestTimer):  # type: ignore[no-untyped-def]
        # Serve already answers with x-request-id; reuse its id so logs and body agree.
        serve_id = serve.context._get_serve_request_context().request_id or uuid.uuid4().hex
        request_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + serve_id
        tenant = self._authenticate(request)
        request.state.tenant = tenant.name
        req = await self._read_body(request, kind)
        model = self.config.model(req.model)
        if model is not None:
            request.state.model = timer.model = model.name
        if model is None:
            raise OpenAIError(
                404,
                f"The model '{req.model}' does not exist",
                param="model",
                code="model_not_found",
            )
        if not tenant.may_use(model.name):
            raise OpenAIError(
                403,
                f"tenant '{tenant.name}' may not use model '{model.name}'",
                param="model",
                code="model_not_allowed",
            )
        prompt_ids = self._prompt_ids(req, kind, model.name)
        context = self.context[model.name]
        room = context - len(prompt_ids)
        max_tokens = req.requested_max_tokens() or min(self.config.ingress.default_max_tokens, room)
        if max_tokens > room or room <= 0:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the "
                f"prompt, {max_tokens} in the completion).",
                param="messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        try:
            sampling = req.sampling(max_tokens, req.logprobs_k())
            SamplingParams(**sampling)
        except InvalidRequestError as exc:
            raise OpenAIError(400, exc.message, param=exc.param, code=exc.code) from None
        cost = len(prompt_ids) + max_tokens * req.n
        limits = {"rpm": tenant.rpm, "tpm": tenant.tpm, "max_concurrency": tenant.max_concurrency}
        decision = await self.admission.reserve.remote(tenant.name, cost, limits)
        if not decision["allowed"]:
            raise rate_limited(
                decision, f"Rate limit reached for tenant '{tenant.name}' ({decision['reason']})."
            )
        ratelimit_headers = decision["headers"]
        admitted = AdmittedRequest(self.admission, decision["reservation_id"])
        try:
            tier, spill, handle, band = await self._choose_tier(
                tenant, req, model.name, cost, admitted
            )
            job = {
                "request_id": request_id,
                "prompt": prompt_ids,
                "params": sampling,
                "priority": band,
                "cache_salt": tenant.name,
            }
            meta = {"tenant": tenant.name, "model": model.name, "tier": tier, "spill": spill}
            timer.serving(tenant.name, tier, spill)
            request.state.tier = timer.tier
            return await self._respond(
                req, kind, handle, job, meta, admitted, ratelimit_headers, timer
            )
        except BaseException as exc:
            await admitted.close()
            if isinstance(exc, OpenAIError):
                exc.headers = {**ratelimit_headers, **exc.headers}
            raise

    def _prompt_ids(self, req, kind: str, model: str) -> list[int]:  # type: ignore[no-untyped-def]
        tok = self.tokenizers[model]
        try:
            if kind == "chat":
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                return tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
            prompt = req.single_prompt()
        except InvalidRequestError as exc:
            raise OpenAIError(400, exc.message, param=exc.param) from None
        if isinstance(prompt, str):
            return tok.encode(prompt)
        bad = [t for t in prompt if not 0 <= t < tok.vocab_size]
        if bad:
            raise OpenAIError(400, f"token id {bad[0]} is outside the vocabulary", param="prompt")
        return list(prompt)

    async def _choose_tier(self, tenant: TenantSpec, req, model: str, cost: int, admitted):  # type: ignore[no-untyped-def]
        """(tier, spill, handle, band): dedicated first unless asked for 'default'."""
        spill = False
        ded = tenant.dedicated
        if ded is not None and ded.model == model and req.service_tier != "default":
            admitted.slot_pending = True
            got = await self.admission.try_dedicated.remote(
                tenant.name, admitted.ticket, self.owner
            )
            admitted.slot_pending = False
            if got:
                return "dedicated", False, self.dedicated[tenant.name], tenant.priority
            if not ded.spill:
                raise OpenAIError(
                    429,
                    f"The dedicated capacity of tenant '{tenant.name}' is saturated and "
                    "spillover is disabled.",
                    code="dedicated_capacity_exceeded",
                    headers={"retry-after": "1", "retry-after-ms": "1000"},
                )
            spill = True
        if model not in self.shared:
            raise OpenAIError(
                503,
                f"model '{model}' has no shared pool",
                code="no_shared_pool",
                headers={"retry-after": "1", "retry-after-ms": "1000"},
            )
        band = 0 if spill else tenant.priority  # spilled traffic runs at shared priority
        admitted.slot_pending = True
        result = await self.admission.acquire_shared.remote(
            model,
            tenant.name,
            band,
            tenant.weight,
            cost,
            self.config.dispatch.queue_deadline_s,
            admitted.ticket,
            self.owner,
        )
        admitted.slot_pending = False
        if result["ticket"] is None:
            raise rate_limited(result, "The shared pool is saturated; retry later.")
        return "shared", spill, self.shared[model], band

    async def _respond(self, req, kind, handle, job, meta, admitted, headers, timer):  # type: ignore[no-untyped-def]
        stream = handle.options(stream=True).generate.remote(job)
        builder = ResponseBuilder(kind, job["request_id"], meta["model"], meta["tier"], req.n)
        state = {"usage": Usage()}

        async def close() -> None:
            usage: Usage = state["usage"]
            record = {
                "tenant": meta["tenant"],
                "model": meta["model"],
                "tier": meta["tier"],
                "spill": meta["spill"],
                "prompt_tokens": usage.prompt_tokens,
                "cached_tokens": usage.cached_tokens,
                "completion_tokens": usage.completion_tokens,
            }
            if not admitted.closed:
                timer.finish(usage)
            await admitted.close(usage, record if usage.prompt_tokens else None)

        try:
            first = await stream.__anext__()
            timer.output()
        except BaseException as exc:
            stream.cancel()
            mapped = from_engine_error(exc)
            if mapped is None:
                raise
            raise mapped from None
        headers = {**headers, TIER_HEADER: meta["tier"], REPLICA_HEADER: first.replica_id}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            body = self._sse(first, stream, builder, state, include_usage, close, timer)
            return ClosingStreamingResponse(body, media_type="text/event-stream", headers=headers)
        try:
            served = first
            while True:
                for delta in served.output.deltas:
                    builder.add(delta)
                state["usage"] = builder.usage = served.output.usage
                if served.output.finished:
                    break
                served = await stream.__anext__()
                timer.output()
        finally:
            stream.cancel()
            await close()
        return JSONResponse(builder.body(), headers=headers)

    async def _sse(  # type: ignore[no-untyped-def]
        self, first, stream, builder, state, include_usage, close, timer
    ) -> AsyncIterator[str]:
        started: set[int] = set()
        offsets: dict[int, int] = {}
        served = first
        try:
            while True:
                choices = []
                for delta in served.output.deltas:
                    choices.append(
                        builder.chunk_choice(
                            delta, delta.index not in started, offsets.get(delta.index, 0)
                        )
                    )
                    started.add(delta.index)
                    offsets[delta.index] = offsets.get(delta.index, 0) + len(delta.text)
                state["usage"] = builder.usage = served.output.usage
                yield builder.chunk(choices, include_usage)
                if served.output.finished:
                    break
                served = await stream.__anext__()
                timer.output()
            if include_usage:
                yield builder.usage_chunk()
            yield SSE_DONE
        except Exception as exc:  # the replica failed mid-stream: end with an error event
            mapped = from_engine_error(exc) or OpenAIError(503, "the model server failed")
            error = {"message": mapped.message, "type": "server_error", "code": mapped.code}
            yield sse({"error": {**error, "param": None}})
        finally:
            stream.cancel()
            await close()
