"""Model ids and hot-loading without Ray: the catalog resolves base models and adapters
(scoping as a 404, an outage as a 503, listing degraded to the base models), and a load
that a replica refuses, times out on, or loses to another load never becomes visible."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from deployments.api.adapters import AdapterAdmin
from deployments.api.catalog import ModelCatalog, check_allowed
from deployments.api.errors import OpenAIError
from deployments.api.prompts import ServedModel
from deployments.config.tiered import TieredConfig
from deployments.state.adapters import NewAdapter
from deployments.state.config import StateSpec
from deployments.state.store import StateStore
from models.errors import EngineDeadError, LoRALoadError
from models.lora import LoRARequest
from models.tokenizer import tokenizer_files
from tests.state_helpers import run

T = TypeVar("T")
DOWN = StateSpec(url="postgresql+psycopg://u:pw@127.0.0.1:1/db", connect_timeout_s=1)


def _config(model_dir: Path) -> TieredConfig:
    return TieredConfig.model_validate(
        {
            "models": [
                {
                    "name": "base",
                    "path": str(model_dir),
                    "shared_pool": {"num_replicas": 1},
                    "adapters": [{"name": "cfg-lora", "path": "s3://b/cfg", "tenants": ["acme"]}],
                },
                {"name": "other", "path": str(model_dir), "shared_pool": {"num_replicas": 0}},
            ],
            "tenants": [
                {"name": "acme"},
                {"name": "globex", "models": ["base"]},
                {"name": "outsider", "models": ["other"]},
            ],
        }
    )


@pytest.fixture(scope="module")
def config(tiny_model_dir: Path) -> TieredConfig:
    return _config(tiny_model_dir)


@pytest.fixture(scope="module")
def models(config: TieredConfig) -> dict[str, ServedModel]:
    return {m.name: ServedModel.from_files(m, tokenizer_files(m.path)) for m in config.models}


def with_catalog(
    config: TieredConfig,
    models: dict[str, ServedModel],
    spec: StateSpec,
    body: Callable[[ModelCatalog], Awaitable[T]],
) -> T:
    async def go() -> T:
        store = StateStore.connect(spec)
        try:
            return await body(ModelCatalog(config, models, store))
        finally:
            await store.close()

    return run(go())


def sqlite(tmp_path: Path) -> StateSpec:
    return StateSpec(url=f"sqlite+aiosqlite:///{tmp_path / 'state.db'}", connect_timeout_s=5)


async def error_of(work: Awaitable[Any]) -> OpenAIError:
    with pytest.raises(OpenAIError) as err:
        await work
    return err.value


def test_resolve_and_list_scope_adapters_to_tenants(
    config: TieredConfig, models: dict[str, ServedModel], tmp_path: Path
) -> None:
    acme, globex, outsider = (config.tenant(n) for n in ("acme", "globex", "outsider"))
    assert acme and globex and outsider

    async def body(cat: ModelCatalog) -> Any:
        await cat.prepare()
        hot = NewAdapter("hot", "base", "/a/hot")
        await cat.registry.activate(await cat.registry.reserve(hot, "api"))
        orphan = NewAdapter("orphan", "gone-model", "/a/orphan")  # its base left the config
        await cat.registry.activate(await cat.registry.reserve(orphan, "api"))
        cfg = await cat.resolve(acme, "cfg-lora")
        hot_g = await cat.resolve(globex, "hot")
        errors = [
            await error_of(cat.resolve(t, name))
            for t, name in (
                (globex, "cfg-lora"),
                (outsider, "hot"),
                (acme, "orphan"),
                (acme, "nope"),
            )
        ]
        listed = {t.name: await cat.listed(t) for t in (acme, globex, outsider)}
        return cfg, hot_g, errors, listed

    cfg, hot, errors, listed = with_catalog(config, models, sqlite(tmp_path), body)
    assert (cfg.name, cfg.base, cfg.parent) == ("cfg-lora", "base", "base")
    assert cfg.lora == LoRARequest("cfg-lora", 1, "s3://b/cfg")
    assert cfg.tokenizer is models["base"].tokenizer and cfg.context == models["base"].context
    assert hot.lora is not None and hot.lora.name == "hot" and hot.base == "base"
    for err in errors:
        assert (err.status, err.code, err.param) == (404, "model_not_found", "model")
    assert [e.message for e in errors][-1] == "The model 'nope' does not exist"
    assert [m["id"] for m in listed["acme"]] == ["base", "other", "cfg-lora", "hot"]
    assert [m.get("parent") for m in listed["acme"]] == [None, None, "base", "base"]
    assert [m["id"] for m in listed["globex"]] == ["base", "hot"]
    assert [m["id"] for m in listed["outsider"]] == ["other"]


def test_base_model_not_allowed_stays_a_403(
    config: TieredConfig, models: dict[str, ServedModel]
) -> None:
    outsider = config.tenant("outsider")
    assert outsider is not None
    with pytest.raises(OpenAIError) as err:
        check_allowed(outsider, models["base"])
    assert (err.value.status, err.value.code) == (403, "model_not_allowed")


def test_registry_outage_is_a_503_for_adapters_only(
    config: TieredConfig, models: dict[str, ServedModel]
) -> None:
    acme = config.tenant("acme")
    assert acme is not None

    async def body(cat: ModelCatalog) -> Any:
        base = await cat.resolve(acme, "base")  # never touches the database
        err = await error_of(cat.resolve(acme, "cfg-lora"))
        return base, err, await cat.listed(acme)

    base, err, listed = with_catalog(config, models, DOWN, body)
    assert base is models["base"]
    assert (err.status, err.code) == (503, "state_store_unavailable")
    assert [m["id"] for m in listed] == ["base", "other"]


class FakeResponse:
    """What `handle.load_lora.remote(...)` returns: awaitable, cancellable."""

    def __init__(self, outcome: Callable[[], Awaitable[float]]) -> None:
        self.outcome = outcome
        self.cancelled = False

    def __await__(self) -> Generator[Any, None, float]:
        return self.outcome().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    def __init__(self, outcome: Callable[[], Awaitable[float]]) -> None:
        self.outcome = outcome
        self.loaded: list[LoRARequest] = []
        self.responses: list[FakeResponse] = []

    @property
    def load_lora(self) -> FakeHandle:
        return self

    def remote(self, lora: LoRARequest) -> FakeResponse:
        self.loaded.append(lora)
        self.responses.append(FakeResponse(self.outcome))
        return self.responses[-1]


async def _loaded() -> float:
    return 0.25


async def _refused() -> float:
    raise LoRALoadError("adapter rank r=64 exceeds max_lora_rank=16", "r")


async def _dead() -> float:
    raise EngineDeadError("rank 1 died")


async def _hangs() -> float:
    await asyncio.sleep(60)
    return 0.0


def admin(
    cat: ModelCatalog, outcome: Callable[[], Awaitable[float]]
) -> tuple[AdapterAdmin, FakeHandle]:
    handle = FakeHandle(outcome)
    return AdapterAdmin(cat, {"base": handle}, timeout_s=0.5), handle  # type: ignore[dict-item]


BODY = {"lora_name": "sql", "lora_path": "/a/sql", "base_model": "base"}


def test_load_then_unload(
    config: TieredConfig, models: dict[str, ServedModel], tmp_path: Path
) -> None:
    async def body(cat: ModelCatalog) -> Any:
        adm, handle = admin(cat, _loaded)
        loaded = await adm.load({**BODY, "tenants": ["acme", "acme"]})
        taken = await error_of(adm.load(BODY))
        gone = await adm.unload({"lora_name": "sql"})
        missing = await error_of(adm.unload({"lora_name": "sql"}))
        again = await adm.load(BODY)
        configured = await error_of(adm.unload({"lora_name": "cfg-lora"}))
        return loaded, taken, gone, missing, again, handle.loaded, configured

    loaded, taken, gone, missing, again, sent, configured = with_catalog(
        config, models, sqlite(tmp_path), body
    )
    assert loaded == {
        "object": "lora_adapter",
        "id": "sql",
        "version": 1,
        "parent": "base",
        "tenants": ["acme"],
        "load_seconds": 0.25,
    }
    assert (taken.status, taken.code, taken.param) == (400, "lora_adapter_exists", "lora_name")
    assert gone["deleted"] is True and gone["version"] == 1
    assert (missing.status, missing.code) == (404, "lora_adapter_not_found")
    assert again["version"] == 2
    assert sent == [LoRARequest("sql", 1, "/a/sql"), LoRARequest("sql", 2, "/a/sql")]
    assert (configured.status, configured.code) == (400, "lora_adapter_in_config")


@pytest.mark.parametrize(
    ("outcome", "status", "code", "param"),
    [
        (_refused, 400, "lora_load_failed", "r"),
        (_dead, 503, "model_unavailable", None),
        (_hangs, 503, "lora_load_timeout", None),
    ],
)
def test_a_failed_load_is_never_visible_and_burns_its_version(
    config: TieredConfig,
    models: dict[str, ServedModel],
    tmp_path: Path,
    outcome: Callable[[], Awaitable[float]],
    status: int,
    code: str,
    param: str | None,
) -> None:
    acme = config.tenant("acme")
    assert acme is not None

    async def body(cat: ModelCatalog) -> Any:
        adm, handle = admin(cat, outcome)
        err = await error_of(adm.load(BODY))
        hidden = await error_of(cat.resolve(acme, "sql"))
        adm.handles["base"] = FakeHandle(_loaded)  # type: ignore[assignment]
        return err, hidden, await adm.load(BODY), handle.responses

    err, hidden, retried, responses = with_catalog(config, models, sqlite(tmp_path), body)
    assert (err.status, err.code, err.param) == (status, code, param)
    assert hidden.status == 404
    assert retried["version"] == 2
    assert responses[0].cancelled == (outcome is _hangs)
