"""Uploaded files' metadata (the bytes are the BlobStore's), scoped by tenant: every
lookup is by (tenant, id), so another tenant's id reads exactly like a missing one.
Database failures surface as StateError."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row, Table, delete, insert, select

from deployments.state.schema import FileRow
from deployments.state.store import StateStore
from deployments.state.stored import Order, UnknownCursorError, unavailable

FILES = cast(Table, FileRow.__table__)


@dataclass(frozen=True)
class StoredFile:
    id: str  # "file-…"
    tenant: str
    purpose: str
    filename: str
    bytes: int
    path: str  # the BlobStore key
    created_at: datetime
    examples: int


@dataclass(frozen=True)
class FilePage:
    files: list[StoredFile]
    has_more: bool


def _file(row: Row[Any]) -> StoredFile:
    m = row._mapping
    return StoredFile(
        id=m["id"],
        tenant=m["tenant"],
        purpose=m["purpose"],
        filename=m["filename"],
        bytes=m["bytes"],
        path=m["path"],
        created_at=m["created_at"],
        examples=m["examples"],
    )


class FileStore:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    async def create(self, stored: StoredFile) -> None:
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                await conn.execute(insert(FILES), [stored.__dict__])

    async def get(self, tenant: str, file_id: str) -> StoredFile | None:
        c = FILES.c
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                row = (
                    await conn.execute(select(FILES).where(c.id == file_id, c.tenant == tenant))
                ).first()
        return None if row is None else _file(row)

    async def list(
        self, tenant: str, purpose: str | None, after: str | None, limit: int, order: Order
    ) -> FilePage:
        """Up to `limit` files after the file `after`, by creation time (then id) in
        `order`; UnknownCursorError if `after` is not one of the tenant's files."""
        c = FILES.c
        stmt = select(FILES).where(c.tenant == tenant)
        if purpose is not None:
            stmt = stmt.where(c.purpose == purpose)
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                if after is not None:
                    cursor = (
                        await conn.execute(
                            select(c.created_at, c.id).where(c.id == after, c.tenant == tenant)
                        )
                    ).first()
                    if cursor is None:
                        raise UnknownCursorError(after)
                    key, at = (c.created_at, c.id), (cursor[0], cursor[1])
                    stmt = stmt.where(
                        (key[0] > at[0]) | ((key[0] == at[0]) & (key[1] > at[1]))
                        if order == "asc"
                        else (key[0] < at[0]) | ((key[0] == at[0]) & (key[1] < at[1]))
                    )
                if order == "asc":
                    stmt = stmt.order_by(c.created_at.asc(), c.id.asc())
                else:
                    stmt = stmt.order_by(c.created_at.desc(), c.id.desc())
                rows = (await conn.execute(stmt.limit(limit + 1))).all()
        return FilePage([_file(r) for r in rows[:limit]], len(rows) > limit)

    async def delete(self, tenant: str, file_id: str) -> StoredFile | None:
        """Remove the row; the file as it was, or None if the tenant has no such file."""
        c = FILES.c
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                row = (
                    await conn.execute(select(FILES).where(c.id == file_id, c.tenant == tenant))
                ).first()
                if row is None:
                    return None
                await conn.execute(delete(FILES).where(c.id == file_id))
        return _file(row)
