"""The OpenAI-compatible ingress: routes, auth, validation, one admission call, dispatch.

Order per request: key -> tenant; a tenant already over its limits is refused here from
the last decision (no body parsing, no tokenization, no actor call); strict body
validation; prompt rendering and token count; one `admit` (rate limits, tier, fair
queue); stream from the replica admission chose; one `finish` with the usage, however
the request ends. A `model` naming a LoRA adapter resolves through the registry
(deployments.api.catalog) and runs on its base model's deployments.
"""

# No `from __future__ import annotations` here: serve.ingress re-creates the route methods
# elsewhere, where FastAPI could not resolve string annotations such as `Request`.
import asyncio
import time
import uuid
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.api.adapters import AdapterAdmin
from deployments.api.admin import require_admin, usage_report
from deployments.api.auth import authenticate, bearer, json_body
from deployments.api.catalog import ModelCatalog, check_allowed
from deployments.api.completions import Served, respond
from deployments.api.conversations import StatefulReads
from deployments.api.errors import (
    OpenAIError,
    install_error_handlers,
    set_body_limit,
)
from deployments.api.files import FilesApi
from deployments.api.finetune_routes import FineTuningRoutes
from deployments.api.finetune_routes import router as fine_tuning_router
from deployments.api.front_door import main_app_handles
from deployments.api.jobs import JobsApi
from deployments.api.limits import (
    admission_unavailable,
    ratelimit_headers,
    refusal_error,
    rejection_reason,
)
from deployments.api.load_shedding import LoadShedding, set_shed_deadline
from deployments.api.prompts import Prompt, ServedModel
from deployments.api.protocol import OpenAIRequest, parse_request
from deployments.api.responses import ResponseBuilder
from deployments.api.responses_protocol import parse_responses_request
from deployments.api.seating import Seating
from deployments.api.stateful_routes import StatefulRoutes
from deployments.api.stateful_routes import router as stateful_router
from deployments.api.tokenizers import load_served_models
from deployments.api.turns import RESPONSE_ID_PREFIX, Dispatched, TurnService
from deployments.api.upkeep import Upkeep
from deployments.config.tenants import TenantSpec
from deployments.config.tiered import TieredConfig
from deployments.observability.requests import RequestMetricsMiddleware, RequestTimer
from deployments.replicas.requests import GenerateRequest
from deployments.state.config import resolve_state_spec
from deployments.state.conversations import ConversationStore
from deployments.state.jobs import JobStore
from deployments.state.ledger import Ledger
from deployments.state.responses import ResponseStore
from deployments.state.store import StateStore
from deployments.tenancy.client import AdmissionUnavailable
from deployments.tenancy.key_source import KeySource
from deployments.tenancy.keys import KeyRings
from deployments.tenancy.policy import admission_config, admission_shards
from deployments.tenancy.shards import ShardedAdmission
from deployments.tenancy.types import Admission, AdmissionRequest, UsageRecord

INGRESS_HEADER = "x-tiered-ingress"
DRAIN_TIMEOUT_S = 10.0  # a stopping replica waits this long for its usage to be committed

app = FastAPI(title="Tiered", version="0.1.0", description="OpenAI-compatible multi-tenant API")
install_error_handlers(app)
app.add_middleware(LoadShedding, key=app.title)  # outside the body limit, inside the metrics
app.add_middleware(RequestMetricsMiddleware)
app.include_router(fine_tuning_router)  # the Files API (FineTuningRoutes, below)
app.include_router(stateful_router)  # stored responses and conversations (StatefulRoutes)


# Helpers sit above the class: serve.ingress captures what the class refers to when it
# is decorated.
def _include_usage(req: OpenAIRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


@serve.ingress(app)
class Ingress(FineTuningRoutes, StatefulRoutes):
    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__
        self,
        config: dict,
        handles: dict[str, DeploymentHandle],
        fine_tuning: DeploymentHandle | None = None,
        door: str | None = None,
        main_app: str | None = None,
    ) -> None:
        """`door`: this is that tenant's own front door (deployments.api.front_door),
        beside the main application `main_app`, whose model servers it calls by name."""
        self.config = TieredConfig.model_validate(config)
        # Warns of tenants without a key; a front door takes its own tenant's keys only.
        self.key_source = KeySource(self.config, door=door)
        context = serve.get_replica_context()
        main_app = main_app or context.app_name
        if door is not None:
            handles = await main_app_handles(self.config, main_app)
        self.handles = handles  # pool key (deployments.config.plan) -> its deployment
        # Tokenizers from the replicas (or a named artifact): never the checkpoint here.
        self.models = await load_served_models(self.config, handles)
        self.owner = context.replica_id.unique_id
        self.actor_name = context.replica_id.to_full_id_str()  # model servers watch it
        now = time.time()
        shards = [door] if door is not None else admission_shards(self.config)
        self.admission = ShardedAdmission(
            main_app,
            {None: admission_config(self.config, now)}
            | {s: admission_config(self.config, now, s) for s in shards},
            self.owner,
        )
        await self.admission.start()
        # The admission actor migrates and writes the ledger; this replica reads the
        # ledger and reads and writes stored responses. Connects on first use.
        self.store = StateStore.connect(resolve_state_spec(self.config.state))
        self.ledger = Ledger(self.store)
        self.responses = ResponseStore(self.store)
        self.conversations = ConversationStore(self.store)
        self.reads = StatefulReads(self.responses, self.conversations)
        # A response in progress longer than ten request timeouts lost its ingress.
        stale_after_s = self.config.ingress.request_timeout_s * 10
        self.upkeep = Upkeep(self.responses, self.conversations, stale_after_s)
        self.upkeep.start()
        self.turns = TurnService(self.config, self.responses, self.conversations, self.upkeep)
        self.catalog = ModelCatalog(self.config, self.models, self.store)
        self.adapters = AdapterAdmin(self.catalog, handles, self.config.ingress.request_timeout_s)
        self.files = FilesApi(self.store, self.config.files, self.catalog.prepare)
        self.fine_tuning = fine_tuning  # the runner (deployments.training.runner)
        self.jobs = JobsApi(self.catalog, JobStore(self.store), self.files, self._wake_runner)
        set_body_limit(
            app,
            self.config.ingress.max_body_bytes,
            {"/v1/files": max(self.files.upload_body_limit, self.config.ingress.max_body_bytes)},
        )
        set_shed_deadline(app, self.config.ingress.shed_loop_lag_ms / 1000)

    @property
    def keys(self) -> KeyRings:
        """The API keys, re-read when the mounted key file changes."""
        return self.key_source.current()

    async def __del__(self) -> None:
        """Serve calls this when the replica stops (scale-down, redeploy, shutdown):
        every usage record this replica holds reaches the database first."""
        await self.upkeep.stop()
        await self.admission.drain(DRAIN_TIMEOUT_S)
        await self.store.close()

    async def check_health(self) -> None:
        """Serve's periodic health check doubles as this replica's heartbeat to the
        admission actor. Admission trouble never fails it: the replica holds claims."""
        await self.admission.heartbeat()

    def _wake_runner(self) -> None:
        """The runner reads the jobs on its own every poll interval; this is sooner."""
        if self.fine_tuning is not None:
            self.fine_tuning.wake.remote()

    # ---- plain endpoints ------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok" if self.admission.available else "degraded"}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        """Base models, then LoRA adapters (with `parent`), that this tenant may use."""
        return {"object": "list", "data": await self.catalog.listed(self._authenticate(request))}

    @app.get("/admin/usage")
    async def usage(self, request: Request) -> dict[str, Any]:
        """Billing aggregates from the ledger, priced (deployments.state.report)."""
        require_admin(self.keys, bearer(request))
        return await usage_report(self.ledger, self.config.prices, dict(request.query_params))

    @app.get("/admin/state")
    async def state(self, request: Request) -> dict[str, Any]:
        """The admission actor's seats and queues, live (not billing data)."""
        require_admin(self.keys, bearer(request))
        try:
            return await self.admission.state()
        except AdmissionUnavailable:
            raise admission_unavailable() from None

    # ---- LoRA adapters, hot-loaded by an admin (deployments.api.adapters) -------------
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> dict[str, Any]:
        require_admin(self.keys, bearer(request))
        return await self.adapters.load(await json_body(request))

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request) -> dict[str, Any]:
        require_admin(self.keys, bearer(request))
        return await self.adapters.unload(await json_body(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "completion")

    # ---- the stateful API (deployments.api.history, response_run, conversations) -----
    @app.post("/v1/responses")
    async def create_response(self, request: Request) -> Response:
        return await self._complete(request, "response")

    # ---- the request path -----------------------------------------------------------
    def _authenticate(self, request: Request) -> TenantSpec:
        return authenticate(self.keys, self.config, request)

    async def _complete(self, request: Request, kind: str) -> Response:
        """Every answer names the ingress replica that gave it (x-tiered-ingress)."""
        try:
            response = await self._serve(request, kind)
        except OpenAIError as exc:
            exc.headers[INGRESS_HEADER] = self.owner
            raise
        response.headers[INGRESS_HEADER] = self.owner
        return response

    async def _serve(self, request: Request, kind: str) -> Response:
        """The request path, with its labels left in request.state for the metrics."""
        tenant = self._authenticate(request)
        request.state.tenant = tenant.name
        blocked = self.admission.blocked(tenant.name)
        if blocked is not None:  # still over its limits: answered from the last decision
            raise self._refused(request, blocked, tenant)
        timer = RequestTimer(model="unknown")
        parsed = await json_body(request)
        if kind == "response":
            turn = parse_responses_request(parsed)
            model = await self._model(request, tenant, turn.model, timer)
            await self._stored(self.catalog.prepare())
            return await self.turns.serve(
                tenant, model, turn, partial(self._dispatch, request, tenant, model, timer)
            )
        req = parse_request("chat" if kind == "chat" else "completion", parsed)
        model = await self._model(request, tenant, req.model, timer)
        # Off the loop: a long prompt takes a while to tokenize (Tokenizer lets go of
        # the GIL), and the loop serves everyone else's requests and streams meanwhile.
        prompt = await asyncio.to_thread(model.prompt, req, self.config.ingress.default_max_tokens)
        claim_id = uuid.uuid4().hex
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        served, handle, headers = await self._dispatch(
            request, tenant, model, timer, prompt, req.service_tier, claim_id, prefix + claim_id
        )
        builder = ResponseBuilder(kind, served.job.request_id, model.name, served.tier, req.n)
        try:
            return await respond(
                served, builder, handle, bool(req.stream), _include_usage(req), headers
            )
        except OpenAIError as exc:
            exc.headers = {**headers, **exc.headers}
            raise

    async def _model(
        self, request: Request, tenant: TenantSpec, name: str, timer: RequestTimer
    ) -> ServedModel:
        """A base model or an adapter; metrics label both by the base model."""
        model = await self.catalog.resolve(tenant, name)
        request.state.model = timer.model = model.base
        check_allowed(tenant, model)
        return model

    async def _dispatch(
        self,
        request: Request,
        tenant: TenantSpec,
        model: ServedModel,
        timer: RequestTimer,
        prompt: Prompt,
        service_tier: str | None,
        claim_id: str,
        request_id: str,
        affinity_replica: str | None = None,
    ) -> Dispatched:
        """One admission decision, then the job for the pool it chose. A stateful turn
        names the replica that served its previous turn and asks that its blocks be kept
        ahead of others in eviction (its next turn will want them)."""
        admission = await self._admit(
            request,
            tenant,
            AdmissionRequest(
                claim_id=claim_id,
                tenant=tenant.name,
                model=model.base,
                cost=prompt.cost,
                prefer_dedicated=service_tier != "default",
                owner=self.owner,
            ),
        )
        seating = Seating(self.admission, self.handles, request, timer, claim_id, tenant.name,
                          model.base, admission)
        seating.seated()
        job = seating.job(GenerateRequest(
            request_id=request_id,
            prompt=prompt.token_ids,
            params=prompt.params,
            cache_salt=tenant.name,
            affinity_replica=affinity_replica,
            retain=request_id.startswith(RESPONSE_ID_PREFIX),
            lora=model.lora,
            caller=self.actor_name,
        ))

        async def finish(usage: UsageRecord | None) -> None:
            await self.admission.finish(claim_id, usage)

        served = Served(
            job, tenant.name, model.base, seating, timer, finish,
            coalesce_s=self.config.ingress.stream_coalesce_ms / 1000,
        )
        return Dispatched(served, seating.handle, ratelimit_headers(admission.limits))

    async def _admit(
        self, request: Request, tenant: TenantSpec, ask: AdmissionRequest
    ) -> Admission:
        try:
            admission = await self.admission.admit(ask)
        except AdmissionUnavailable:
            raise admission_unavailable() from None
        if not admission.admitted:
            raise self._refused(request, admission, tenant)
        return admission

    @staticmethod
    def _refused(request: Request, admission: Admission, tenant: TenantSpec) -> OpenAIError:
        assert admission.refusal is not None
        request.state.reject_reason = rejection_reason(admission.refusal)
        if admission.refusal.reason == "dedicated_saturated":
            request.state.tier = "dedicated"
        return refusal_error(admission, tenant.name)
