"""OpenAI's Fine-tuning API: create, list, read and cancel jobs; their events and checkpoints.

A create is checked whole before a row is written: the base model (one the tenant may
use, served with LoRA on), the files (the tenant's own, uploaded for fine-tuning; any
other id, another tenant's included, is the same 400), `method` (supervised only) and the
hyperparameters (OpenAI's ranges; "auto" resolved from the config). The job starts in
`validating_files`; the runner (deployments.training.runner) takes it from there. Jobs,
events and checkpoints are read from the state store, scoped by tenant.

A tenant's jobs are limited two ways (429s): how many have not ended
(`max_active_jobs_per_tenant`) and how many tokens its jobs train in 24 hours
(`max_tokens_per_tenant_per_day`). For the second, a create tokenizes the training file
with the base model's tokenizer and chat template, as the trainer will, and stores the
job's tokens (all of every example, times n_epochs: OpenAI's `trained_tokens`).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from deployments.api.catalog import ModelCatalog
from deployments.api.conversation_objects import parse_list_params
from deployments.api.errors import OpenAIError, parse_body
from deployments.api.files import FilesApi, state_call
from deployments.api.responses_protocol import Metadata
from deployments.state.files import StoredFile
from deployments.state.jobs import (
    ACTIVE,
    TERMINAL,
    Hyperparameters,
    JobCheckpoint,
    JobEvent,
    JobStore,
    StoredJob,
)
from deployments.state.stored import UnknownCursorError
from models.chat_data import ChatDataError, parse_chat_jsonl
from models.finetune import encode_dataset
from models.tokenizer import Tokenizer

T = TypeVar("T")
JOB_ID_PREFIX = "ftjob-"
Auto = Literal["auto"]
Suffix = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
DAY = timedelta(days=1)


class HyperparametersBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_epochs: Auto | Annotated[int, Field(ge=1, le=50)] = "auto"
    batch_size: Auto | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Auto | Annotated[float, Field(gt=0, le=10)] = "auto"


class SupervisedBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: HyperparametersBody | None = None


class MethodBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised"]
    supervised: SupervisedBody | None = None


class CreateJobBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=128)
    validation_file: str | None = Field(None, min_length=1, max_length=128)
    hyperparameters: HyperparametersBody | None = None
    method: MethodBody | None = None
    suffix: Suffix | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    metadata: Metadata = None
    integrations: list[Any] | None = Field(None, max_length=0)


def job_object(job: StoredJob) -> dict[str, Any]:
    hp = {
        "n_epochs": job.hyperparameters.n_epochs,
        "batch_size": job.hyperparameters.batch_size,
        "learning_rate_multiplier": job.hyperparameters.learning_rate_multiplier,
    }
    return {
        "object": "fine_tuning.job",
        "id": job.id,
        "model": job.model,
        "created_at": int(job.created_at.timestamp()),
        "finished_at": int(job.finished_at.timestamp()) if job.finished_at else None,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.tenant,
        "result_files": list(job.result_files),
        "status": job.status,
        "validation_file": job.validation_file,
        "training_file": job.training_file,
        "hyperparameters": hp,
        "trained_tokens": job.trained_tokens,
        "error": job.error,
        "user_provided_suffix": job.suffix,
        "seed": job.seed,
        "estimated_finish": None,
        "integrations": [],
        "metadata": job.metadata,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
    }


def event_object(event: JobEvent) -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.event",
        "id": event.id,
        "created_at": int(event.created_at.timestamp()),
        "level": event.level,
        "message": event.message,
        "data": event.data,
        "type": event.type,
    }


def checkpoint_object(job: StoredJob, checkpoint: JobCheckpoint) -> dict[str, Any]:
    return {
        "object": "fine_tuning.job.checkpoint",
        "id": checkpoint.id,
        "created_at": int(checkpoint.created_at.timestamp()),
        "fine_tuned_model_checkpoint": f"{job.fine_tuned_model or job.id}:ckpt-step-"
        f"{checkpoint.step_number}",
        "fine_tuning_job_id": job.id,
        "metrics": checkpoint.metrics,
        "step_number": checkpoint.step_number,
    }


async def _paged(
    found: Coroutine[Any, Any, tuple[list[T], bool]], to_object: Callable[[T], dict[str, Any]]
) -> dict[str, Any]:
    """One page of a store's keyset list as OpenAI's list object; an `after` that is not
    in the list is a 400."""
    try:
        items, more = await state_call(found)
    except UnknownCursorError as exc:
        raise OpenAIError(
            400,
            f"Invalid value for 'after': {exc.after[:128]!r} is not in this list.",
            param="after",
        ) from None
    return {"object": "list", "data": [to_object(i) for i in items], "has_more": more}


def estimate_tokens(tokenizer: Tokenizer, data: bytes, n_epochs: int, max_seq_len: int) -> int:
    """The tokens a job on this training file will train, counted as the trainer counts
    them; 0 for a file the trainer refuses (the job fails validation, training nothing)."""
    try:
        encoded = encode_dataset(tokenizer, parse_chat_jsonl(data), max_seq_len)
    except ChatDataError:
        return 0
    return n_epochs * sum(len(e.ids) for e in encoded)


def job_not_found(job_id: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"Could not find fine-tune: {job_id[:128]}",
        param="fine_tune_id",
        code="fine_tune_not_found",
    )


class JobsApi:
    def __init__(
        self, catalog: ModelCatalog, jobs: JobStore, files: FilesApi, wake: Callable[[], None]
    ) -> None:
        self.config = catalog.config
        self.models = catalog.models  # the base models (their tokenizers), by name
        self.jobs = jobs
        self.files = files
        self.wake = wake  # tells the runner to look at the jobs now

    async def create(self, tenant: str, body: Any) -> dict[str, Any]:
        req = parse_body(CreateJobBody, body)
        await self.files.ready()
        spec = self.config.tenant(tenant)
        model = next((m for m in self.config.models if m.name == req.model), None)
        if model is None or spec is None or not spec.may_use(model.name):
            raise OpenAIError(
                404,
                f"The model '{req.model[:256]}' does not exist",
                param="model",
                code="model_not_found",
            )
        served = self.models.get(model.name)
        if model.engine.max_loras == 0 or served is None:
            why = "no deployment serves it" if served is None else "it is served without LoRA"
            raise OpenAIError(
                400,
                f"The model '{model.name}' is not available for fine-tuning: {why}.",
                param="model",
                code="model_not_fine_tunable",
            )
        limit = self.config.fine_tuning.max_active_jobs_per_tenant
        if await state_call(self.jobs.count_active(tenant)) >= limit:
            raise OpenAIError(
                429,
                f"You have {limit} fine-tuning jobs that have not finished, the most a tenant "
                "may have at once; wait for one to finish or cancel one.",
                code="too_many_active_jobs",
            )
        training = await self._file(tenant, req.training_file, "training_file")
        if req.validation_file is not None:
            await self._file(tenant, req.validation_file, "validation_file")
        hp = self._hyperparameters(req, training.examples)
        now = datetime.now(UTC)
        tokens = await self._within_daily_tokens(tenant, served.tokenizer, training, hp, now)
        job = StoredJob(
            id=JOB_ID_PREFIX + uuid.uuid4().hex[:24],
            tenant=tenant,
            model=model.name,
            training_file=req.training_file,
            validation_file=req.validation_file,
            hyperparameters=hp,
            suffix=req.suffix,
            seed=req.seed if req.seed is not None else random.randrange(2**31),
            metadata=req.metadata,
            status="validating_files",
            created_at=now,
            estimated_tokens=tokens,
        )
        await state_call(self.jobs.create(job))
        await state_call(self.jobs.add_event(job, job.created_at, "Created fine-tuning job"))
        self.wake()
        return job_object(job)

    async def list(self, tenant: str, query: dict[str, str]) -> dict[str, Any]:
        params = parse_list_params(query)
        await self.files.ready()
        return await _paged(self.jobs.list_jobs(tenant, params.after, params.limit), job_object)

    async def get(self, tenant: str, job_id: str) -> StoredJob:
        await self.files.ready()
        job = await state_call(self.jobs.get(tenant, job_id))
        if job is None:
            raise job_not_found(job_id)
        return job

    async def cancel(self, tenant: str, job_id: str) -> dict[str, Any]:
        job = await self.get(tenant, job_id)
        if job.status in TERMINAL:
            raise OpenAIError(
                400,
                f"Job {job.id} has already {job.status}; it cannot be cancelled.",
                param="fine_tune_id",
                code="job_not_cancellable",
            )
        now = datetime.now(UTC)
        if not await state_call(self.jobs.transition(job.id, "cancelled", ACTIVE, finished_at=now)):
            return job_object(await self.get(tenant, job_id))  # it ended meanwhile
        await state_call(self.jobs.add_event(job, now, "Cancellation requested"))
        self.wake()
        return job_object(await self.get(tenant, job_id))

    async def events(self, tenant: str, job_id: str, query: dict[str, str]) -> dict[str, Any]:
        await self.get(tenant, job_id)
        params = parse_list_params(query)
        found = self.jobs.events(tenant, job_id, params.after, params.limit)
        return await _paged(found, event_object)

    async def checkpoints(self, tenant: str, job_id: str, query: dict[str, str]) -> dict[str, Any]:
        job = await self.get(tenant, job_id)
        params = parse_list_params(query)
        found = self.jobs.checkpoints(tenant, job_id, params.after, params.limit)
        return await _paged(found, lambda c: checkpoint_object(job, c))

    # ---- steps ---------------------------------------------------------------------------
    async def _within_daily_tokens(
        self,
        tenant: str,
        tokenizer: Tokenizer,
        training: StoredFile,
        hp: Hyperparameters,
        now: datetime,
    ) -> int:
        """The job's tokens; a 429 if with them the tenant's jobs of the last 24 hours
        would train more than `max_tokens_per_tenant_per_day`."""
        ft = self.config.fine_tuning
        data = await self.files.read(training)
        tokens = await asyncio.to_thread(
            estimate_tokens, tokenizer, data, hp.n_epochs, ft.max_seq_len
        )
        limit = ft.max_tokens_per_tenant_per_day
        if limit is None:
            return tokens
        used = await state_call(self.jobs.tokens_since(tenant, now - DAY))
        if used + tokens > limit:
            raise OpenAIError(
                429,
                f"This job would train {tokens} tokens; with the {used} your fine-tuning "
                f"jobs trained or will train in the last 24 hours that passes the limit of "
                f"{limit} tokens per day (max_tokens_per_tenant_per_day).",
                code="daily_token_limit_exceeded",
            )
        return tokens

    async def _file(self, tenant: str, file_id: str, param: str) -> Any:
        """The tenant's fine-tune file; another tenant's id reads like a missing one."""
        try:
            stored = await self.files.stored(tenant, file_id, param)
        except OpenAIError as exc:
            if exc.status != 404:
                raise
            raise OpenAIError(
                400,
                f"invalid {param.replace('_', ' ')}: {file_id[:128]} (no such file)",
                param=param,
                code="invalid_file",
            ) from None
        if stored.purpose != "fine-tune":
            raise OpenAIError(
                400,
                f"invalid {param.replace('_', ' ')}: {file_id} was not uploaded with "
                "purpose 'fine-tune'",
                param=param,
                code="invalid_file",
            )
        return stored

    def _hyperparameters(self, req: CreateJobBody, examples: int) -> Hyperparameters:
        top = req.hyperparameters
        inner = (
            req.method.supervised.hyperparameters if req.method and req.method.supervised else None
        )
        if top is not None and inner is not None and top != inner:
            raise OpenAIError(
                400,
                "hyperparameters and method.supervised.hyperparameters disagree; give one",
                param="hyperparameters",
            )
        hp = inner or top or HyperparametersBody()
        ft = self.config.fine_tuning
        batch = ft.default_batch_size if hp.batch_size == "auto" else hp.batch_size
        return Hyperparameters(
            n_epochs=ft.default_n_epochs if hp.n_epochs == "auto" else hp.n_epochs,
            batch_size=min(batch, examples) if hp.batch_size == "auto" else batch,
            learning_rate_multiplier=(
                1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
            ),
        )
