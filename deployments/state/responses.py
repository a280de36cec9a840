"""Stored Responses: the rows behind `store: true`, `previous_response_id` and cancel.

Every read and write names the tenant, and another tenant's id behaves exactly like a
missing one, so ids cannot be probed. A row whose `expires_at` has passed is invisible
at once, though only `purge` deletes it. A status leaves `in_progress` once: `complete`
and `cancel` both update only WHERE status = 'in_progress', so whichever lands first
wins and the other sees it lost. Database failures surface as StateError.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Integer, Row, Table, delete, insert, literal_column, select, update

from deployments.state.schema import ResponseRow
from deployments.state.store import StateStore
from deployments.state.stored import (
    BrokenChainError,
    StoredItem,
    StoredResponse,
    unavailable,
    visible,
)

RESPONSES = cast(Table, ResponseRow.__table__)  # declared as a FromClause
IN_CHUNK = 500  # ids per IN (...) list
FINISHED = frozenset({"completed", "incomplete", "failed", "cancelled"})


def _items(items: Sequence[StoredItem]) -> list[dict[str, Any]]:
    return [i.to_json() for i in items]


def _response(row: Row[Any]) -> StoredResponse:
    m = row._mapping
    return StoredResponse(
        id=m["id"], tenant=m["tenant"], model=m["model"], status=m["status"],
        created_at=m["created_at"], expires_at=m["expires_at"],
        previous_response_id=m["previous_response_id"], conversation_id=m["conversation_id"],
        body=dict(m["body"]),
        input_items=[StoredItem.from_json(d) for d in m["input_items"]],
        output_items=[StoredItem.from_json(d) for d in m["output_items"]],
        replica_id=m["replica_id"],
    )


class ResponseStore:
    """Stored responses over one StateStore."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    # ---- writes --------------------------------------------------------------------------
    async def create(self, resp: StoredResponse) -> None:
        """Insert a new response (usually in_progress, before generation starts)."""
        row = {
            "id": resp.id, "tenant": resp.tenant, "model": resp.model, "status": resp.status,
            "created_at": resp.created_at, "expires_at": resp.expires_at,
            "previous_response_id": resp.previous_response_id,
            "conversation_id": resp.conversation_id, "body": resp.body,
            "input_items": _items(resp.input_items), "output_items": _items(resp.output_items),
            "replica_id": resp.replica_id,
        }
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                await conn.execute(insert(RESPONSES), row)

    async def complete(
        self,
        tenant: str,
        response_id: str,
        *,
        status: str,
        body: dict[str, Any],
        output_items: Sequence[StoredItem],
        replica_id: str | None,
    ) -> bool:
        """Record how an in-progress response ended. False if it is no longer in
        progress (a cancel or fail_stale won), missing, or another tenant's. A cancelled
        one still takes its final cancelled state: the output it had when it stopped."""
        if status not in FINISHED:
            raise ValueError(f"complete: status must be one of {sorted(FINISHED)}, got {status!r}")
        c = RESPONSES.c
        open_states = ("in_progress", "cancelled") if status == "cancelled" else ("in_progress",)
        stmt = (
            update(RESPONSES)
            .where(c.tenant == tenant, c.id == response_id, c.status.in_(open_states))
            .values(status=status, body=body, output_items=_items(output_items),
                    replica_id=replica_id)
        )
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                return (await conn.execute(stmt)).rowcount > 0

    async def cancel(
        self, tenant: str, response_id: str, now: datetime | None = None
    ) -> StoredResponse | None:
        """Mark it cancelled if still in progress; the row as it is afterwards (the
        caller tells a cancel from an already finished one by its status), or None if
        not visible. The ingress generating it sees the cancel through `cancelled`."""
        now = now or datetime.now(UTC)
        c = RESPONSES.c
        mine = (c.tenant == tenant, c.id == response_id, visible(RESPONSES, now))
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                await conn.execute(
                    update(RESPONSES)
                    .where(*mine, c.status == "in_progress")
                    .values(status="cancelled")
                )
                row = (await conn.execute(select(RESPONSES).where(*mine))).first()
        return None if row is None else _response(row)

    async def delete(self, tenant: str, response_id: str, now: datetime | None = None) -> bool:
        """Delete a visible response. Responses that continued from it keep their link;
        their chains then raise BrokenChainError."""
        now = now or datetime.now(UTC)
        c = RESPONSES.c
        stmt = delete(RESPONSES).where(
            c.tenant == tenant, c.id == response_id, visible(RESPONSES, now)
        )
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                return (await conn.execute(stmt)).rowcount > 0

    async def fail_stale(self, older_than: datetime) -> int:
        """In-progress responses created before `older_than` become failed: the ingress
        generating them died. Returns how many."""
        c = RESPONSES.c
        stmt = (
            update(RESPONSES)
            .where(c.status == "in_progress", c.created_at < older_than)
            .values(status="failed")
        )
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                return int((await conn.execute(stmt)).rowcount)

    async def purge(self, now: datetime) -> int:
        """Delete the responses expired at `now`; returns how many."""
        c = RESPONSES.c
        stmt = delete(RESPONSES).where(c.expires_at.is_not(None), c.expires_at <= now)
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                return int((await conn.execute(stmt)).rowcount)

    # ---- reads ---------------------------------------------------------------------------
    async def get(self, tenant: str, response_id: str, now: datetime) -> StoredResponse | None:
        c = RESPONSES.c
        stmt = select(RESPONSES).where(
            c.tenant == tenant, c.id == response_id, visible(RESPONSES, now)
        )
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(stmt)).first()
        return None if row is None else _response(row)

    async def chain(
        self, tenant: str, response_id: str, now: datetime, max_depth: int = 1000
    ) -> list[StoredResponse] | None:
        """The response and its ancestors along previous_response_id, oldest first, in
        one recursive query. None if `response_id` is not visible; BrokenChainError if
        a link points at a response that is gone, expired or another tenant's. A chain
        longer than `max_depth` (also the guard against a cycle) is cut to its newest
        `max_depth` responses."""
        if max_depth < 1:
            raise ValueError(f"max_depth must be at least 1, got {max_depth}")
        c = RESPONSES.c
        mine = (c.tenant == tenant, visible(RESPONSES, now))
        # Inline literals: a bound int could reach PostgreSQL as smallint in one term and
        # integer in the other, which a recursive CTE refuses.
        zero, one = literal_column("0", Integer), literal_column("1", Integer)
        walk = (
            select(c.id, c.previous_response_id, zero.label("depth"))
            .where(c.id == response_id, *mine)
            .cte("chain", recursive=True)
        )
        walk = walk.union_all(
            select(c.id, c.previous_response_id, walk.c.depth + one)
            .join(walk, c.id == walk.c.previous_response_id)
            .where(*mine, walk.c.depth < max_depth - 1)
        )
        stmt = (
            select(RESPONSES)
            .join(walk, c.id == walk.c.id)
            .order_by(walk.c.depth.desc())
        )
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                rows = (await conn.execute(stmt)).all()
        if not rows:
            return None
        found = [_response(r) for r in rows]
        oldest = found[0]
        if oldest.previous_response_id is not None and len(found) < max_depth:
            raise BrokenChainError(oldest.previous_response_id)
        return found

    async def cancelled(self, ids: Sequence[str]) -> set[str]:
        """Which of these ids are cancelled (the ingress polls its in-flight ones)."""
        unique = list(dict.fromkeys(ids))
        found: set[str] = set()
        c = RESPONSES.c
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                for i in range(0, len(unique), IN_CHUNK):
                    stmt = select(c.id).where(
                        c.id.in_(unique[i : i + IN_CHUNK]), c.status == "cancelled"
                    )
                    found.update((await conn.execute(stmt)).scalars())
        return found

    async def latest_replica(
        self, tenant: str, conversation_id: str, now: datetime
    ) -> str | None:
        """The replica that served the conversation's newest visible response with one
        recorded: the one most likely to hold its prefix in cache."""
        c = RESPONSES.c
        stmt = (
            select(c.replica_id)
            .where(c.tenant == tenant, c.conversation_id == conversation_id,
                   visible(RESPONSES, now), c.replica_id.is_not(None))
            .order_by(c.created_at.desc())
            .limit(1)
        )
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                value = (await conn.execute(stmt)).scalar_one_or_none()
        return None if value is None else str(value)
