"""The faults: how each is injected, and what must hold after it.

Injectors find their victim through Serve handles and Ray names (so they work on a
cluster the run did not start, with `--address auto`); removing a node and stopping the
database need the cluster or the database the run was given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from bench.chaos.observe import ChaosTarget, model_deployments, replica_loads, replica_stats
from bench.chaos.report import FaultReport
from deployments.config.plan import ADMISSION_NAMESPACE, INGRESS_DEPLOYMENT, admission_actor_name
from deployments.replicas.model_server import WORKER_NAMESPACE


@dataclass(frozen=True)
class Injected:
    what: str  # for the report
    at: float  # perf_counter() when the fault struck
    replica: str | None = None  # the model-server replica it took down, if one
    restore: Callable[[], None] | None = None  # run in the main thread once the run ends
    # Run in the main thread right after the fault (a removed node's replacement joins;
    # Ray starts a node's processes from the main thread only, so the load's event loop
    # waits meanwhile).
    follow_up: Callable[[], None] | None = None


Injector = Callable[[ChaosTarget], Injected]
Checks = Callable[[FaultReport], None]


class FaultUnavailable(RuntimeError):
    """The target cannot take this fault (no such replica, no cluster handle, ...)."""


def _busiest(target: ChaosTarget, shared: bool, tp: bool) -> dict:
    """Stats of the replica with the most sequences, among shared or dedicated ones."""
    candidates = []
    for name in model_deployments(target.app):
        if name.startswith("shared-") != shared:
            continue
        stats = replica_stats(target.app, name)
        candidates += [s for s in stats if s["worker_names"] or not tp]
    if not candidates:
        kind = ("shared" if shared else "dedicated") + (" TP>1" if tp else "")
        raise FaultUnavailable(f"no running {kind} model-server replica to kill")
    running = {s["replica_id"]: s["num_running"] for s in replica_loads(target.app)}
    return max(candidates, key=lambda s: running.get(s["replica_id"], -1))


def kill_replica(target: ChaosTarget) -> Injected:
    import ray

    stats = _busiest(target, shared=True, tp=False)
    actor = ray.get_actor(stats["replica_actor"], namespace="serve")
    at = time.perf_counter()
    ray.kill(actor, no_restart=True)
    return Injected(f"killed shared replica {stats['replica_id']}", at, stats["replica_id"])


def kill_tp_worker(target: ChaosTarget) -> Injected:
    import ray

    try:
        stats = _busiest(target, shared=True, tp=True)
    except FaultUnavailable:
        stats = _busiest(target, shared=False, tp=True)
    name = stats["worker_names"][-1]
    actor = ray.get_actor(name, namespace=WORKER_NAMESPACE)
    at = time.perf_counter()
    ray.kill(actor, no_restart=True)
    return Injected(f"killed {name} of replica {stats['replica_id']}", at, stats["replica_id"])


def ingress_replicas(target: ChaosTarget, want: int = 2, timeout_s: float = 30.0) -> list[str]:
    """Ingress replica ids, from the x-tiered-ingress header of the probe tenant's
    completions (only completions carry it)."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < want and time.monotonic() < deadline:
        resp = httpx.post(
            f"{target.base_url}/chat/completions", timeout=10,
            headers={"Authorization": f"Bearer {target.probe_key}"},
            json={"model": target.model, "max_tokens": 1,
                  "messages": [{"role": "user", "content": "who"}]},
        )
        if "x-tiered-ingress" in resp.headers:
            seen.add(resp.headers["x-tiered-ingress"])
    if len(seen) < want:
        raise FaultUnavailable(f"only ingress replicas {sorted(seen)} answered")
    return sorted(seen)


def kill_ingress(target: ChaosTarget) -> Injected:
    import ray

    victim = ingress_replicas(target)[0]
    name = f"SERVE_REPLICA::{target.app}#{INGRESS_DEPLOYMENT}#{victim}"
    actor = ray.get_actor(name, namespace="serve")
    at = time.perf_counter()
    ray.kill(actor, no_restart=True)
    return Injected(f"killed ingress replica {victim}", at)


def kill_admission(target: ChaosTarget) -> Injected:
    import ray

    actor = ray.get_actor(admission_actor_name(target.app), namespace=ADMISSION_NAMESPACE)
    at = time.perf_counter()
    ray.kill(actor, no_restart=False)  # Ray restarts it, empty
    return Injected("killed the admission actor (Ray restarts it)", at)


def remove_node(target: ChaosTarget) -> Injected:
    """Remove a worker node that holds a model-server replica (the dedicated one if it is
    on a worker node, else a shared one), and add a node like it at once, as a cloud
    provider replaces a lost node: the replicas are rescheduled on the nodes there are,
    and the dedicated tenant spills to the shared pool until its replica is back."""
    import ray

    if target.cluster is None:
        raise FaultUnavailable("removing a node needs the cluster the run started")
    cluster = target.cluster
    workers = {n.node_id: n for n in cluster.worker_nodes}
    placed = [(d.startswith("shared-"), s) for d in model_deployments(target.app)
              for s in replica_stats(target.app, d)]
    on_worker = sorted(((shared, s) for shared, s in placed
                        if set(s["node_ids"]) & workers.keys()), key=lambda p: p[0])
    if not on_worker:
        raise FaultUnavailable("no model-server replica runs on a worker node")
    shared, victim = on_worker[0]
    node = workers[next(n for n in victim["node_ids"] if n in workers)]
    info = next(n for n in ray.nodes() if n["NodeID"] == node.node_id)
    resources = info["Resources"]
    at = time.perf_counter()
    cluster.remove_node(node, allow_graceful=False)
    custom = {k: v for k, v in resources.items()
              if k not in ("CPU", "GPU", "memory", "object_store_memory")
              and not k.startswith("node:")}

    def add_back() -> None:
        cluster.add_node(num_cpus=int(resources.get("CPU", 1)), resources=custom,
                         metrics_export_port=info["MetricsExportPort"])

    kind = "shared" if shared else "dedicated"
    return Injected(f"removed node {node.node_id[:12]} with {kind} replica "
                    f"{victim['replica_id']} (one like it joins at once)", at,
                    victim["replica_id"], follow_up=add_back)


def database_down(seconds: float) -> Injector:
    def inject(target: ChaosTarget) -> Injected:
        if target.database is None:
            raise FaultUnavailable("stopping the database needs the run's PostgreSQL")
        at = time.perf_counter()
        target.database.stop("immediate")
        try:
            time.sleep(seconds)
        finally:
            target.database.start()
        return Injected(f"database stopped for {seconds:.0f} s", at)
    return inject


def no_fault(target: ChaosTarget) -> Injected:
    return Injected("no fault: the load's own disconnects (and bad requests)",
                    time.perf_counter())


# ---- what must hold -------------------------------------------------------------------
def _common(r: FaultReport, healthy_within_s: float, idle: bool = True) -> None:
    r.check("no request hung", r.hung == 0, f"{r.hung} hung")
    r.check("no stream ended with a fake [DONE]", r.outcomes.get("fake_done", 0) == 0,
            f"{r.outcomes.get('fake_done', 0)} short streams said [DONE]")
    r.check(f"healthy again within {healthy_within_s:.0f} s",
            r.healthy_after_s is not None and r.healthy_after_s <= healthy_within_s,
            f"{r.healthy_after_s}")
    if idle:
        idle_s = r.extra.get("idle_after_s")
        r.check("0 KV blocks and 0 seats at idle (60 s from the fault; soak: its end)",
                r.kv_blocks_idle == r.seats_idle == 0,
                f"KV {r.kv_blocks_idle}, seats {r.seats_idle}, {idle_s} s after the fault")


def _billing(r: FaultReport) -> None:
    r.check("tokens billed = tokens received", r.tokens_billed == r.tokens_received,
            f"{r.tokens_billed} billed, {r.tokens_received} received")


def _billing_backed_up(r: FaultReport) -> None:
    """A dead ingress's streams are billed from the model servers' counts: at least what
    the clients received (the tokens in flight inside the dead ingress are billed too,
    and no more once the caller watch stops those streams in the engine: the report's
    `unreceived_of_cut_streams` is what they would have cost running on to the end)."""
    billed = r.tokens_billed if r.tokens_billed is not None else -1
    r.extra["billed_minus_received"] = billed - r.tokens_received
    r.check("every token received was billed", billed >= r.tokens_received,
            f"{billed} billed, {r.tokens_received} received")


def _retried(r: FaultReport) -> None:
    failed = r.extra.get("errors_before_first_token", 0)
    r.check("requests with no token yet were retried and succeeded", failed == 0,
            f"{failed} failed before a token")


def check_replica_kill(r: FaultReport) -> None:
    """Kill a shared model-server replica (rank 0) with streams in flight: no 5xx, requests
    with no token yet succeed elsewhere, cut streams end with an error event."""
    _common(r, 60)
    r.check("no 5xx", not r.http_5xx, str(r.http_5xx))
    _retried(r)
    r.check("streams cut by the kill ended with an error event",
            set(r.in_flight_ended) <= {"completed", "error_event"}, str(r.in_flight_ended))
    _billing(r)


def check_tp_worker_kill(r: FaultReport) -> None:
    """Kill TP rank >= 1: the whole replica is replaced, streams end cleanly, no 5xx."""
    _common(r, 90)
    r.check("the replica was replaced whole",
            r.extra.get("replicas_back_after_s") is not None
            and r.extra.get("victim") in r.extra.get("replica_replaced", []),
            f"{r.extra.get('victim')} replaced by {r.extra.get('replicas_back_after_s')} s")
    r.check("no 5xx: new requests went to the other replica", not r.http_5xx, str(r.http_5xx))
    _retried(r)
    r.check("in-flight requests ended cleanly (done or an error event)",
            set(r.in_flight_ended) <= {"completed", "error_event", "http_503"},
            str(r.in_flight_ended))
    _billing(r)


def check_ingress_kill(r: FaultReport) -> None:
    """Kill an ingress replica: seats and claims back within 60 s, the other one serves,
    and every token its clients received is billed."""
    _common(r, 60)
    r.check("the other ingress kept serving", r.extra.get("completed_during_outage", 0) > 0,
            f"{r.extra.get('completed_during_outage', 0)} completed while it was replaced")
    _billing_backed_up(r)


def check_admission_kill(r: FaultReport) -> None:
    """Kill the admission actor: no 500 (503 with Retry-After), recovered within 30 s."""
    _common(r, 30)
    r.check("no 500", "500" not in r.http_5xx, str(r.http_5xx))
    r.check("only 503s meanwhile", set(r.http_5xx) <= {"503"}, str(r.http_5xx))


def check_node_removal(r: FaultReport) -> None:
    """Remove a worker node holding a replica: rescheduled, service back; a dedicated
    tenant whose replica went spills to the shared pool meanwhile."""
    _common(r, 120)
    r.check("the replica was rescheduled", r.extra.get("replicas_back_after_s") is not None,
            f"back after {r.extra.get('replicas_back_after_s')} s")
    # Billed against received is reported, not checked: a stream whose ingress and model
    # server were both on the node is counted by no one left (RELIABILITY.md).
    r.extra["billed_minus_received"] = (r.tokens_billed or 0) - r.tokens_received
    if r.extra.get("dedicated_replaced"):
        spilled = r.extra.get("dedicated_served_by_shared", 0)
        r.check("the dedicated tenant spilled to the shared pool (service_tier says so)",
                spilled > 0, f"{spilled} dedicated requests served by the shared pool")


def check_disconnects(r: FaultReport) -> None:
    """Clients leave mid-stream and mid-queue: engine idle within 1 s, KV freed."""
    _common(r, 30)
    idle_s = r.extra.get("engine_idle_after_s")
    r.check("engine idle within 1 s of the last disconnect",
            idle_s is not None and idle_s <= 1.0, f"{idle_s}")
    r.check("no 5xx", not r.http_5xx, str(r.http_5xx))


def check_database_down(r: FaultReport) -> None:
    """The database down 10 s: serving goes on, the ledger catches up exactly."""
    _common(r, 30)
    r.check("no 5xx", not r.http_5xx, str(r.http_5xx))
    served = r.extra.get("completed_during_outage", 0)
    r.check("served while the database was down", served > 0, f"{served} completed")
    _billing(r)


def check_soak(r: FaultReport) -> None:
    """Mixed load with disconnects and bad requests: 0 5xx, RSS < +10 %, idle at 0."""
    _common(r, 60)
    r.check("0 5xx", not r.http_5xx, str(r.http_5xx))
    wrong = {k: v for k, v in r.outcomes.items()
             if k not in ("completed", "http_400_as_meant") and not k.startswith("disconnected")}
    r.check("every request completed, left, or was refused as meant", not wrong, str(wrong))
    worst = r.extra.get("rss_growth_max_pct")
    r.check("RSS growth of every Ray worker < 10% from minute 2 to the end",
            worst is not None and worst < 10.0, f"worst {worst}%")


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Injector
    checks: Checks
    needs: str = ""  # "cluster" or "database": only where the run has one


FAULTS = {
    f.name: f
    for f in (
        Fault("disconnects", no_fault, check_disconnects),
        Fault("replica_kill", kill_replica, check_replica_kill),
        Fault("tp_worker_kill", kill_tp_worker, check_tp_worker_kill),
        Fault("ingress_kill", kill_ingress, check_ingress_kill),
        Fault("admission_kill", kill_admission, check_admission_kill),
        Fault("database_down", database_down(10.0), check_database_down, needs="database"),
        Fault("node_removal", remove_node, check_node_removal, needs="cluster"),
    )
}
SOAK = Fault("soak", no_fault, check_soak)
