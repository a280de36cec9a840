"""Stored responses and conversations on both backends (every state_spec test runs as
[sqlite] and [postgres]): round trips, tenant scoping, the previous_response_id chain,
expiry and purge, cancel races, item paging, and the 0002 migration."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, inspect, text

from deployments.state.config import StateSpec
from deployments.state.conversations import ConversationStore
from deployments.state.errors import StateError
from deployments.state.ledger import Ledger
from deployments.state.responses import ResponseStore
from deployments.state.schema import Base
from deployments.state.store import StateStore, alembic_config
from deployments.state.stored import (
    BrokenChainError,
    Page,
    StoredConversation,
    StoredItem,
    StoredResponse,
    UnknownCursorError,
    page,
)
from tests.state_fixtures import postgres_server, state_spec  # noqa: F401
from tests.state_helpers import HEAD, ledger_count, rec, revision, run

T = TypeVar("T")
NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def msg(item_id: str, role: str = "user", text_: str = "hi",
        token_ids: list[int] | None = None) -> StoredItem:
    item = {"type": "message", "id": item_id, "role": role, "status": "completed",
            "content": [{"type": "input_text" if role == "user" else "output_text",
                         "text": text_, "annotations": []}]}
    return StoredItem(item_id, item, token_ids)


def resp(rid: str, tenant: str = "a", prev: str | None = None, status: str = "in_progress",
         created: datetime = NOW, expires: datetime | None = None,
         conv: str | None = None) -> StoredResponse:
    return StoredResponse(
        id=rid, tenant=tenant, model="m1", status=status, created_at=created,
        expires_at=expires, previous_response_id=prev, conversation_id=conv,
        body={"id": rid, "object": "response", "status": status, "metadata": {"k": "v"}},
        input_items=[msg(f"msg_in_{rid}", text_=f"question {rid}")], output_items=[],
        replica_id=None,
    )


def conv(cid: str, tenant: str = "a", expires: datetime | None = None,
         metadata: dict[str, str] | None = None) -> StoredConversation:
    return StoredConversation(cid, tenant, NOW, expires, metadata or {})


Body = Callable[[StateStore, ResponseStore, ConversationStore], Awaitable[T]]


def with_stores(spec: StateSpec, body: Body[T]) -> T:
    async def go() -> T:
        store = await StateStore.open(spec)
        try:
            return await body(store, ResponseStore(store), ConversationStore(store))
        finally:
            await store.close()

    return run(go())


async def count(store: StateStore, table: str) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


# ---- responses -------------------------------------------------------------------------
def test_response_round_trip(state_spec: StateSpec) -> None:  # noqa: F811
    created = datetime(2025, 6, 1, 12, 0, 0, 123_456, tzinfo=UTC)
    original = StoredResponse(
        id="resp_1", tenant="a", model="m1", status="in_progress", created_at=created,
        expires_at=created + timedelta(days=30), previous_response_id="resp_0",
        conversation_id="conv_9",
        body={"id": "resp_1", "nested": {"list": [1, 2.5, None, True], "ü": "ok ✓"}},
        input_items=[msg("msg_a", text_="héllo"), msg("msg_b", "assistant", "yo", [1, 2, 3])],
        output_items=[], replica_id=None,
    )
    out = [msg("msg_out", "assistant", "answer", [7, 0, 65535, 151643])]

    async def body(_s: StateStore, r: ResponseStore, _c: ConversationStore) -> Any:
        await r.create(original)
        before = await r.get("a", "resp_1", NOW)
        done = await r.complete("a", "resp_1", status="completed",
                                body={"id": "resp_1", "status": "completed"},
                                output_items=out, replica_id="replica-7")
        again = await r.complete("a", "resp_1", status="failed", body={},
                                 output_items=[], replica_id=None)
        return before, done, again, await r.get("a", "resp_1", NOW)

    before, done, again, after = with_stores(state_spec, body)
    assert before == original
    assert before.created_at.tzinfo is not None
    assert (done, again) == (True, False)  # it left in_progress once
    assert after.status == "completed" and after.replica_id == "replica-7"
    assert after.body == {"id": "resp_1", "status": "completed"}
    assert after.output_items == out and after.output_items[0].token_ids == [7, 0, 65535, 151643]
    assert after.input_items == original.input_items


def test_other_tenant_sees_nothing(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(s: StateStore, r: ResponseStore, c: ConversationStore) -> Any:
        await r.create(resp("resp_1"))
        await r.create(resp("resp_2", prev="resp_1"))
        await c.create(conv("conv_1", metadata={"x": "1"}), [msg("msg_1"), msg("msg_2")])
        b = [
            await r.get("b", "resp_1", NOW),
            await r.chain("b", "resp_2", NOW),
            await r.cancel("b", "resp_1"),
            await r.delete("b", "resp_1"),
            await r.complete("b", "resp_1", status="completed", body={}, output_items=[],
                             replica_id="x"),
            await c.get("b", "conv_1", NOW),
            await c.update_metadata("b", "conv_1", {"y": "2"}, NOW),
            await c.delete("b", "conv_1"),
            await c.add_items("b", "conv_1", [msg("msg_3")], NOW),
            await c.list_items("b", "conv_1", NOW, None, 10, "asc"),
            await c.all_items("b", "conv_1", NOW),
            await c.get_item("b", "conv_1", "msg_1", NOW),
            await c.delete_item("b", "conv_1", "msg_1", NOW),
        ]
        a = (await r.get("a", "resp_1", NOW), await c.get("a", "conv_1", NOW),
             await c.all_items("a", "conv_1", NOW))
        return b, a, await count(s, "conversation_items")

    b, (resp_a, conv_a, items_a), n_items = with_stores(state_spec, body)
    assert b == [None, None, None, False, False, None, None, False, False, None, None, None,
                 False]
    assert resp_a is not None and resp_a.status == "in_progress"
    assert conv_a is not None and conv_a.metadata == {"x": "1"}
    assert [i.id for i in items_a] == ["msg_1", "msg_2"] and n_items == 2


def test_chain_oldest_first_in_one_query(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(s: StateStore, r: ResponseStore, _c: ConversationStore) -> Any:
        prev = None
        for i in range(1, 6):
            await r.create(resp(f"resp_{i}", prev=prev, status="completed",
                                created=NOW + i * HOUR))
            prev = f"resp_{i}"
        statements: list[str] = []

        @event.listens_for(s.engine.sync_engine, "before_cursor_execute")
        def seen(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
            if not statement.lstrip().upper().startswith("BEGIN"):  # SQLite's own BEGIN
                statements.append(statement)

        full = await r.chain("a", "resp_5", NOW)
        n = len(statements)
        event.remove(s.engine.sync_engine, "before_cursor_execute", seen)
        return (full, n, await r.chain("a", "resp_1", NOW),
                await r.chain("a", "resp_5", NOW, max_depth=3),
                await r.chain("a", "nope", NOW))

    full, statements, root, cut, missing = with_stores(state_spec, body)
    assert [x.id for x in full] == ["resp_1", "resp_2", "resp_3", "resp_4", "resp_5"]
    assert full[2].input_items == [msg("msg_in_resp_3", text_="question resp_3")]
    assert statements == 1
    assert [x.id for x in root] == ["resp_1"]
    assert [x.id for x in cut] == ["resp_3", "resp_4", "resp_5"]  # the newest max_depth
    assert missing is None


def test_broken_chain_names_the_missing_link(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(_s: StateStore, r: ResponseStore, _c: ConversationStore) -> Any:
        prev = None
        for i in range(1, 6):
            expires = NOW - HOUR if i == 2 else None  # resp_2 has expired
            await r.create(resp(f"resp_{i}", prev=prev, status="completed", expires=expires))
            prev = f"resp_{i}"
        await r.create(resp("resp_b", tenant="b", status="completed"))
        await r.create(resp("resp_x", prev="resp_b", status="completed"))  # a foreign link
        errors: list[str] = []
        assert await r.delete("a", "resp_3") is True
        for rid in ("resp_5", "resp_x", "resp_4", "resp_1"):
            try:
                got = await r.chain("a", rid, NOW)
                errors.append(f"ok:{[x.id for x in got or []]}")
            except BrokenChainError as exc:
                errors.append(exc.missing_id)
        return errors

    assert with_stores(state_spec, body) == ["resp_3", "resp_b", "resp_3", "ok:['resp_1']"]


def test_expired_chain_link(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(_s: StateStore, r: ResponseStore, _c: ConversationStore) -> Any:
        await r.create(resp("resp_1", status="completed", expires=NOW + HOUR))
        await r.create(resp("resp_2", prev="resp_1", status="completed"))
        alive = await r.chain("a", "resp_2", NOW)
        with pytest.raises(BrokenChainError) as err:
            await r.chain("a", "resp_2", NOW + HOUR)  # expires_at <= now: gone
        return alive, err.value.missing_id

    alive, missing = with_stores(state_spec, body)
    assert [x.id for x in alive] == ["resp_1", "resp_2"] and missing == "resp_1"


def test_expiry_hides_and_purge_deletes(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(s: StateStore, r: ResponseStore, c: ConversationStore) -> Any:
        await r.create(resp("resp_old", expires=NOW - HOUR))
        await r.create(resp("resp_edge", expires=NOW))
        await r.create(resp("resp_new", expires=NOW + HOUR))
        await r.create(resp("resp_forever"))
        await c.create(conv("conv_old", expires=NOW - HOUR), [msg("msg_o1"), msg("msg_o2")])
        await c.create(conv("conv_new", expires=NOW + HOUR), [msg("msg_n1")])
        await c.create(conv("conv_forever"), [msg("msg_f1")])
        hidden = [
            await r.get("a", "resp_old", NOW), await r.get("a", "resp_edge", NOW),
            await r.cancel("a", "resp_old", NOW), await r.delete("a", "resp_old", NOW),
            await c.get("a", "conv_old", NOW), await c.all_items("a", "conv_old", NOW),
            await c.list_items("a", "conv_old", NOW, None, 5, "asc"),
            await c.get_item("a", "conv_old", "msg_o1", NOW),
            await c.delete_item("a", "conv_old", "msg_o1", NOW),
            await c.add_items("a", "conv_old", [msg("msg_o3")], NOW),
            await c.update_metadata("a", "conv_old", {"k": "v"}, NOW),
            await c.delete("a", "conv_old", NOW),
        ]
        still = (await r.get("a", "resp_new", NOW), await r.get("a", "resp_forever", NOW),
                 await c.get("a", "conv_new", NOW))
        purged = (await r.purge(NOW), await c.purge(NOW))
        left = (await count(s, "responses"), await count(s, "conversations"),
                await count(s, "conversation_items"))
        again = (await r.purge(NOW), await c.purge(NOW))
        later = (await r.purge(NOW + 2 * HOUR), await c.purge(NOW + 2 * HOUR))
        items = await c.all_items("a", "conv_forever", NOW + 2 * HOUR)
        return hidden, still, purged, left, again, later, items

    hidden, still, purged, left, again, later, items = with_stores(state_spec, body)
    assert hidden == [None, None, None, False, None, None, None, None, False, False, None,
                      False]
    assert all(x is not None for x in still)
    assert purged == (2, 1)  # resp_old and resp_edge; conv_old
    assert left == (2, 2, 2)  # its two items went with it
    assert again == (0, 0)
    assert later == (1, 1)
    assert [i.id for i in items] == ["msg_f1"]


def test_cancel_wins_over_complete(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(_s: StateStore, r: ResponseStore, _c: ConversationStore) -> Any:
        await r.create(resp("resp_1"))
        await r.create(resp("resp_2"))
        await r.create(resp("resp_3", status="completed"))
        cancelled = await r.cancel("a", "resp_1")
        completed = await r.complete("a", "resp_1", status="completed", body={"late": True},
                                     output_items=[msg("msg_late", "assistant")],
                                     replica_id="r9")
        after = await r.get("a", "resp_1", NOW)
        finished = await r.cancel("a", "resp_3")  # already finished: returned unchanged
        polled = await r.cancelled(["resp_1", "resp_2", "resp_3", "nope", "resp_1"])
        many = await r.cancelled([f"resp_{i}" for i in range(1200)])  # 3 IN chunks
        # The generating ingress then records what it had when it stopped.
        kept = await r.complete("a", "resp_1", status="cancelled", body={"status": "cancelled"},
                                output_items=[msg("msg_part", "assistant")], replica_id="r1")
        final = await r.get("a", "resp_1", NOW)
        return cancelled, completed, after, finished, polled, many, kept, final

    cancelled, completed, after, finished, polled, many, kept, final = with_stores(
        state_spec, body
    )
    assert cancelled is not None and cancelled.status == "cancelled"
    assert completed is False
    assert after.status == "cancelled" and after.output_items == [] and after.replica_id is None
    assert after.body["status"] == "in_progress"  # the body is the caller's to rewrite
    assert finished is not None and finished.status == "completed"
    assert polled == {"resp_1"} and many == {"resp_1"}
    assert kept is True and final.status == "cancelled" and final.replica_id == "r1"
    assert [i.id for i in final.output_items] == ["msg_part"]


def test_complete_rejects_in_progress_status(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(_s: StateStore, r: ResponseStore, _c: ConversationStore) -> None:
        with pytest.raises(ValueError, match="status must be one of"):
            await r.complete("a", "resp_1", status="in_progress", body={}, output_items=[],
                             replica_id=None)

    with_stores(state_spec, body)


def test_fail_stale(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(_s: StateStore, r: ResponseStore, _c: ConversationStore) -> Any:
        await r.create(resp("resp_dead", created=NOW - 2 * HOUR))
        await r.create(resp("resp_dead2", tenant="b", created=NOW - 2 * HOUR))
        await r.create(resp("resp_live", created=NOW))
        await r.create(resp("resp_done", status="completed", created=NOW - 2 * HOUR))
        failed = await r.fail_stale(NOW - HOUR)
        again = await r.fail_stale(NOW - HOUR)
        statuses = [(await r.get(t, i, NOW)) for t, i in
                    [("a", "resp_dead"), ("b", "resp_dead2"), ("a", "resp_live"),
                     ("a", "resp_done")]]
        late = await r.complete("a", "resp_dead", status="completed", body={},
                                output_items=[], replica_id=None)
        return failed, again, [s.status if s else None for s in statuses], late

    assert with_stores(state_spec, body) == (
        2, 0, ["failed", "failed", "in_progress", "completed"], False)


def test_latest_replica(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(_s: StateStore, r: ResponseStore, _c: ConversationStore) -> Any:
        for i, replica in enumerate(["r1", "r2", None]):
            await r.create(resp(f"resp_{i}", conv="conv_1", created=NOW + i * HOUR))
            if replica is not None:
                await r.complete("a", f"resp_{i}", status="completed", body={},
                                 output_items=[], replica_id=replica)
        await r.create(resp("resp_b", tenant="b", conv="conv_1", created=NOW + 9 * HOUR))
        await r.complete("b", "resp_b", status="completed", body={}, output_items=[],
                         replica_id="rb")
        return (await r.latest_replica("a", "conv_1", NOW), await r.latest_replica("a", "x", NOW),
                await r.latest_replica("c", "conv_1", NOW))

    assert with_stores(state_spec, body) == ("r2", None, None)


# ---- conversations ---------------------------------------------------------------------
def ids(p: Page | None) -> tuple[list[str], bool]:
    assert p is not None
    return [i.id for i in p.items], p.has_more


def test_conversation_items_paging(state_spec: StateSpec) -> None:  # noqa: F811
    first = [msg(f"msg_{i}") for i in range(3)]
    more = [msg(f"msg_{i}", "assistant", f"reply {i}", [i, i + 1]) for i in range(3, 7)]

    async def body(_s: StateStore, _r: ResponseStore, c: ConversationStore) -> Any:
        await c.create(conv("conv_1", metadata={"topic": "x"}), first)
        await c.create(conv("conv_2"), [msg("msg_other")])
        assert await c.add_items("a", "conv_1", more, NOW + HOUR) is True
        assert await c.add_items("a", "conv_1", [], NOW) is True
        pages = [
            await c.list_items("a", "conv_1", NOW, None, 3, "asc"),
            await c.list_items("a", "conv_1", NOW, "msg_2", 3, "asc"),
            await c.list_items("a", "conv_1", NOW, "msg_5", 3, "asc"),
            await c.list_items("a", "conv_1", NOW, "msg_6", 3, "asc"),
            await c.list_items("a", "conv_1", NOW, None, 3, "desc"),
            await c.list_items("a", "conv_1", NOW, "msg_4", 3, "desc"),
            await c.list_items("a", "conv_1", NOW, "msg_1", 3, "desc"),
            await c.list_items("a", "conv_1", NOW, None, 7, "asc"),
            await c.list_items("a", "conv_1", NOW, None, 100, "desc"),
        ]
        errors = []
        for after in ("msg_nope", "msg_other"):  # unknown, and another conversation's
            with pytest.raises(UnknownCursorError) as err:
                await c.list_items("a", "conv_1", NOW, after, 3, "asc")
            errors.append(err.value.after)
        everything = await c.all_items("a", "conv_1", NOW)
        updated = await c.update_metadata("a", "conv_1", {"topic": "y", "n": "2"}, NOW)
        return pages, errors, everything, updated

    pages, errors, everything, updated = with_stores(state_spec, body)
    assert [ids(p) for p in pages] == [
        (["msg_0", "msg_1", "msg_2"], True),
        (["msg_3", "msg_4", "msg_5"], True),
        (["msg_6"], False),
        ([], False),
        (["msg_6", "msg_5", "msg_4"], True),
        (["msg_3", "msg_2", "msg_1"], True),
        (["msg_0"], False),
        ([f"msg_{i}" for i in range(7)], False),
        ([f"msg_{i}" for i in range(6, -1, -1)], False),
    ]
    assert errors == ["msg_nope", "msg_other"]
    assert everything == first + more
    assert everything[4].token_ids == [4, 5] and everything[0].token_ids is None
    assert updated is not None and updated.metadata == {"topic": "y", "n": "2"}


def test_many_items_keep_their_order(state_spec: StateSpec) -> None:  # noqa: F811
    batch = [msg(f"msg_{i:04d}") for i in range(300)]

    async def body(_s: StateStore, _r: ResponseStore, c: ConversationStore) -> Any:
        await c.create(conv("conv_1"), batch[:100])
        await c.add_items("a", "conv_1", batch[100:], NOW)
        return await c.all_items("a", "conv_1", NOW)

    assert with_stores(state_spec, body) == batch


def test_get_and_delete_item(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(s: StateStore, _r: ResponseStore, c: ConversationStore) -> Any:
        await c.create(conv("conv_1"), [msg("msg_1"), msg("msg_2", "assistant", "x", [9])])
        await c.create(conv("conv_2"), [msg("msg_3")])
        got = await c.get_item("a", "conv_1", "msg_2", NOW)
        wrong_conv = await c.get_item("a", "conv_2", "msg_2", NOW)
        deleted = (await c.delete_item("a", "conv_2", "msg_1", NOW),  # not its item
                   await c.delete_item("a", "conv_1", "msg_1", NOW),
                   await c.delete_item("a", "conv_1", "msg_1", NOW))
        left = ids(await c.list_items("a", "conv_1", NOW, None, 10, "asc"))
        gone = await c.get_item("a", "conv_1", "msg_1", NOW)
        whole = (await c.delete("a", "conv_1"), await c.delete("a", "conv_1"))
        return got, wrong_conv, deleted, left, gone, whole, await count(s, "conversation_items")

    got, wrong_conv, deleted, left, gone, whole, n_items = with_stores(state_spec, body)
    assert got == msg("msg_2", "assistant", "x", [9])
    assert wrong_conv is None and gone is None
    assert deleted == (False, True, False)
    assert left == (["msg_2"], False)
    assert whole == (True, False)
    assert n_items == 1  # conv_2's item only


def test_page_function() -> None:
    items = [msg(f"msg_{i}") for i in range(5)]
    assert ids(page(items, None, 2, "asc")) == (["msg_0", "msg_1"], True)
    assert ids(page(items, "msg_1", 2, "asc")) == (["msg_2", "msg_3"], True)
    assert ids(page(items, "msg_2", 2, "asc")) == (["msg_3", "msg_4"], False)
    assert ids(page(items, "msg_4", 2, "asc")) == ([], False)
    assert ids(page(items, None, 2, "desc")) == (["msg_4", "msg_3"], True)
    assert ids(page(items, "msg_2", 5, "desc")) == (["msg_1", "msg_0"], False)
    assert ids(page([], None, 20, "asc")) == ([], False)
    with pytest.raises(UnknownCursorError) as err:
        page(items, "msg_9", 2, "asc")
    assert err.value.after == "msg_9" and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="limit"):
        page(items, None, 0, "asc")


# ---- migrations and failures -----------------------------------------------------------
def test_fresh_db_matches_the_models(state_spec: StateSpec) -> None:  # noqa: F811
    """The hand-written migrations build exactly the tables schema.py declares."""

    async def body(s: StateStore, _r: ResponseStore, _c: ConversationStore) -> Any:
        async with s.engine.connect() as conn:
            diff = await conn.run_sync(lambda c: compare_metadata(
                MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata))
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        return await revision(s), diff, tables

    rev, diff, tables = with_stores(state_spec, body)
    assert rev == [HEAD] == ["0005"]
    assert diff == []
    expected = {"responses", "conversations", "conversation_items", "ledger", "adapters", "files"}
    assert expected <= tables


def test_0001_database_upgrades_keeping_the_ledger(state_spec: StateSpec) -> None:  # noqa: F811
    command.upgrade(alembic_config(state_spec.url), "0001")

    async def go() -> tuple[list[str], int, StoredResponse | None]:
        old = StateStore.connect(state_spec)  # unchecked: the schema is at 0001
        try:
            assert await revision(old) == ["0001"]
            assert await Ledger(old).write([rec("r1"), rec("r2")]) == 2
        finally:
            await old.close()
        with pytest.raises(StateError, match="revision 0001, this Tiered needs 0005"):
            await StateStore.open(state_spec.model_copy(update={"migrate": False}))
        store = await StateStore.open(state_spec)
        try:
            await ResponseStore(store).create(resp("resp_1"))
            return (await revision(store), await ledger_count(store),
                    await ResponseStore(store).get("a", "resp_1", NOW))
        finally:
            await store.close()

    rev, ledger_rows, stored = run(go())
    assert rev == ["0005"] and ledger_rows == 2
    assert stored is not None and stored.id == "resp_1"


def test_downgrade_to_0001_then_upgrade(state_spec: StateSpec) -> None:  # noqa: F811
    cfg = alembic_config(state_spec.url)
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "0001")

    async def tables() -> set[str]:
        store = StateStore.connect(state_spec)
        try:
            async with store.engine.connect() as conn:
                return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        finally:
            await store.close()

    down = run(tables())
    assert "responses" not in down and "conversation_items" not in down and "ledger" in down
    command.upgrade(cfg, "head")
    assert {"responses", "conversations", "conversation_items"} <= run(tables())


def test_database_down_is_a_state_error() -> None:
    spec = StateSpec(url="postgresql+psycopg://u:hunter2@127.0.0.1:1/db", connect_timeout_s=2)

    async def go() -> list[str]:
        store = StateStore.connect(spec)
        messages = []
        try:
            for call in (lambda: ResponseStore(store).get("a", "resp_1", NOW),
                         lambda: ResponseStore(store).cancelled(["resp_1"]),
                         lambda: ConversationStore(store).add_items("a", "c", [], NOW)):
                with pytest.raises(StateError) as err:
                    await call()
                messages.append(str(err.value))
        finally:
            await store.close()
        return messages

    for message in run(go()):
        assert message.startswith("state store postgresql+psycopg://u:***@127.0.0.1:1/db: ")
        assert "hunter2" not in message and "\n" not in message
