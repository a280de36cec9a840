"""The OpenAI-compatible ingress: routes, auth, validation, one admission call, dispatch.

Order per request: key -> tenant; a tenant already over its limits is refused here from
the last decision (no body parsing, no tokenization, no actor call); strict body
validation; prompt rendering and token count; one `admit` (rate limits, tier, fair
queue); stream from the replica admission chose; one `finish` with the usage, however
the request ends.
"""

# No `from __future__ import annotations` here: serve.ingress re-creates the route methods
# elsewhere, where FastAPI could not resolve string annotations such as `Request`.
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.api.admin import require_admin, usage_report
from deployments.api.completions import Served, respond
from deployments.api.errors import OpenAIError, install_error_handlers, set_body_limit
from deployments.api.limits import (
    admission_unavailable,
    ratelimit_headers,
    refusal_error,
    rejection_reason,
)
from deployments.api.prompts import ServedModel
from deployments.api.protocol import OpenAIRequest, parse_request
from deployments.api.responses import ResponseBuilder
from deployments.config.plan import dedicated_pool_key
from deployments.config.tenants import TenantSpec
from deployments.config.tiered import TieredConfig
from deployments.observability.requests import RequestMetricsMiddleware, RequestTimer
from deployments.replicas.requests import GenerateRequest
from deployments.state.config import resolve_state_spec
from deployments.state.ledger import Ledger
from deployments.state.store import StateStore
from deployments.tenancy.client import AdmissionClient, AdmissionUnavailable
from deployments.tenancy.keys import load_key_rings
from deployments.tenancy.policy import admission_config
from deployments.tenancy.types import Admission, AdmissionRequest, UsageRecord

INGRESS_HEADER = "x-tiered-ingress"
DRAIN_TIMEOUT_S = 10.0  # a stopping replica waits this long for its usage to be committed

app = FastAPI(title="Tiered", version="0.1.0", description="OpenAI-compatible multi-tenant API")
install_error_handlers(app)
app.add_middleware(RequestMetricsMiddleware)


# Helpers sit above the class: serve.ingress captures what the class refers to when it
# is decorated.
def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _include_usage(req: OpenAIRequest) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


@serve.ingress(app)
class Ingress:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__
        self,
        config: dict,
        handles: dict[str, DeploymentHandle],
    ) -> None:
        self.config = TieredConfig.model_validate(config)
        set_body_limit(app, self.config.ingress.max_body_bytes)
        self.keys = load_key_rings(self.config)
        self.models = {m.name: ServedModel.load(m) for m in self.config.models}
        self.handles = handles  # pool key (deployments.config.plan) -> its deployment
        context = serve.get_replica_context()
        self.owner = context.replica_id.unique_id
        self.admission = AdmissionClient(
            context.app_name, admission_config(self.config, time.time()), self.owner
        )
        await self.admission.start()
        # Reads only (the admission actor writes and migrates): connects on first use.
        self.ledger = Ledger(StateStore.connect(resolve_state_spec(self.config.state)))

    async def __del__(self) -> None:
        """Serve calls this when the replica stops (scale-down, redeploy, shutdown):
        every usage record this replica holds reaches the database first."""
        await self.admission.drain(DRAIN_TIMEOUT_S)
        await self.ledger.store.close()

    async def check_health(self) -> None:
        """Serve's periodic health check doubles as this replica's heartbeat to the
        admission actor. Admission trouble never fails it: the replica holds claims."""
        await self.admission.heartbeat()

    # ---- plain endpoints ------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok" if self.admission.available else "degraded"}

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
    async def usage(self, request: Request) -> dict[str, Any]:
        """Billing aggregates from the ledger, priced (deployments.state.report)."""
        require_admin(self.keys, _bearer(request))
        return await usage_report(self.ledger, self.config.prices, dict(request.query_params))

    @app.get("/admin/state")
    async def state(self, request: Request) -> dict[str, Any]:
        """The admission actor's seats and queues, live (not billing data)."""
        require_admin(self.keys, _bearer(request))
        try:
            return await self.admission.state()
        except AdmissionUnavailable:
            raise admission_unavailable() from None

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "completion")

    # ---- the request path -----------------------------------------------------------
    def _authenticate(self, request: Request) -> TenantSpec:
        token = _bearer(request)
        name = self.keys.tenants.tenant_for(token)
        tenant = self.config.tenant(name) if name is not None else None
        if tenant is None:
            message = (
                "Incorrect API key provided." if token else "You didn't provide an API key."
            )
            raise OpenAIError(401, message, code="invalid_api_key")
        return tenant

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
        body = await request.body()
        try:
            parsed = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise OpenAIError(400, "We could not parse the JSON body of your request.") from None
        req = parse_request("chat" if kind == "chat" else "completion", parsed)
        model = self.models.get(req.model)
        if model is None:
            raise OpenAIError(
                404, f"The model '{req.model}' does not exist", param="model",
                code="model_not_found",
            )
        request.state.model = timer.model = model.name
        if not tenant.may_use(model.name):
            raise OpenAIError(
                403, f"tenant '{tenant.name}' may not use model '{model.name}'",
                param="model", code="model_not_allowed",
            )
        prompt = model.prompt(req, self.config.ingress.default_max_tokens)
        claim_id = uuid.uuid4().hex
        admission = await self._admit(
            request, tenant, AdmissionRequest(
                claim_id=claim_id,
                tenant=tenant.name,
                model=model.name,
                cost=prompt.cost,
                prefer_dedicated=req.service_tier != "default",
                owner=self.owner,
            ),
        )
        assert admission.tier is not None
        timer.serving(tenant.name, admission.tier, admission.spill)
        request.state.tier = timer.tier
        dedicated = admission.tier == "dedicated"
        handle = self.handles[dedicated_pool_key(tenant.name) if dedicated else model.name]
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        job = GenerateRequest(
            request_id=prefix + claim_id,
            prompt=prompt.token_ids,
            params=prompt.params,
            priority=admission.band,
            cache_salt=tenant.name,
        )

        async def finish(usage: UsageRecord | None) -> None:
            await self.admission.finish(claim_id, usage)

        served = Served(
            job, tenant.name, model.name, admission.tier, admission.spill,
            ResponseBuilder(kind, job.request_id, model.name, admission.tier, req.n),
            timer, finish,
        )
        headers = ratelimit_headers(admission.limits)
        try:
            return await respond(served, handle, bool(req.stream), _include_usage(req), headers)
        except OpenAIError as exc:
            exc.headers = {**headers, **exc.headers}
            raise

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
