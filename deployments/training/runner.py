"""The fine-tuning runner: one Serve replica that moves jobs through their states and runs
each one's training as a Ray task.

Everything it knows is in the state store: it reads the jobs every `poll_interval_s` (or
at once when the ingress wakes it after a create or a cancel), so a restarted runner
carries on where the last one stopped. Per tick:
- `validating_files` jobs are queued (the upload already checked the format; the task
  reads the files again and fails the job with the reason if they are unusable);
- queued jobs start, oldest first, while fewer than `max_running_jobs` train: claimed by
  a conditional update, then one Ray task each, placed by the config's policy
  (`placement_options`): the base model's shared-pool node type by default, so training
  never lands on another tenant's reserved nodes, with only the CPUs (or GPUs) the job
  asks for, which Ray gives only out of capacity no serving replica holds;
- a cancelled job's task is cancelled (it also stops by itself at its next step);
- a finished task's outcome is applied: its trained tokens go to the ledger first (tier
  "training", priced by `prices.tokens` entries with that tier). Success registers the adapter
  `ft:<base>:<tenant>:<suffix>:<job id>` for that tenant alone, then marks the job
  succeeded, so a succeeded job's model is servable at once (replicas load it on the
  first request). A lost worker re-queues the job from its last checkpoint, up to
  `max_attempts` starts;
- a running job whose runner went silent (no heartbeat for `heartbeat_timeout_s`) is
  re-queued the same way;
- serving comes first: when a Serve replica (or its placement group) that could be placed
  on a training task's node type has waited `yield_after_s` for resources, every training
  task on that node type is stopped and its job queued again (resuming from its last
  checkpoint, not counted as an attempt), and no job starts there while serving waits.
  Ray then places the replica in the capacity the tasks held. A replica pinned to another
  node type (one that cannot be placed at all, say) leaves training alone: stopping it
  would free nothing that replica could use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import ray
from ray import serve
from ray.exceptions import (
    NodeDiedError,
    OwnerDiedError,
    RayTaskError,
    TaskCancelledError,
    WorkerCrashedError,
)
from ray.util.state.exception import RayStateApiException

from deployments.config.tiered import TieredConfig
from deployments.state.adapters import AdapterExistsError, AdapterRegistry, NewAdapter
from deployments.state.config import resolve_state_spec
from deployments.state.errors import StateError
from deployments.state.jobs import JobStore, StoredJob
from deployments.state.ledger import Ledger
from deployments.state.store import StateStore
from deployments.state.stored import unavailable
from deployments.tenancy.types import UsageRecord, UsageStatus
from deployments.training.task import TrainingAssignment, TrainingOutcome, run_training
from deployments.training.waiting import in_the_way, waiting_replicas
from models.default_model import resolve_model_path

log = logging.getLogger(__name__)
TASK_NAME = "fine-tuning-task"
LOST = (WorkerCrashedError, NodeDiedError, OwnerDiedError)
# A job's end as its ledger row's status (a cancel is the client's, like a disconnect).
BILLED_STATUS: dict[str, UsageStatus] = {
    "succeeded": "ok",
    "failed": "error",
    "cancelled": "client_disconnect",
}


def fine_tuned_name(job: StoredJob) -> str:
    return f"ft:{job.model}:{job.tenant}:{job.suffix or ''}:{job.id}"


def training_node_type(config: TieredConfig, job: StoredJob) -> str | None:
    """The node-type resource a job trains on (None: any node). The policy: a dedicated
    tenant that opted in (`dedicated.fine_tune_on_reservation`) trains its own model's
    jobs on its reserved node type; every other job goes to `fine_tuning.
    node_type_resource`, by default the base model's shared-pool node type; never to
    another tenant's reservation."""
    tenant = config.tenant(job.tenant)
    dedicated = tenant.dedicated if tenant is not None else None
    if dedicated and dedicated.fine_tune_on_reservation and dedicated.model == job.model:
        return dedicated.replica.node_type_resource
    spec = next(m for m in config.models if m.name == job.model)
    return config.fine_tuning.node_type_resource or spec.shared_pool.node_type_resource


def placement_options(config: TieredConfig, job: StoredJob) -> dict[str, Any]:
    """Ray options of one job's training task: the resources it asks and the node type it
    is pinned to (`training_node_type`)."""
    ft = config.fine_tuning
    resource = training_node_type(config, job)
    options: dict[str, Any] = {
        "num_cpus": ft.num_cpus,
        "num_gpus": ft.num_gpus,
        "max_retries": 0,  # the runner resumes from a checkpoint instead
        "name": TASK_NAME,
    }
    if resource is not None:
        options["resources"] = {resource: 0.001}
    return options


class FineTuningRunner:
    async def __init__(self, config: dict[str, Any]) -> None:  # type: ignore[misc]
        self.config = TieredConfig.model_validate(config)
        self.spec = self.config.fine_tuning
        self.store = StateStore.connect(resolve_state_spec(self.config.state))
        self.jobs = JobStore(self.store)
        self.registry = AdapterRegistry(self.store)
        self.ledger = Ledger(self.store)
        self.owner = serve.get_replica_context().replica_id.unique_id
        self.gcs_address = ray.get_runtime_context().gcs_address  # this cluster's state API
        self.running: dict[str, ray.ObjectRef] = {}
        self.running_on: dict[str, str | None] = {}  # a running job's node type
        self._cancelled: set[str] = set()  # running jobs whose task was cancelled
        self._preempted: set[str] = set()  # tasks stopped so serving gets their capacity
        self._waiting_since: dict[str | None, datetime] = {}  # by node type: serving waits
        self._wake = asyncio.Event()
        self._ready = False
        self._loop = asyncio.create_task(self._run())

    async def check_health(self) -> None:
        if self._loop.done():
            raise RuntimeError("the fine-tuning runner's loop stopped")

    async def wake(self) -> None:
        """Look at the jobs now (the ingress created or cancelled one)."""
        self._wake.set()

    async def running_jobs(self) -> list[str]:
        return sorted(self.running)

    async def _run(self) -> None:
        while True:
            try:
                if not self._ready:
                    await self.store.prepare()
                    self._ready = True
                await self.tick()
            except StateError as exc:
                log.warning("fine-tuning runner: state store unavailable: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.spec.poll_interval_s)
            self._wake.clear()

    async def tick(self) -> None:
        now = datetime.now(UTC)
        for job_id, ref in list(self.running.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                del self.running[job_id]
                del self.running_on[job_id]
                self._cancelled.discard(job_id)
                await self._finish(job_id, ref)
        for job in await self.jobs.with_status("validating_files"):
            if await self.jobs.transition(job.id, "queued", ("validating_files",)):
                await self.jobs.add_event(job, now, "Files validated; the job is queued")
        stale = now - timedelta(seconds=self.spec.heartbeat_timeout_s)
        for job_id, ref in self.running.items():
            mine = await self.jobs.get(None, job_id)
            if mine is not None and mine.status == "cancelled" and job_id not in self._cancelled:
                ray.cancel(ref, force=True)
                self._cancelled.add(job_id)
        for job in await self.jobs.with_status("running"):
            if job.id not in self.running and (
                job.heartbeat_at is None or job.heartbeat_at < stale
            ):
                await self._requeue(job, now, "its runner stopped")
        queued = await self.jobs.with_status("queued")
        on = {job.id: training_node_type(self.config, job) for job in queued}
        starved = await self._serving_starved(now, {*on.values(), *self.running_on.values()})
        for job_id, node_type in list(self.running_on.items()):
            if node_type in starved and job_id not in self._preempted:
                await self._preempt(job_id, now)
        for job in queued:
            if len(self.running) >= self.spec.max_running_jobs:
                break
            if on[job.id] not in starved:  # nothing starts where serving waits
                await self._start(job, now)

    async def _serving_starved(
        self, now: datetime, training_on: set[str | None]
    ) -> set[str | None]:
        """The node types (of those training uses or would) on which serving has waited
        `yield_after_s` for capacity (a Serve replica or its placement group pending
        that could be placed there): training yields them. Off when yield_after_s is 0."""
        if not self.spec.yield_after_s or not training_on:
            self._waiting_since = {}
            return set()
        try:
            waiting = await asyncio.to_thread(waiting_replicas, self.gcs_address)
        except RayStateApiException as exc:  # no news this tick: what was waiting still is
            log.warning("fine-tuning runner: Ray's state API did not answer: %s", exc)
        else:
            since = self._waiting_since
            self._waiting_since = {
                t: since.get(t, now) for t in training_on if any(in_the_way(t, w) for w in waiting)
            }
        return {
            t
            for t, at in self._waiting_since.items()
            if t in training_on and (now - at).total_seconds() >= self.spec.yield_after_s
        }

    async def _preempt(self, job_id: str, now: datetime) -> None:
        """Stop a running task for serving's sake: the job is queued again (this start is
        not counted against max_attempts) and resumes from its last checkpoint."""
        job = await self.jobs.get(None, job_id)
        if job is None or job.status != "running":
            return
        if await self.jobs.transition(
            job.id, "queued", ("running",), owner=None, attempts=max(job.attempts - 1, 0)
        ):
            self._preempted.add(job_id)
            ray.cancel(self.running[job_id], force=True)
            point = job.resume_from.rsplit("/", 1)[-1] if job.resume_from else "the start"
            await self.jobs.add_event(
                job,
                now,
                "Training paused: serving needs the capacity; it resumes from "
                f"{point} once serving has what it needs",
                level="warn",
            )

    async def _start(self, job: StoredJob, now: datetime) -> None:
        claimed = await self.jobs.transition(
            job.id,
            "running",
            ("queued",),
            owner=self.owner,
            heartbeat_at=now,
            attempts=job.attempts + 1,
        )
        if not claimed:
            return
        model = next(m for m in self.config.models if m.name == job.model)
        assignment = TrainingAssignment(
            job=job,
            state=resolve_state_spec(self.config.state),
            files=self.config.files,
            model_path=str(resolve_model_path(model.path)),
            lora=self.spec.lora,
            base_learning_rate=self.spec.base_learning_rate,
            max_seq_len=self.spec.max_seq_len,
        )
        task = ray.remote(run_training).options(**placement_options(self.config, job))
        self.running[job.id] = task.remote(assignment)
        self.running_on[job.id] = training_node_type(self.config, job)
        await self.jobs.add_event(job, now, f"Training started (attempt {job.attempts + 1})")

    async def _finish(self, job_id: str, ref: ray.ObjectRef) -> None:
        now = datetime.now(UTC)
        job = await self.jobs.get(None, job_id)
        if job_id in self._preempted:  # queued again already; its outcome is void
            self._preempted.discard(job_id)
            with contextlib.suppress(Exception):
                await ref  # a task that finished before the cancel: its steps replay
            return
        if job is None:
            return
        try:
            outcome: TrainingOutcome = await ref
        except TaskCancelledError:  # force-cancelled: bill the tokens its steps reported
            await self._bill(job, now, "cancelled", job.trained_tokens or 0)
            await self.jobs.add_event(job, now, "The job was cancelled")
            return
        except LOST as exc:
            await self._requeue(job, now, f"its training worker was lost ({type(exc).__name__})")
            return
        except RayTaskError as exc:
            log.error("fine-tuning job %s failed in training: %s", job.id, exc)
            await self._bill(job, now, "failed", job.trained_tokens or 0)
            error = {
                "code": "training_error",
                "message": "Training failed on the server; "
                f"{type(exc.cause).__name__ if exc.cause else 'error'}.",
                "param": None,
            }
            await self._end(job, now, "failed", error=error)
            return
        await self._bill(job, now, outcome.status, outcome.trained_tokens)
        if outcome.status == "cancelled":
            await self.jobs.update(job.id, trained_tokens=outcome.trained_tokens)
            await self.jobs.add_event(job, now, "The job was cancelled")
        elif outcome.status == "failed":
            await self._end(job, now, "failed", error=outcome.error)
        else:
            await self._succeed(job, now, outcome)

    async def _bill(self, job: StoredJob, now: datetime, status: str, tokens: int) -> None:
        """The trained tokens as one ledger row (tier "training", keyed by the job id, so
        a finish applied twice bills once), written before the job's status changes."""
        record = UsageRecord(
            request_id=job.id,
            tenant=job.tenant,
            model=job.model,
            tier="training",
            spill=False,
            prompt_tokens=tokens,
            cached_tokens=0,
            completion_tokens=0,
            started_at=job.created_at.timestamp(),
            ended_at=now.timestamp(),
            status=BILLED_STATUS[status],
            adapter=fine_tuned_name(job) if status == "succeeded" else None,
        )
        with unavailable(self.store):
            await self.ledger.write([record])

    async def _succeed(self, job: StoredJob, now: datetime, outcome: TrainingOutcome) -> None:
        assert outcome.adapter_path is not None
        name = fine_tuned_name(job)
        new = NewAdapter(name, job.model, outcome.adapter_path, (job.tenant,))
        try:
            await self.registry.activate(await self.registry.reserve(new, "fine_tune"))
        except AdapterExistsError:  # a runner that died after registering, before the end
            log.info("fine-tuned model %s was registered already", name)
        done = await self._end(
            job,
            now,
            "succeeded",
            fine_tuned_model=name,
            trained_tokens=outcome.trained_tokens,
            result_files=[outcome.result_file] if outcome.result_file else [],
        )
        if not done:  # cancelled while finishing: nobody gets the model
            await self.registry.unload(name)

    async def _end(self, job: StoredJob, now: datetime, status: Any, **values: Any) -> bool:
        ended = await self.jobs.transition(
            job.id, status, ("running",), finished_at=now, owner=None, **values
        )
        if ended:
            level = "info" if status == "succeeded" else "error"
            message = (
                f"The job has successfully completed: {values.get('fine_tuned_model')}"
                if status == "succeeded"
                else f"The job failed: {(values.get('error') or {}).get('message')}"
            )
            await self.jobs.add_event(job, now, message, level=level)
        return ended

    async def _requeue(self, job: StoredJob, now: datetime, why: str) -> None:
        """Resume a running job from its last checkpoint, or fail it after max_attempts."""
        if job.attempts >= self.spec.max_attempts:
            error = {
                "code": "training_interrupted",
                "param": None,
                "message": f"Training stopped {job.attempts} times; last: {why}.",
            }
            await self._end(job, now, "failed", error=error)
            return
        if await self.jobs.transition(job.id, "queued", ("running",), owner=None):
            point = job.resume_from.rsplit("/", 1)[-1] if job.resume_from else "the start"
            await self.jobs.add_event(
                job,
                now,
                f"Training was interrupted ({why}); resuming from {point}",
                level="warn",
            )
