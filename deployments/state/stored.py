"""What the Responses and Conversations stores hand out: plain frozen values, no ORM rows,
so callers cannot lazily touch the database. Also the pure list paging the API shares
with the SQL paging of conversation items, and the stores' database-error translation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, Table, or_
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from deployments.state.config import parse_url
from deployments.state.errors import StateError
from deployments.state.store import StateStore, short_reason

Order = Literal["asc", "desc"]


@dataclass(frozen=True)
class StoredItem:
    """One OpenAI item as the API returns it, with the ids the model sampled for an
    assistant item made here (the prompt cache then matches token for token)."""

    id: str  # "msg_…"
    item: dict[str, Any]
    token_ids: list[int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "item": self.item, "token_ids": self.token_ids}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredItem:
        return cls(str(data["id"]), dict(data["item"]), data.get("token_ids"))


@dataclass(frozen=True)
class StoredResponse:
    id: str
    tenant: str
    model: str
    status: str  # in_progress | completed | incomplete | failed | cancelled
    created_at: datetime
    expires_at: datetime | None  # None: kept until deleted
    previous_response_id: str | None
    conversation_id: str | None
    body: dict[str, Any]  # the OpenAI Response object as last returned
    input_items: list[StoredItem]
    output_items: list[StoredItem]
    replica_id: str | None  # the model-server replica that served it (KV affinity)


@dataclass(frozen=True)
class StoredConversation:
    id: str
    tenant: str
    created_at: datetime
    expires_at: datetime | None
    metadata: dict[str, str]


@dataclass(frozen=True)
class Page:
    items: list[StoredItem]
    has_more: bool


class BrokenChainError(Exception):
    """A `previous_response_id` link points at a response that was deleted, expired or
    is not the tenant's: the history cannot be rebuilt. Not a StateError: the database
    is fine, the request is not (the API answers 400)."""

    def __init__(self, missing_id: str) -> None:
        super().__init__(f"response {missing_id!r} in the chain is missing")
        self.missing_id = missing_id


class UnknownCursorError(ValueError):
    """`after` names no item of the list being paged (the API answers 400)."""

    def __init__(self, after: str) -> None:
        super().__init__(f"no item with id {after!r} in this list")
        self.after = after


def page(items: list[StoredItem], after: str | None, limit: int, order: Order) -> Page:
    """`limit` items after the one with id `after` (in `order`; `items` are oldest first).
    Raises UnknownCursorError for an `after` not in `items`, ValueError for limit < 1."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if after is not None:
        for i, stored in enumerate(ordered):
            if stored.id == after:
                start = i + 1
                break
        else:
            raise UnknownCursorError(after)
    chosen = ordered[start : start + limit]
    return Page(list(chosen), start + limit < len(ordered))


def visible(table: Table, now: datetime) -> ColumnElement[bool]:
    """Not expired at `now` (expires_at None means never)."""
    return or_(table.c.expires_at.is_(None), table.c.expires_at > now)


@contextmanager
def unavailable(store: StateStore) -> Iterator[None]:
    """The database failing (down, locked, timing out) as a one-line StateError, which
    the API answers 503. An IntegrityError (a duplicate id) is a bug: it propagates."""
    try:
        yield
    except IntegrityError:
        raise
    except (DBAPIError, PoolTimeoutError, OSError) as exc:
        reason = short_reason(exc, parse_url(store.spec.url))
        raise StateError(f"state store {store.url}: {reason}") from None
