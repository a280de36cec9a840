"""Uploaded files' metadata (the bytes are the BlobStore's), scoped by tenant: every
lookup is by (tenant, id), so another tenant's id reads exactly like a missing one.
Database failures surface as StateError."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Row, Table, delete, insert, select

from deployments.state.keyset import keyset_page
from deployments.state.schema import FileRow
from deployments.state.store import StateStore
from deployments.state.stored import Order, unavailable

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
        only = [] if purpose is None else [c.purpose == purpose]
        scope, keys = [c.tenant == tenant], [c.created_at, c.id]
        rows, more = await keyset_page(self.store, FILES, scope, keys, after, limit, order, only)
        return FilePage([_file(r) for r in rows], more)

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
