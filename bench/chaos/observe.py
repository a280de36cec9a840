"""The cluster as a fault leaves it: replicas' engine stats through Serve handles, seats
through /admin/state, the ledger through /admin/usage, health through a probe request.
Every poll has a deadline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from deployments.config.plan import FINE_TUNING_DEPLOYMENT, INGRESS_DEPLOYMENT

POLL_S = 0.2


@dataclass(frozen=True)
class ChaosTarget:
    """A running Tiered app and the keys the chaos run uses on it."""

    app: str
    root: str  # http://host:port, no /v1
    model: str
    admin_key: str
    probe_key: str
    cluster: Any | None = None  # a ray.cluster_utils.Cluster when the run started it
    database: Any | None = None  # stop()/start() of the app's PostgreSQL, when given

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def admin(self, path: str, **params: str) -> dict:
        resp = httpx.get(f"{self.root}{path}", params=params, timeout=10,
                         headers={"Authorization": f"Bearer {self.admin_key}"})
        resp.raise_for_status()
        return resp.json()


def model_deployments(app: str) -> dict[str, int]:
    """Model-server deployments of the app and their running replicas."""
    from ray import serve

    deps = serve.status().applications[app].deployments
    return {n: d.replica_states.get("RUNNING", 0)
            for n, d in deps.items() if n not in (INGRESS_DEPLOYMENT, FINE_TUNING_DEPLOYMENT)}


def replica_stats(app: str, deployment: str, timeout_s: float = 30.0) -> list[dict]:
    """Placement facts of every running replica of one deployment (the handle answers
    from any replica, so it is asked until each running one has answered)."""
    from ray import serve

    want = model_deployments(app).get(deployment, 0)
    handle = serve.get_deployment_handle(deployment, app)
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < want and time.monotonic() < deadline:
        stats = handle.stats.remote().result(timeout_s=max(1.0, deadline - time.monotonic()))
        seen[stats["replica_id"]] = stats
        if len(seen) < want:
            time.sleep(0.02)
    return list(seen.values())


def replica_loads(app: str, timeout_s: float = 5.0) -> list[dict]:
    """Engine load of each live model-server replica of the app, asked of each replica's
    own actor (the routing stats Serve's router reads), so none is skipped: {deployment,
    replica_id, replica_actor, num_running, num_waiting, kv_blocks_used}. A replica that
    is gone, still starting (it holds nothing yet) or does not answer in time is left out."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    names = []
    for deployment in model_deployments(app):
        prefix = f"SERVE_REPLICA::{app}#{deployment}#"
        names += [(deployment, n["name"]) for n in ray.util.list_named_actors(True)
                  if n["namespace"] == "serve" and n["name"].startswith(prefix)]
    calls = []
    for deployment, name in names:
        try:
            calls.append((deployment, name, ray.get_actor(name, namespace="serve")
                          .record_routing_stats.remote()))
        except ValueError:  # gone since it was listed
            continue
    out = []
    for deployment, name, ref in calls:
        try:
            stats = ray.get(ref, timeout=timeout_s)
        except (RayActorError, RayTaskError, GetTimeoutError):
            continue
        out.append({"deployment": deployment, "replica_id": name.rsplit("#", 1)[1],
                    "replica_actor": name, **stats})
    return out


def engine_load(app: str) -> tuple[int, int]:
    """(KV blocks held, sequences running or waiting) over every model-server replica."""
    loads = replica_loads(app)
    kv = sum(int(s["kv_blocks_used"]) for s in loads)
    return kv, sum(int(s["num_running"] + s["num_waiting"]) for s in loads)


def seats_held(target: ChaosTarget) -> int:
    """Seats in use plus requests queued, over every pool, from the admission actor."""
    state = target.admin("/admin/state")
    pools = [*state["pools"].values(), *state["dedicated"].values()]
    return sum(p["in_use"] + p.get("queued", 0) for p in pools)


def wait_idle(target: ChaosTarget, since: float, timeout_s: float) -> tuple[int, int, float]:
    """(KV blocks, seats, seconds from `since`, a perf_counter time) once both are 0, or
    as they are `timeout_s` after `since`."""
    kv = seats = -1
    while True:
        try:
            kv, _ = engine_load(target.app)
            seats = seats_held(target)
        except (httpx.HTTPError, KeyError, TimeoutError) as exc:  # mid-recovery
            kv = seats = -1
            last = repr(exc)
        else:
            last = ""
        if kv == seats == 0 or time.perf_counter() - since > timeout_s:
            if last:
                print(f"idle state not readable: {last}")
            return kv, seats, time.perf_counter() - since
        time.sleep(POLL_S)


def probe(target: ChaosTarget) -> bool:
    """One short non-streamed completion by the probe tenant succeeds."""
    try:
        resp = httpx.post(
            f"{target.base_url}/chat/completions", timeout=10,
            headers={"Authorization": f"Bearer {target.probe_key}"},
            json={"model": target.model, "max_tokens": 1,
                  "messages": [{"role": "user", "content": "ping"}]},
        )
    except httpx.HTTPError:
        return False
    return resp.status_code == 200


def healthy(app: str) -> bool:
    """Serve calls the app RUNNING and every deployment HEALTHY."""
    from ray import serve

    status = serve.status().applications.get(app)
    return status is not None and status.status == "RUNNING" and all(
        d.status == "HEALTHY" for d in status.deployments.values()
    )


def wait_healthy(target: ChaosTarget, since: float, timeout_s: float,
                 settle_s: float = 1.0) -> float | None:
    """Seconds from `since` (perf_counter) until the app is healthy and a probe
    succeeds; None past the deadline. `settle_s` first, so Serve has seen the fault."""
    time.sleep(settle_s)
    while time.perf_counter() - since < timeout_s:
        if healthy(target.app) and probe(target):
            return time.perf_counter() - since
        time.sleep(POLL_S)
    return None


def billed_tokens(target: ChaosTarget, tenants: list[str], since: datetime,
                  timeout_s: float = 30.0) -> int:
    """Completion tokens in the ledger for `tenants` since `since`, once the figure has
    stopped moving for 2 s (the ledger is written off the request path)."""
    start = since.astimezone(UTC).isoformat()
    last, stable_since = -1, time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        total = sum(
            target.admin("/admin/usage", tenant=t, start=start)["totals"]["completion_tokens"]
            for t in tenants
        )
        if total != last:
            last, stable_since = total, time.monotonic()
        elif time.monotonic() - stable_since >= 2.0:
            break
        time.sleep(0.5)
    return last
