"""Keyset paging of a table's rows, the lists the Files and Fine-tuning APIs page: rows in
the order of key columns that are unique together, the next page starting after the row
whose id the client sends as `after`. One indexed range read per page, however deep."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Row, Table, literal, select, tuple_

from deployments.state.store import StateStore
from deployments.state.stored import Order, UnknownCursorError, unavailable


async def keyset_page(
    store: StateStore,
    table: Table,
    scope: Sequence[ColumnElement[bool]],
    keys: Sequence[Any],
    after: str | None,
    limit: int,
    order: Order = "desc",
    filters: Sequence[ColumnElement[bool]] = (),
) -> tuple[list[Row[Any]], bool]:
    """Up to `limit` rows within `scope` (and `filters`) in `keys` order, after the row
    with id `after`; and whether more follow. UnknownCursorError if no row within `scope`
    has that id (another tenant's included); `filters` narrow the page, not the cursor."""
    stmt = select(table).where(*scope, *filters)
    with unavailable(store):
        async with store.engine.connect() as conn:
            if after is not None:
                at = (await conn.execute(select(*keys).where(table.c.id == after, *scope))).first()
                if at is None:
                    raise UnknownCursorError(after)
                # Row values compared as one: (a, b) < (x, y). Bound with each key's type.
                row = tuple_(*keys)
                cursor = tuple_(*(literal(v, k.type) for k, v in zip(keys, at, strict=True)))
                stmt = stmt.where(row > cursor if order == "asc" else row < cursor)
            ordered = [k.asc() if order == "asc" else k.desc() for k in keys]
            rows = (await conn.execute(stmt.order_by(*ordered).limit(limit + 1))).all()
    return list(rows[:limit]), len(rows) > limit
