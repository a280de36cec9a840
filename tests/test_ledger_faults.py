"""The ledger through faults, under load, on a real PostgreSQL: after each fault the
ledger holds exactly what the clients were told they used, request by request (response
id = ledger request id), and /admin/usage totals the same. The ledger's primary key is
the request id, so a replay cannot count twice; the totals show nothing else did either.

- the admission actor killed (`ray.kill`; Ray restarts it) while it holds records not yet
  written: the ingresses send them again;
- an ingress replica killed: what it finished is already with admission, and the
  streams it was reading stop in the engine at once (no one is left to receive them);
- the database stopped for 10 s: admission keeps serving and queues, then commits.

(`serve shutdown` then `tiered serve` again: tests/test_serve_restart.py.)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from bench.chaos.observe import engine_load
from deployments.app import build_from_config
from deployments.config.plan import ADMISSION_NAMESPACE, INGRESS_DEPLOYMENT, admission_actor_name
from deployments.config.tiered import TieredConfig
from deployments.tenancy.keys import hash_key
from tests.ledger_load import LoadClients, assert_ledger_matches
from tests.postgres_server import PostgresServer
from tests.serve_helpers import admin_get
from tests.state_fixtures import postgres_server  # noqa: F401

APP = "ledger"
MODEL = "tiny-llama"
TENANTS = ("actor", "ingress", "database")
KEYS = {t: f"tk-ledger-{t}" for t in (*TENANTS, "probe", "admin")}


def _config(model_dir: Path, state_url: str) -> TieredConfig:
    engine = {"num_kv_blocks": 256, "max_num_seqs": 8, "max_num_batched_tokens": 512}
    return TieredConfig.model_validate({
        "models": [{"name": MODEL, "path": str(model_dir), "engine": engine,
                    "shared_pool": {"num_replicas": 1}}],
        "tenants": [
            {"name": t, "api_key_hashes": [hash_key(KEYS[t])]} for t in (*TENANTS, "probe")
        ],
        "admin_key_hashes": [hash_key(KEYS["admin"])],
        "ingress": {"num_replicas": 2},
        "state": {"url": state_url, "connect_timeout_s": 3},
    })


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_model_dir: Path,
        postgres_server: PostgresServer) -> Iterator[tuple[str, str]]:  # noqa: F811
    """(server root, state URL) of an app whose ledger is a fresh PostgreSQL database."""
    url = postgres_server.create_database("ledger_faults")
    serve.run(build_from_config(_config(tiny_model_dir, url)), name=APP, route_prefix="/")
    yield f"http://127.0.0.1:{ray_cluster.serve_port}", url
    serve.delete(APP)
    if postgres_server.running:
        postgres_server.drop_database("ledger_faults")


def _check(root: str, url: str, tenant: str, load: LoadClients) -> None:
    rows = assert_ledger_matches(url, tenant, load.received)
    totals = admin_get(root, "/admin/usage", KEYS["admin"], tenant=tenant,
                       start="2000-01-01")["totals"]
    assert totals["requests"] == len(rows)
    assert totals["prompt_tokens"] == sum(t[0] for t, _ in rows.values())
    assert totals["completion_tokens"] == sum(t[2] for t, _ in rows.values())
    print(f"\n{tenant}: {len(load.received)} received, {len(rows)} ledger rows, "
          f"outcomes {dict(load.outcomes)}")


def _load(root: str, tenant: str) -> LoadClients:
    return LoadClients(f"{root}/v1", KEYS[tenant], MODEL)


def test_admission_actor_killed_under_load(
    app: tuple[str, str], postgres_server: PostgresServer,  # noqa: F811
) -> None:
    """Killed twice: once as it is, once while the database is down, so that it surely
    dies holding records it acknowledged but never wrote; only the ingresses have them."""
    root, url = app
    with _load(root, "actor") as load:
        load.wait_for(10)
        _kill_admission()
        load.wait_for(10, timeout_s=90)  # served again after Ray restarted it
        postgres_server.stop("immediate")
        try:
            load.wait_for(10, timeout_s=60)  # acknowledged, queued in the actor
            _kill_admission()
            load.wait_for(10, timeout_s=90)
        finally:
            postgres_server.start()
        load.wait_for(10, timeout_s=90)
    _check(root, url, "actor", load)


def _kill_admission() -> None:
    actor = ray.get_actor(admission_actor_name(APP), namespace=ADMISSION_NAMESPACE)
    ray.kill(actor, no_restart=False)  # Ray restarts it, with an empty queue


def test_an_ingress_replica_killed_under_load(app: tuple[str, str]) -> None:
    root, url = app
    with _load(root, "ingress") as load:
        load.wait_for(10)
        replica_ids = _ingress_replica_ids(root)
        name = f"SERVE_REPLICA::{APP}#{INGRESS_DEPLOYMENT}#{replica_ids[0]}"
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        load.wait_for(10, timeout_s=90)
    _check(root, url, "ingress", load)


def test_a_killed_ingress_stops_its_streams_in_the_engine(app: tuple[str, str]) -> None:
    """Ray does not stop a replica's stream when the actor reading it dies: before the
    model server watched its callers, a crashed ingress's streams ran on to max_tokens in
    the engine for no one, holding KV blocks and billed (as orphans) in full."""
    root, _ = app
    replica_ids = _ingress_replica_ids(root)  # both up, the one killed above replaced
    body = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 1900,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEYS['probe']}"}
    with httpx.stream("POST", f"{root}/v1/completions", json=body, headers=headers,
                      timeout=30) as resp:
        assert resp.status_code == 200, resp.read()
        ingress = resp.headers["x-tiered-ingress"]
        assert ingress in replica_ids
        lines = resp.iter_lines()
        for _ in range(3):  # a few tokens in: the request runs in the engine
            next(line for line in lines if line.startswith("data:"))
        assert engine_load(APP)[1] == 1
        name = f"SERVE_REPLICA::{APP}#{INGRESS_DEPLOYMENT}#{ingress}"
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        killed = time.monotonic()
        with contextlib.suppress(httpx.RemoteProtocolError):  # the proxy cuts it
            for _ in lines:
                pass
    while engine_load(APP)[1]:
        assert time.monotonic() - killed < 3.0, "the dead ingress's stream is still running"
        time.sleep(0.05)
    print(f"\nengine idle {time.monotonic() - killed:.2f} s after the ingress was killed")


def _ingress_replica_ids(root: str, timeout_s: float = 30) -> list[str]:
    """The ingress replicas, learnt from the x-tiered-ingress header of their answers (a
    tenant of its own asks, so the load's ledger rows stay the load's)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"only ingress replicas {seen} answered"
        resp = httpx.post(f"{root}/v1/chat/completions", timeout=30,
                          headers={"Authorization": f"Bearer {KEYS['probe']}"},
                          json={"model": MODEL, "max_tokens": 1,
                                "messages": [{"role": "user", "content": "who"}]})
        seen.add(resp.headers["x-tiered-ingress"])
    return sorted(seen)


def test_database_stopped_for_ten_seconds_under_load(
    app: tuple[str, str], postgres_server: PostgresServer,  # noqa: F811
) -> None:
    root, url = app
    with _load(root, "database") as load:
        load.wait_for(10)
        postgres_server.stop("immediate")
        try:
            served_before = len(load.received)
            time.sleep(10)
            served_during = len(load.received) - served_before
        finally:
            postgres_server.start()
        load.wait_for(10, timeout_s=90)
    assert served_during > 0, "serving stopped while the database was down"
    _check(root, url, "database", load)
