"""Fine-tuning jobs, events, checkpoints and files in the state store, on SQLite and
PostgreSQL: conditional status changes, paging, tenant scoping."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from deployments.state.config import StateSpec
from deployments.state.files import FileStore, StoredFile
from deployments.state.jobs import ACTIVE, Hyperparameters, JobStore, StoredJob
from deployments.state.store import StateStore
from deployments.state.stored import Order, UnknownCursorError
from tests.state_fixtures import postgres_server, state_spec  # noqa: F401
from tests.state_helpers import run

T0 = datetime(2026, 12, 4, 12, tzinfo=UTC)


def job(job_id: str, tenant: str = "a", at: int = 0) -> StoredJob:
    return StoredJob(
        id=job_id,
        tenant=tenant,
        model="m",
        training_file="file-1",
        validation_file=None,
        hyperparameters=Hyperparameters(3, 4, 1.5),
        suffix=None,
        seed=5,
        metadata={"k": "v"},
        status="validating_files",
        created_at=T0 + timedelta(seconds=at),
    )


def in_store(spec: StateSpec, body: Callable[[StateStore], Awaitable[None]]) -> None:
    """Run `body` against a migrated store on `spec`, closed after."""

    async def opened() -> None:
        store = await StateStore.open(spec)
        try:
            await body(store)
        finally:
            await store.close()

    run(opened())


def test_jobs_round_trip_page_and_change_status_only_from_allowed_states(
    state_spec: StateSpec,  # noqa: F811
) -> None:
    async def body(store: StateStore) -> None:
        jobs = JobStore(store)
        for i in range(3):
            await jobs.create(job(f"ftjob-{i}", at=i))
        await jobs.create(job("ftjob-b", tenant="b"))
        got = await jobs.get("a", "ftjob-1")
        assert got == job("ftjob-1", at=1)
        assert await jobs.get("b", "ftjob-1") is None  # another tenant's: missing
        assert (await jobs.get(None, "ftjob-b")) is not None  # the runner sees all
        page, more = await jobs.list_jobs("a", None, 2)
        assert [j.id for j in page] == ["ftjob-2", "ftjob-1"] and more
        page, more = await jobs.list_jobs("a", "ftjob-1", 2)
        assert [j.id for j in page] == ["ftjob-0"] and not more
        with pytest.raises(UnknownCursorError):
            await jobs.list_jobs("a", "ftjob-b", 2)

        assert await jobs.transition("ftjob-0", "queued", ("validating_files",))
        assert not await jobs.transition("ftjob-0", "queued", ("validating_files",))
        assert await jobs.transition("ftjob-0", "running", ("queued",), owner="r1")
        assert await jobs.transition("ftjob-0", "cancelled", ACTIVE, finished_at=T0)
        # A run finishing after the cancel cannot overwrite it.
        assert not await jobs.transition("ftjob-0", "succeeded", ("running",))
        final = await jobs.get("a", "ftjob-0")
        assert final is not None and (final.status, final.owner) == ("cancelled", "r1")
        assert final.finished_at == T0
        queue = await jobs.with_status("validating_files")
        assert [j.id for j in queue] == ["ftjob-b", "ftjob-1", "ftjob-2"]  # oldest first

    in_store(state_spec, body)


def test_events_and_checkpoints_newest_first_scoped_to_the_jobs_tenant(
    state_spec: StateSpec,  # noqa: F811
) -> None:
    async def body(store: StateStore) -> None:
        jobs, files = JobStore(store), FileStore(store)
        j = job("ftjob-e")
        await jobs.create(j)
        for step in range(1, 6):
            await jobs.add_event(j, T0, f"step {step}", type="metrics", data={"step": step})
            await jobs.add_checkpoint(j, T0, step * 10, {"train_loss": 1 / step}, f"k/{step}")
        events, more = await jobs.events("a", j.id, None, 3)
        assert [e.data["step"] for e in events if e.data] == [5, 4, 3] and more
        rest, more = await jobs.events("a", j.id, events[-1].id, 10)
        assert [e.message for e in rest] == ["step 2", "step 1"] and not more
        assert (await jobs.events("b", j.id, None, 10)) == ([], False)
        ckpts, _ = await jobs.checkpoints("a", j.id, None, 2)
        assert [c.step_number for c in ckpts] == [50, 40] and ckpts[0].path == "k/5"
        with pytest.raises(UnknownCursorError):
            await jobs.checkpoints("a", j.id, events[0].id, 2)

        made = StoredFile("file-x", "a", "fine-tune", "t.jsonl", 10, "a/file-x", T0, 2)
        await files.create(made)
        assert await files.get("a", "file-x") == made
        assert await files.get("b", "file-x") is None
        assert await files.delete("b", "file-x") is None
        assert await files.delete("a", "file-x") == made
        assert await files.get("a", "file-x") is None

    in_store(state_spec, body)


def test_a_tenants_daily_tokens_count_estimates_of_running_jobs_and_trained_tokens_of_ended(
    state_spec: StateSpec,  # noqa: F811
) -> None:
    async def body(store: StateStore) -> None:
        jobs = JobStore(store)
        made = {
            "ftjob-old": (-25 * 3600, 1000),  # created over a day before T0: not counted
            "ftjob-run": (0, 300),  # active: counts its estimate
            "ftjob-done": (1, 200),  # succeeded: what it trained
            "ftjob-bad": (2, 0),  # failed validation: trained nothing
            "ftjob-stop": (3, 500),  # cancelled after some steps
            "ftjob-pre": (4, None),  # created before the estimate existed (r0004)
        }
        for job_id, (at, estimate) in made.items():
            await jobs.create(replace(job(job_id, at=at), estimated_tokens=estimate))
        await jobs.create(replace(job("ftjob-b", tenant="b"), estimated_tokens=4000))
        await jobs.transition("ftjob-done", "succeeded", ACTIVE, trained_tokens=200)
        await jobs.transition("ftjob-bad", "failed", ACTIVE, trained_tokens=None)
        await jobs.transition("ftjob-stop", "cancelled", ACTIVE, trained_tokens=40)
        await jobs.update("ftjob-pre", trained_tokens=7)
        day_ago = T0 - timedelta(days=1)
        assert await jobs.tokens_since("a", day_ago) == 300 + 200 + 40 + 7
        assert await jobs.tokens_since("b", day_ago) == 4000
        assert await jobs.tokens_since("a", T0 + timedelta(seconds=5)) == 0
        assert (await jobs.get("a", "ftjob-run")) == replace(job("ftjob-run"), estimated_tokens=300)

    in_store(state_spec, body)


def test_files_page_by_creation_time_then_id_both_ways(
    state_spec: StateSpec,  # noqa: F811
) -> None:
    async def body(store: StateStore) -> None:
        files = FileStore(store)
        # Two files share a creation time: the id orders them (no file skipped or repeated).
        for name, at, purpose in [
            ("file-a", 0, "fine-tune"),
            ("file-b", 1, "fine-tune"),
            ("file-c", 1, "fine-tune-results"),
            ("file-d", 2, "fine-tune"),
        ]:
            made = T0 + timedelta(seconds=at)
            await files.create(StoredFile(name, "a", purpose, "t", 1, f"a/{name}", made, 1))
        await files.create(StoredFile("file-z", "b", "fine-tune", "t", 1, "b/z", T0, 1))

        async def ids(after: str | None, order: Order, purpose: str | None = None) -> list:
            page = await files.list("a", purpose, after, 2, order)
            return [[f.id for f in page.files], page.has_more]

        assert await ids(None, "asc") == [["file-a", "file-b"], True]
        assert await ids("file-b", "asc") == [["file-c", "file-d"], False]
        assert await ids(None, "desc") == [["file-d", "file-c"], True]
        assert await ids("file-c", "desc") == [["file-b", "file-a"], False]
        assert await ids("file-c", "desc", "fine-tune") == [["file-b", "file-a"], False]
        assert await ids("file-a", "asc", "fine-tune") == [["file-b", "file-d"], False]
        with pytest.raises(UnknownCursorError):
            await files.list("a", None, "file-z", 2, "asc")  # another tenant's file

    in_store(state_spec, body)
