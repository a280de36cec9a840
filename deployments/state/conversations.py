"""Stored Conversations and their items, in the order they were added.

Same rules as the responses: every call names the tenant, another tenant's id is a
missing one, and an expired conversation (with its items) is invisible until `purge`
deletes it. Items are ordered by `seq`, assigned at insert; the API pages by item id.
Items are deleted explicitly with their conversation: the foreign key's cascade only
acts on PostgreSQL (SQLite leaves foreign keys off). Database failures: StateError.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Row, Table, delete, exists, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from deployments.state.schema import ConversationItemRow, ConversationRow
from deployments.state.store import StateStore
from deployments.state.stored import (
    Order,
    Page,
    StoredConversation,
    StoredItem,
    UnknownCursorError,
    unavailable,
    visible,
)

CONVERSATIONS = cast(Table, ConversationRow.__table__)  # declared as a FromClause
ITEMS = cast(Table, ConversationItemRow.__table__)  # declared as a FromClause


def _conversation(row: Row[Any]) -> StoredConversation:
    m = row._mapping
    return StoredConversation(
        id=m["id"], tenant=m["tenant"], created_at=m["created_at"],
        expires_at=m["expires_at"], metadata=dict(m["metadata"]),
    )


def _item(row: Row[Any]) -> StoredItem:
    m = row._mapping
    ids = m["token_ids"]
    return StoredItem(m["id"], dict(m["item"]), None if ids is None else list(ids))


def _item_rows(
    tenant: str, conv_id: str, items: Sequence[StoredItem], now: datetime
) -> list[dict[str, Any]]:
    return [
        {"id": i.id, "conversation_id": conv_id, "tenant": tenant, "created_at": now,
         "item": i.item, "token_ids": i.token_ids}
        for i in items
    ]


class ConversationStore:
    """Conversations over one StateStore."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    # ---- conversations -------------------------------------------------------------------
    async def create(self, conv: StoredConversation, items: Sequence[StoredItem]) -> None:
        """The conversation and its first items, in one transaction."""
        row = {"id": conv.id, "tenant": conv.tenant, "created_at": conv.created_at,
               "expires_at": conv.expires_at, "metadata": conv.metadata}
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                await conn.execute(insert(CONVERSATIONS), row)
                await self._insert_items(conn, conv.tenant, conv.id, items, conv.created_at)

    async def get(self, tenant: str, conv_id: str, now: datetime) -> StoredConversation | None:
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(
                    select(CONVERSATIONS).where(*self._mine(tenant, conv_id, now))
                )).first()
        return None if row is None else _conversation(row)

    async def update_metadata(
        self, tenant: str, conv_id: str, metadata: dict[str, str], now: datetime
    ) -> StoredConversation | None:
        """Replace the metadata (as OpenAI's update does); the conversation after, or None."""
        mine = self._mine(tenant, conv_id, now)
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                await conn.execute(update(CONVERSATIONS).where(*mine).values(metadata=metadata))
                row = (await conn.execute(select(CONVERSATIONS).where(*mine))).first()
        return None if row is None else _conversation(row)

    async def delete(self, tenant: str, conv_id: str, now: datetime | None = None) -> bool:
        """Delete a visible conversation and its items; False if not visible."""
        now = now or datetime.now(UTC)
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                gone = await conn.execute(
                    delete(CONVERSATIONS).where(*self._mine(tenant, conv_id, now))
                )
                if gone.rowcount == 0:
                    return False
                await conn.execute(delete(ITEMS).where(ITEMS.c.conversation_id == conv_id))
                return True

    async def purge(self, now: datetime) -> int:
        """Delete the conversations expired at `now`, items first; returns how many."""
        c = CONVERSATIONS.c
        expired = (c.expires_at.is_not(None), c.expires_at <= now)
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                await conn.execute(delete(ITEMS).where(
                    ITEMS.c.conversation_id.in_(select(c.id).where(*expired))
                ))
                return int((await conn.execute(delete(CONVERSATIONS).where(*expired))).rowcount)

    # ---- items ---------------------------------------------------------------------------
    async def add_items(
        self, tenant: str, conv_id: str, items: Sequence[StoredItem], now: datetime
    ) -> bool:
        """Append items, in the given order, after the existing ones (one transaction).
        False if the conversation is not visible. On PostgreSQL the conversation row is
        share-locked, so a concurrent delete waits instead of orphaning the items."""
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                found = (await conn.execute(
                    select(CONVERSATIONS.c.id)
                    .where(*self._mine(tenant, conv_id, now))
                    .with_for_update(read=True)
                )).first()
                if found is None:
                    return False
                await self._insert_items(conn, tenant, conv_id, items, now)
                return True

    async def list_items(
        self,
        tenant: str,
        conv_id: str,
        now: datetime,
        after: str | None,
        limit: int,
        order: Order,
    ) -> Page | None:
        """Up to `limit` items after the item `after` in `order`. None if the
        conversation is not visible; UnknownCursorError if `after` is not one of its
        items; ValueError for limit < 1."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        i = ITEMS.c
        stmt = select(ITEMS).where(i.conversation_id == conv_id, i.tenant == tenant)
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                if not await self._visible(conn, tenant, conv_id, now):
                    return None
                if after is not None:
                    seq = (await conn.execute(select(i.seq).where(
                        i.id == after, i.conversation_id == conv_id, i.tenant == tenant
                    ))).scalar_one_or_none()
                    if seq is None:
                        raise UnknownCursorError(after)
                    stmt = stmt.where(i.seq > seq if order == "asc" else i.seq < seq)
                stmt = stmt.order_by(i.seq.asc() if order == "asc" else i.seq.desc())
                rows = (await conn.execute(stmt.limit(limit + 1))).all()
        return Page([_item(r) for r in rows[:limit]], len(rows) > limit)

    async def all_items(
        self, tenant: str, conv_id: str, now: datetime
    ) -> list[StoredItem] | None:
        """Every item, oldest first (a turn's history); None if not visible."""
        i = ITEMS.c
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                if not await self._visible(conn, tenant, conv_id, now):
                    return None
                rows = (await conn.execute(
                    select(ITEMS)
                    .where(i.conversation_id == conv_id, i.tenant == tenant)
                    .order_by(i.seq)
                )).all()
        return [_item(r) for r in rows]

    async def get_item(
        self, tenant: str, conv_id: str, item_id: str, now: datetime
    ) -> StoredItem | None:
        with unavailable(self.store):
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(
                    select(ITEMS).where(*self._item_mine(tenant, conv_id, item_id, now))
                )).first()
        return None if row is None else _item(row)

    async def delete_item(
        self, tenant: str, conv_id: str, item_id: str, now: datetime
    ) -> bool:
        """Delete one item of a visible conversation; False if there is none such."""
        with unavailable(self.store):
            async with self.store.engine.begin() as conn:
                gone = await conn.execute(
                    delete(ITEMS).where(*self._item_mine(tenant, conv_id, item_id, now))
                )
                return gone.rowcount > 0

    # ---- helpers -------------------------------------------------------------------------
    @staticmethod
    def _mine(tenant: str, conv_id: str, now: datetime) -> tuple[Any, ...]:
        c = CONVERSATIONS.c
        return (c.id == conv_id, c.tenant == tenant, visible(CONVERSATIONS, now))

    def _item_mine(
        self, tenant: str, conv_id: str, item_id: str, now: datetime
    ) -> tuple[Any, ...]:
        """This item, of this tenant's conversation, while the conversation is visible."""
        i = ITEMS.c
        conv_visible = exists().where(*self._mine(tenant, conv_id, now))
        return (i.id == item_id, i.conversation_id == conv_id, i.tenant == tenant, conv_visible)

    async def _visible(
        self, conn: AsyncConnection, tenant: str, conv_id: str, now: datetime
    ) -> bool:
        found = await conn.execute(
            select(CONVERSATIONS.c.id).where(*self._mine(tenant, conv_id, now))
        )
        return found.first() is not None

    @staticmethod
    async def _insert_items(
        conn: AsyncConnection,
        tenant: str,
        conv_id: str,
        items: Sequence[StoredItem],
        now: datetime,
    ) -> None:
        """One executemany: rows take `seq` in the order given, on both dialects."""
        if items:
            await conn.execute(insert(ITEMS), _item_rows(tenant, conv_id, items, now))
