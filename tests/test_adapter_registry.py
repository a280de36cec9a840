"""The LoRA adapter registry on both backends: versions never repeat for a name (after
unload, failed loads and config changes alike), reservations stay invisible, one active
adapter per name even under concurrent loads, and config sync is idempotent."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from deployments.state.adapters import (
    Adapter,
    AdapterExistsError,
    AdapterRegistry,
    ConfiguredAdapterError,
    NewAdapter,
)
from deployments.state.config import StateSpec
from deployments.state.store import StateStore
from tests.state_fixtures import postgres_server, state_spec  # noqa: F401
from tests.state_helpers import run

T = TypeVar("T")
NOW = datetime(2025, 3, 10, tzinfo=UTC)
A1 = NewAdapter("sql-lora", "base", "/adapters/sql-v1")


def with_registry(spec: StateSpec, body: Callable[[AdapterRegistry], Awaitable[T]]) -> T:
    async def go() -> T:
        store = await StateStore.open(spec)
        try:
            return await body(AdapterRegistry(store))
        finally:
            await store.close()

    return run(go())


async def load(reg: AdapterRegistry, new: NewAdapter = A1) -> Adapter:
    return await reg.activate(await reg.reserve(new, "api", NOW), NOW)


def test_load_unload_reload_takes_a_new_version(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(reg: AdapterRegistry) -> Any:
        first = await load(reg)
        got = await reg.get("sql-lora")
        gone = await reg.unload("sql-lora", NOW + timedelta(seconds=1))
        after = await reg.get("sql-lora"), await reg.unload("sql-lora")
        again = await load(reg, NewAdapter("sql-lora", "base", "/adapters/sql-v2", ("acme",)))
        return first, got, gone, after, again, await reg.active()

    first, got, gone, after, again, active = with_registry(state_spec, body)
    assert first.version == 1 and got == first and first.loaded_at == NOW
    assert got.tenants == () and got.source == "api" and got.may_serve("anyone")
    assert gone is not None and gone.unloaded_at == NOW + timedelta(seconds=1)
    assert after == (None, None)
    assert again.version == 2 and again.path == "/adapters/sql-v2"
    assert again.may_serve("acme") and not again.may_serve("globex")
    assert active == [again]


def test_reservation_is_invisible_and_a_failed_one_burns_its_version(
    state_spec: StateSpec,  # noqa: F811
) -> None:
    async def body(reg: AdapterRegistry) -> Any:
        reserved = await reg.reserve(A1, "api", NOW)
        hidden = await reg.get("sql-lora"), await reg.active()
        await reg.discard(reserved, NOW)
        return reserved, hidden, await load(reg)

    reserved, hidden, loaded = with_registry(state_spec, body)
    assert reserved.version == 1 and reserved.loaded_at is None
    assert hidden == (None, [])
    assert loaded.version == 2  # the failed version 1 is never used again


def test_loading_a_loaded_name_is_refused(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(reg: AdapterRegistry) -> Any:
        await load(reg)
        with pytest.raises(AdapterExistsError, match="sql-lora"):
            await reg.reserve(A1, "api", NOW)
        return await reg.active()

    assert [a.version for a in with_registry(state_spec, body)] == [1]


def test_concurrent_loads_of_one_name_one_wins(state_spec: StateSpec) -> None:  # noqa: F811
    """Both reserve (distinct versions); the second to activate loses and is retired."""

    async def body(reg: AdapterRegistry) -> Any:
        a, b = await asyncio.gather(reg.reserve(A1, "api", NOW), reg.reserve(A1, "api", NOW))
        won = await reg.activate(b, NOW)
        with pytest.raises(AdapterExistsError):
            await reg.activate(a, NOW)
        await reg.unload("sql-lora", NOW)
        return {a.version, b.version}, won, await load(reg)

    versions, won, next_one = with_registry(state_spec, body)
    assert versions == {1, 2} and won.version in versions
    assert next_one.version == 3


def test_one_active_row_per_name_is_a_database_invariant(state_spec: StateSpec) -> None:  # noqa: F811
    """The partial unique index refuses a second active row written behind the registry."""

    async def body(reg: AdapterRegistry) -> None:
        await load(reg)
        async with reg.store.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO adapters (name, version, base_model, path, tenants, source, "
                    "created_at, loaded_at) VALUES ('sql-lora', 9, 'base', '/x', '[]', 'api', "
                    ":now, :now)"
                ),
                {"now": NOW},
            )

    with pytest.raises(IntegrityError):
        with_registry(state_spec, body)


def test_config_sync_is_idempotent_and_versions_changes(state_spec: StateSpec) -> None:  # noqa: F811
    cfg = [A1, NewAdapter("chat-lora", "base", "s3://bucket/chat", ("acme",))]

    async def body(reg: AdapterRegistry) -> Any:
        api = await load(reg, NewAdapter("hot", "base", "/adapters/hot"))
        await asyncio.gather(reg.sync_config(cfg, NOW), reg.sync_config(cfg, NOW))
        first = {a.name: a for a in await reg.active()}
        await reg.sync_config(cfg, NOW)
        same = {a.name: a for a in await reg.active()}
        await reg.sync_config(
            [
                NewAdapter("sql-lora", "base", "/adapters/sql-v2"),  # new path: new version
                NewAdapter("chat-lora", "base", "s3://bucket/chat", ("acme", "globex")),
            ],
            NOW,
        )
        changed = {a.name: a for a in await reg.active()}
        await reg.sync_config([A1], NOW)  # chat-lora left the config: unloaded
        last = {a.name: a for a in await reg.active()}
        return api, first, same, changed, last

    api, first, same, changed, last = with_registry(state_spec, body)
    assert set(first) == {"hot", "sql-lora", "chat-lora"} and first["hot"] == api
    assert first["sql-lora"].source == "config" and first["sql-lora"].version == 1
    assert same == first
    assert changed["sql-lora"].version == 2 and changed["sql-lora"].path == "/adapters/sql-v2"
    assert changed["chat-lora"].version == 1  # tenants changed in place
    assert changed["chat-lora"].tenants == ("acme", "globex")
    assert set(last) == {"hot", "sql-lora"}
    assert last["sql-lora"].version == 3 and last["sql-lora"].path == A1.path
    assert last["hot"] == api  # an API-loaded adapter is not the config's to unload


def test_config_takes_over_an_api_adapter_of_the_same_name(state_spec: StateSpec) -> None:  # noqa: F811
    async def body(reg: AdapterRegistry) -> Any:
        await load(reg)
        await reg.sync_config([NewAdapter("sql-lora", "base", A1.path, ("acme",))], NOW)
        adopted = await reg.get("sql-lora")
        with pytest.raises(ConfiguredAdapterError, match="sql-lora"):
            await reg.unload("sql-lora")  # the config's now: only a config change removes it
        await reg.sync_config([], NOW)
        return adopted, await reg.get("sql-lora")

    adopted, after = with_registry(state_spec, body)
    assert adopted is not None and adopted.version == 1 and adopted.source == "config"
    assert adopted.tenants == ("acme",)
    assert after is None
