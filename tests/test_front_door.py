"""A dedicated tenant's own front door, end to end on the session's two-node cluster.

acme's private replica, its front-door ingress and its admission shard sit on the worker
node (`node_worker`); the shared pool on the head node. Requests through acme's door
(/tenants/acme/v1, the official openai SDK) must be served by the door's ingress, never
by the main application's ingress replicas, and decided by acme's own admission shard;
its spill still reaches the shared pool, billed once.
"""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import openai
import pytest
import ray
from ray import serve

from deployments.app import serve_apps
from deployments.config.plan import (
    ADMISSION_NAMESPACE,
    admission_actor_name,
    dedicated_pool_key,
)
from deployments.config.tiered import TieredConfig
from deployments.state.config import state_dir
from deployments.tenancy.keys import hash_key
from tests.serve_helpers import admin_get, wait_for_usage

APP = "doors"
MODEL = "tiny-llama"
KEYS = {t: f"tk-door-{t}" for t in ("acme", "globex", "admin")}


def _config(model_dir: Path) -> TieredConfig:
    engine = {"num_kv_blocks": 256, "max_num_seqs": 1, "max_num_batched_tokens": 512}

    def tenant(name: str, **kw: object) -> dict:
        return {"name": name, "api_key_hashes": [hash_key(KEYS[name])], **kw}

    return TieredConfig.model_validate({
        "models": [{
            "name": MODEL,
            "path": str(model_dir),
            "engine": engine,
            "shared_pool": {"num_replicas": 1, "node_type_resource": "node_head"},
        }],
        "tenants": [
            tenant("acme", tier="dedicated", priority=1, dedicated={
                "model": MODEL,
                "spill": True,
                "replica": {"node_type_resource": "node_worker"},
                "front_door": {"num_replicas": 1},
            }),
            tenant("globex", models=[MODEL]),
        ],
        "admin_key_hashes": [hash_key(KEYS["admin"])],
        "ingress": {"num_replicas": 1},
        "dispatch": {"queue_deadline_s": 20},
        "state": {"url": f"sqlite+aiosqlite:///{state_dir() / 'doors.db'}"},
    })


@pytest.fixture(scope="module")
def urls(ray_cluster, tiny_model_dir: Path) -> dict[str, str]:
    apps = serve_apps(_config(tiny_model_dir), main_app=APP)
    for app in apps:
        serve.run(app.app, name=app.name, route_prefix=app.route_prefix)
    root = f"http://127.0.0.1:{ray_cluster.serve_port}"
    yield {"main": f"{root}/v1", "acme": f"{root}/tenants/acme/v1", "root": root}
    for app in reversed(apps):
        serve.delete(app.name)


def _client(base_url: str, tenant: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=KEYS[tenant], max_retries=0, timeout=60)


def _chat(base_url: str, tenant: str, max_tokens: int = 4):
    return _client(base_url, tenant).chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=max_tokens
    )


def _alive_actors() -> dict[str, str]:
    """Actor name -> node id, for this cluster's named actors alive. Read from this
    cluster's GCS: `ray.util.state.list_actors` needs the dashboard, and without one
    answers for whichever Ray instance it finds on the box."""
    from ray._private.state import actors

    return {
        a["Name"]: a["Address"]["NodeID"]
        for a in actors().values()
        if a.get("State") == "ALIVE" and a.get("Name")
    }


def _replica_actors(app: str, deployment: str) -> dict[str, str]:
    """unique replica id -> node id, for the live replicas of app/deployment."""
    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    return {
        name.removeprefix(prefix): node
        for name, node in _alive_actors().items()
        if name.startswith(prefix)
    }


def _node_with(resource: str) -> str:
    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"])


def test_the_door_serves_its_tenant_without_the_shared_ingress(urls: dict[str, str]) -> None:
    through_door = [_chat(urls["acme"], "acme") for _ in range(4)]
    through_main = [_chat(urls["main"], "globex") for _ in range(4)]
    door_ingress = _replica_actors(f"{APP}--acme", "ingress")
    main_ingress = _replica_actors(APP, "ingress")
    acme_replicas = _replica_actors(APP, "dedicated-acme")
    assert len(door_ingress) == 1 and len(main_ingress) == 1

    assert {r.headers["x-tiered-ingress"] for r in through_door} == set(door_ingress)
    assert {r.headers["x-tiered-ingress"] for r in through_main} == set(main_ingress)
    assert {r.headers["x-tiered-replica"] for r in through_door} <= set(acme_replicas)
    assert {r.parse().service_tier for r in through_door} == {"dedicated"}
    # The whole path of acme's door is on acme's node.
    worker = _node_with("node_worker")
    assert set(door_ingress.values()) == {worker}
    assert set(acme_replicas.values()) == {worker}

    # acme's decisions are its own shard's, on its node; the shared shard has no acme seats.
    shard = ray.get_actor(admission_actor_name(APP, "acme"), namespace=ADMISSION_NAMESPACE)
    shared = ray.get_actor(admission_actor_name(APP), namespace=ADMISSION_NAMESPACE)
    assert set(ray.get(shard.snapshot.remote(), timeout=30).dedicated) == {"acme"}
    assert ray.get(shared.snapshot.remote(), timeout=30).dedicated == {}
    assert _alive_actors()[admission_actor_name(APP, "acme")] == worker
    live = ray.get(shard.live_replicas.remote(dedicated_pool_key("acme")), timeout=30)
    assert live == 1  # acme's replica reports its seats to acme's shard


def test_the_door_refuses_other_tenants_and_the_main_door_still_serves_acme(
    urls: dict[str, str],
) -> None:
    with pytest.raises(openai.PermissionDeniedError) as refused:
        _chat(urls["acme"], "globex")
    assert refused.value.status_code == 403
    assert refused.value.body["code"] == "wrong_endpoint"
    via_main = _chat(urls["main"], "acme")
    assert via_main.parse().service_tier == "dedicated"
    assert via_main.headers["x-tiered-replica"] in _replica_actors(APP, "dedicated-acme")


def test_spill_through_the_door_is_seated_by_the_shared_shard_and_billed_once(
    urls: dict[str, str],
) -> None:
    """acme's private copy has one seat: hold it, and the next request spills."""
    started = threading.Event()

    def hold() -> str:
        stream = _client(urls["acme"], "acme").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "go"}], max_tokens=400,
            stream=True, extra_body={"ignore_eos": True},
        )
        first = next(iter(stream))
        started.set()
        for _ in stream:
            pass
        return first.id

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(hold)
        assert started.wait(60)
        spilled = _chat(urls["acme"], "acme", max_tokens=6)
        held.result(timeout=180)
    body = spilled.parse()
    assert body.service_tier == "shared"
    assert spilled.headers["x-tiered-replica"] in _replica_actors(APP, "shared-tiny-llama")
    assert spilled.headers["x-tiered-ingress"] in _replica_actors(f"{APP}--acme", "ingress")

    def spill_rows(report: dict) -> list[dict]:
        return [r for r in report["rows"] if r["key"]["tier"] == "shared"]

    report = wait_for_usage(
        urls["root"], KEYS["admin"], spill_rows, tenant="acme", group_by="tenant,tier"
    )
    (row,) = spill_rows(report)
    assert row["requests"] == row["spill_requests"] == 1  # recorded by acme's shard only
    assert row["completion_tokens"] == body.usage.completion_tokens
    # Both shards settled: no seat, no queue left anywhere.
    state = admin_get(urls["root"], "/admin/state", KEYS["admin"])
    assert state["dedicated"]["acme"]["in_use"] == 0
    assert state["pools"][MODEL]["in_use"] == 0


def test_the_serve_config_lists_each_door_as_an_application(tiny_model_dir: Path) -> None:
    """`tiered config render` (and so `serve deploy`, Helm) deploys the door beside the
    main application, and its import path builds it."""
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import build_front_door
    from deployments.render import FRONT_DOOR_IMPORT_PATH, render_serve_config

    rendered = render_serve_config(_config(tiny_model_dir))
    ServeDeploySchema(**rendered)
    main, door = rendered["applications"]
    assert (main["name"], main["route_prefix"]) == ("tiered", "/")
    assert (door["name"], door["route_prefix"]) == ("tiered--acme", "/tenants/acme")
    assert door["import_path"] == FRONT_DOOR_IMPORT_PATH
    assert door["deployments"] == [{"name": "ingress", "num_replicas": 1}]
    app = build_front_door(door["args"])
    assert isinstance(app, serve.Application)
