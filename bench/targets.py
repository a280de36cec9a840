"""Where the load goes: a given URL, or a local Ray + Serve cluster running a Tiered config
(and, for P3, the plain Serve echo app beside it) that lives for one run.

The local cluster follows the scenario's `target:` section: the Tiered YAML, optionally
without tenant limits (so the load reaches the pools rather than RPM/TPM). With `--pinned`
it is the two-node emulation of bench.two_node: each node, and each client, on its own
cores.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from rich.console import Console

from bench.scenario import Scenario, ScenarioError
from bench.split_clients import ClientGroup

if TYPE_CHECKING:
    from deployments.config.tiered import TieredConfig

APP, ECHO_APP = "tiered", "echo"
DEPLOY_DEADLINE_S = 300.0
HEALTH_DEADLINE_S = 60.0


@dataclass
class Target:
    endpoints: dict[str, str]
    description: str
    tokenizer: str | None = None
    watcher: ReplicaWatcher | None = None
    settings: dict = field(default_factory=dict)
    client_groups: list[ClientGroup] = field(default_factory=list)  # [] : one process


def url_target(url: str, extra: dict[str, str]) -> Target:
    """An endpoint already running; `url` is the base URL (…/v1)."""
    return Target({"main": url.rstrip("/"), **extra}, f"given URL {url}")


def tiered_config(scenario: Scenario) -> tuple[TieredConfig, Path]:
    """The Tiered config the local cluster runs for this scenario."""
    from deployments.config.tiered import DEFAULT_CONFIG, load_config

    spec = scenario.target
    path = DEFAULT_CONFIG
    if spec.tiered_config:
        base = scenario.source.parent if scenario.source else Path.cwd()
        path = (base / spec.tiered_config).resolve()
        if not path.is_file():
            raise ScenarioError(f"target.tiered_config: no file {path}")
    config = load_config(path)
    if config.model(scenario.model) is None:
        names = [m.name for m in config.models]
        raise ScenarioError(f"model {scenario.model!r} is not in {path} (it serves {names})")
    if spec.unlimited_tenants:
        for tenant in config.tenants:
            tenant.rpm = tenant.tpm = tenant.max_concurrency = None
    return config, path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deploy(app: Any, name: str, route_prefix: str, deadline_s: float) -> None:
    """serve.run (which waits for the app to be ready) under a deadline, in a thread;
    then the app's status must be RUNNING."""
    from ray import serve

    failure: list[BaseException] = []

    def target() -> None:
        try:
            serve.run(app, name=name, route_prefix=route_prefix)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(deadline_s)
    if thread.is_alive():
        raise TimeoutError(f"application {name} not deployed after {deadline_s:.0f}s")
    if failure:
        raise failure[0]
    _wait_running(name, 30.0)


def _wait_running(app: str, deadline_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + deadline_s
    status = None
    while time.monotonic() < deadline:
        status = serve.status().applications.get(app)
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"application {app} is {status.status}: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"application {app} not RUNNING after {deadline_s:.0f}s: {status}")


def _wait_healthy(url: str, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
            last = "not 200"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {deadline_s:.0f}s: {last}")


@contextmanager
def local_target(scenario: Scenario, pinned: bool, console: Console) -> Iterator[Target]:
    """Start Ray and Serve on loopback, deploy, yield the endpoints, tear everything down.

    One Ray node, or with `pinned` the two-node emulation (bench.two_node). A dedicated
    tenant's endpoint (named after it) is its own front door when it has one, else the
    main one."""
    import ray
    from ray import serve

    from bench.two_node import client_groups, place_on_two_nodes, two_node_cluster
    from deployments.app import serve_apps
    from models.default_model import resolve_model_path

    config, path = tiered_config(scenario)
    dedicated = (
        place_on_two_nodes(config) if pinned else [t.name for t in config.tenants if t.dedicated]
    )
    config = type(config).model_validate(config.model_dump())
    model = config.model(scenario.model)
    assert model is not None  # tiered_config checked it
    model_dir = str(resolve_model_path(model.path))
    port, door_port = _free_port(), _free_port()
    with ExitStack() as stack:
        groups = []
        if pinned:
            cluster, cpus = stack.enter_context(
                two_node_cluster(scenario.target.num_cpus, door_port, console)
            )
            ray.init(address=cluster.address, log_to_driver=False)
            groups = client_groups(scenario, dedicated, cpus)
        else:
            # The same client processes, on every core: one tenant's load generator
            # never measures another's (a flood's clients would slow a probe's loop).
            every = sorted(os.sched_getaffinity(0))
            groups = client_groups(scenario, dedicated, (every, every))
            with console.status(f"starting a local Ray cluster with {path.name}"):
                ray.init(
                    address="local",  # a fresh instance, never a cluster running here
                    num_cpus=scenario.target.num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                )
        stack.callback(ray.shutdown)
        serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": port})
        stack.callback(serve.shutdown)
        root = f"http://127.0.0.1:{port}"
        endpoints = {"main": f"{root}/v1"}
        endpoints |= {t.name: endpoints["main"] for t in config.tenants if t.dedicated}
        with console.status("deploying Tiered (every replica loads the model)"):
            for app in serve_apps(config, APP):
                _deploy(app.app, app.name, app.route_prefix, DEPLOY_DEADLINE_S)
                door = f"http://127.0.0.1:{door_port if pinned else port}{app.route_prefix}"
                if app.tenant is not None:
                    _wait_healthy(f"{door}/health", HEALTH_DEADLINE_S)
                    endpoints[app.tenant] = f"{door}/v1"
            _wait_healthy(f"{root}/health", HEALTH_DEADLINE_S)
        if scenario.target.echo:
            from bench.echo_app import echo_app

            with console.status("deploying the echo app"):
                echo = echo_app(config.ingress.num_replicas)
                _deploy(echo, ECHO_APP, "/echo", DEPLOY_DEADLINE_S)
            endpoints["echo"] = f"{root}/echo/v1"
        watcher = ReplicaWatcher(APP, scenario.target.watch) if scenario.target.watch else None
        settings = {
            "tiered_config": str(path),
            "pinned": pinned,
            "unlimited_tenants": scenario.target.unlimited_tenants,
            "ray_num_cpus": scenario.target.num_cpus,
            "client_groups": [{"tenants": g.tenants, "cpus": g.cpus} for g in groups],
        }
        label = (
            f"two pinned Ray nodes (dedicated on cores {list(groups[0].cpus)}), {path.name}"
            if pinned else f"local Ray, one node, {path.name}"
        )
        yield Target(
            endpoints, label, tokenizer=model_dir, watcher=watcher, settings=settings,
            client_groups=groups,
        )


class ReplicaWatcher:
    """Samples the replica states of some deployments of an app every `period_s` in a
    thread: {t (perf_counter), deployment, running, starting, stopping}."""

    def __init__(self, app: str, deployments: list[str], period_s: float = 0.25) -> None:
        self.app, self.deployments, self.period_s = app, deployments, period_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        from ray import serve

        while not self._stop.is_set():
            try:
                deps = serve.status().applications[self.app].deployments
            except Exception:  # a status call may fail while Serve reconfigures
                deps = {}
            now = time.perf_counter()
            for name in self.deployments:
                if name in deps:
                    states = deps[name].replica_states
                    self.samples.append({
                        "t": now,
                        "deployment": name,
                        "running": states.get("RUNNING", 0),
                        "starting": states.get("STARTING", 0),
                        "stopping": states.get("STOPPING", 0),
                    })
            self._stop.wait(self.period_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.samples
