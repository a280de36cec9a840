"""Fine-tuning jobs, their events and checkpoints, in the state store.

The database is the truth the ingress (create, read, cancel) and the runner (claim, run,
finish) share; neither keeps a job in memory. Status changes are conditional updates
(`transition`), so a cancel and a finishing run cannot both win, and two runners cannot
claim one job. Every tenant-facing read is by (tenant, id). Database failures surface as
StateError.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

from sqlalchemy import Row, Table, case, func, insert, select, update

from deployments.state.keyset import keyset_page
from deployments.state.schema import FineTuningCheckpointRow, FineTuningEventRow, FineTuningJobRow
from deployments.state.store import StateStore
from deployments.state.stored import unavailable

JOBS = cast(Table, FineTuningJobRow.__table__)
EVENTS = cast(Table, FineTuningEventRow.__table__)
CHECKPOINTS = cast(Table, FineTuningCheckpointRow.__table__)
Status = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: tuple[Status, ...] = ("validating_files", "queued", "running")
TERMINAL: tuple[Status, ...] = ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class Hyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


@dataclass(frozen=True)
class StoredJob:
    id: str  # "ftjob-…"
    tenant: str
    model: str
    training_file: str
    validation_file: str | None
    hyperparameters: Hyperparameters
    suffix: str | None
    seed: int
    metadata: dict[str, str] | None
    status: Status
    created_at: datetime
    finished_at: datetime | None = None
    trained_tokens: int | None = None
    error: dict[str, Any] | None = None
    fine_tuned_model: str | None = None
    result_files: list[str] = field(default_factory=list)
    owner: str | None = None
    heartbeat_at: datetime | None = None
    attempts: int = 0
    resume_from: str | None = None
    estimated_tokens: int | None = None  # the schedule's trained tokens, counted at create


@dataclass(frozen=True)
class JobEvent:
    id: str
    job_id: str
    created_at: datetime
    level: str
    type: str  # message | metrics
    message: str
    data: dict[str, Any] | None


@dataclass(frozen=True)
class JobCheckpoint:
    id: str
    job_id: str
    created_at: datetime
    step_number: int
    metrics: dict[str, Any]
    path: str


def _job(row: Row[Any]) -> StoredJob:
    m = dict(row._mapping)
    m["hyperparameters"] = Hyperparameters(**m["hyperparameters"])
    return StoredJob(**m)


def _event(row: Row[Any]) -> JobEvent:
    m = row._mapping
    return JobEvent(
        m["id"], m["job_id"], m["created_at"], m["level"], m["type"], m["message"], m["data"]
    )


def _checkpoint(row: Row[Any]) -> JobCheckpoint:
    m = row._mapping
    return JobCheckpoint(
        m["id"], m["job_id"], m["created_at"], m["step_number"], m["metrics"], m["path"]
    )


class JobStore:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    # ---- jobs ------------------------------------------------------------------------------
    async def create(self, job: StoredJob) -> None:
        values = asdict(job)
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                await conn.execute(insert(JOBS), [values])

    async def get(self, tenant: str | None, job_id: str) -> StoredJob | None:
        """The job (the tenant's only, unless tenant is None: the runner's view)."""
        stmt = select(JOBS).where(JOBS.c.id == job_id)
        if tenant is not None:
            stmt = stmt.where(JOBS.c.tenant == tenant)
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(stmt)).first()
        return None if row is None else _job(row)

    async def list_jobs(
        self, tenant: str, after: str | None, limit: int
    ) -> tuple[list[StoredJob], bool]:
        """Newest first, `limit` after the job `after` (UnknownCursorError if not the
        tenant's); and whether there are more."""
        c = JOBS.c
        rows, more = await keyset_page(
            self.store, JOBS, [c.tenant == tenant], [c.created_at, c.id], after, limit
        )
        return [_job(r) for r in rows], more

    async def count_active(self, tenant: str) -> int:
        """The tenant's jobs not yet ended (its concurrency, for the per-tenant limit)."""
        c = JOBS.c
        stmt = select(func.count()).where(c.tenant == tenant, c.status.in_(ACTIVE))
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                return int((await conn.execute(stmt)).scalar_one())

    async def tokens_since(self, tenant: str, since: datetime) -> int:
        """The tenant's trained tokens of jobs created since `since` (its daily limit): a
        job not yet ended counts its estimate (what it will train), an ended one what it
        trained, so a job that failed validation counts nothing and a cancelled one only
        the steps it ran."""
        c = JOBS.c
        tokens = case(
            (c.status.in_(ACTIVE), func.coalesce(c.estimated_tokens, c.trained_tokens)),
            else_=c.trained_tokens,
        )
        stmt = select(func.coalesce(func.sum(tokens), 0)).where(
            c.tenant == tenant, c.created_at >= since
        )
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                return int((await conn.execute(stmt)).scalar_one())

    async def with_status(self, *statuses: Status) -> list[StoredJob]:
        """Jobs in these states, oldest first (the runner's queue)."""
        stmt = select(JOBS).where(JOBS.c.status.in_(statuses)).order_by(JOBS.c.created_at)
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                rows = (await conn.execute(stmt)).all()
        return [_job(r) for r in rows]

    async def transition(
        self, job_id: str, to: Status, allowed_from: tuple[Status, ...], **values: Any
    ) -> bool:
        """Set the status (and `values`) only if the job is in one of `allowed_from`;
        whether it was."""
        stmt = (
            update(JOBS)
            .where(JOBS.c.id == job_id, JOBS.c.status.in_(allowed_from))
            .values(status=to, **values)
        )
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                changed = (await conn.execute(stmt)).rowcount
        return bool(changed)

    async def update(self, job_id: str, **values: Any) -> None:
        """Fields other than the status (heartbeat, trained tokens, resume point)."""
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                await conn.execute(update(JOBS).where(JOBS.c.id == job_id).values(**values))

    # ---- events and checkpoints ------------------------------------------------------------
    async def add_event(
        self,
        job: StoredJob,
        now: datetime,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
    ) -> None:
        values = {
            "id": "ftevent-" + uuid.uuid4().hex[:24],
            "job_id": job.id,
            "tenant": job.tenant,
            "created_at": now,
            "level": level,
            "type": type,
            "message": message,
            "data": data,
        }
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                await conn.execute(insert(EVENTS), [values])

    async def events(
        self, tenant: str, job_id: str, after: str | None, limit: int
    ) -> tuple[list[JobEvent], bool]:
        """Newest first; UnknownCursorError for an `after` that is not this job's."""
        c = EVENTS.c
        scope = [c.job_id == job_id, c.tenant == tenant]
        rows, more = await keyset_page(self.store, EVENTS, scope, [c.seq], after, limit)
        return [_event(r) for r in rows], more

    async def add_checkpoint(
        self, job: StoredJob, now: datetime, step: int, metrics: dict[str, Any], path: str
    ) -> None:
        values = {
            "id": "ftckpt-" + uuid.uuid4().hex[:24],
            "job_id": job.id,
            "tenant": job.tenant,
            "created_at": now,
            "step_number": step,
            "metrics": metrics,
            "path": path,
        }
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                await conn.execute(insert(CHECKPOINTS), [values])

    async def checkpoints(
        self, tenant: str, job_id: str, after: str | None, limit: int
    ) -> tuple[list[JobCheckpoint], bool]:
        """Newest (highest step) first."""
        c = CHECKPOINTS.c
        scope = [c.job_id == job_id, c.tenant == tenant]
        keys = [c.step_number, c.id]  # unique even if a replayed step was saved twice
        rows, more = await keyset_page(self.store, CHECKPOINTS, scope, keys, after, limit)
        return [_checkpoint(r) for r in rows], more
