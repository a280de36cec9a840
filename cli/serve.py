"""`tiered serve`: a local Ray cluster running the Tiered app, until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from deployments.config.models import ConfigError
from deployments.config.tiered import DEFAULT_CONFIG, TieredConfig, load_config
from deployments.proxy_mode import DEFAULT_PROXY_MODE, PROXY_MODES, ProxyMode, use_proxy_mode
from deployments.state.config import StateSpec, redact, resolve_state_spec

# Plaintext of the demo keys whose hashes ship in deployments/config/serve-default.yaml.
DEMO_KEYS = {
    "acme (dedicated)": "tk-demo-acme-dedicated",
    "globex (shared)": "tk-demo-globex-shared",
    "initech (shared)": "tk-demo-initech-shared",
    "(admin key)": "tk-demo-admin",
}


def check_config(config_path: Path) -> TieredConfig | None:
    """The config, its keys from TIERED_API_KEYS / TIERED_ADMIN_KEYS / TIERED_API_KEYS_FILE
    checked the way the ingress will check them; None after a one-line error, so that a bad
    key file stops `tiered serve` here instead of as a replica traceback after Ray starts."""
    from deployments.tenancy.key_source import key_warnings
    from deployments.tenancy.keys import load_key_rings

    try:
        config = load_config(config_path)
        rings = load_key_rings(config)
    except ConfigError as exc:  # a missing file and bad YAML included (line, column)
        print(f"error: {exc}", file=sys.stderr)
        return None
    for line in key_warnings(config, rings):
        print(f"warning: {line}", file=sys.stderr)
    return config


async def _open_and_close(spec: StateSpec) -> None:
    from deployments.state.store import StateStore

    store = await StateStore.open(spec)
    await store.close()


def check_state(config: TieredConfig) -> StateSpec | None:
    """The ledger's database reachable (within state.connect_timeout_s) and migrated, or
    refused with its reason, before Ray starts; None after a one-line error."""
    from deployments.state.errors import StateError

    try:
        spec = resolve_state_spec(config.state)
        asyncio.run(_open_and_close(spec))
    except (ValueError, StateError) as exc:  # a bad $TIERED_STATE_URL, unreachable, schema
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return None
    return spec


def serve_forever(
    config_path: Path, host: str, port: int, num_cpus: int, proxy: ProxyMode = DEFAULT_PROXY_MODE
) -> int:
    config = check_config(config_path)
    if config is None:
        return 2
    state = check_state(config)
    if state is None:
        return 2
    config = config.model_copy(update={"state": state})  # deploy what was checked
    import ray
    from ray import serve

    from deployments.app import serve_apps
    from models.default_model import resolve_model_path

    console = Console()
    for model in config.models:
        with console.status(f"preparing model {model.name} ({model.path})"):
            resolve_model_path(model.path)
    use_proxy_mode(proxy)  # read by the Ray processes ray.init starts
    # "local": always a new instance, never a cluster already running on this machine.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    with console.status("deploying replicas (first start loads the model on every rank)"):
        apps = serve_apps(config)
        for app in apps:  # the main application first: a front door calls its replicas
            serve.run(app.app, name=app.name, route_prefix=app.route_prefix)
    url = f"http://{host}:{port}/v1"
    table = Table(title=f"Tiered is serving at {url}")
    table.add_column("tenant")
    table.add_column("API key")
    if config_path.resolve() == DEFAULT_CONFIG:
        for tenant, key in DEMO_KEYS.items():
            table.add_row(tenant, key)
    console.print(table)
    for app in apps[1:]:
        console.print(f"{app.tenant}'s own front door: http://{host}:{port}{app.route_prefix}/v1")
    console.print(
        f"Usage ledger: {redact(state.url)}  (tiered usage, GET /admin/usage)", soft_wrap=True
    )
    console.print(
        f"Try:  curl {url}/chat/completions -H 'Authorization: Bearer tk-demo-globex-shared' "
        "-H 'Content-Type: application/json' "
        """-d '{"model": "tiny-llama", "messages": [{"role": "user", "content": "Hello"}]}'""",
        soft_wrap=True,  # one line to copy, however narrow the terminal
    )
    console.print("Ctrl-C to stop.")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    console.print("shutting down…")
    # The app first, while the proxies still answer: in-flight responses reach their
    # clients and each ingress commits its usage records before it stops.
    for app in reversed(apps):
        serve.delete(app.name)
    serve.shutdown()
    ray.shutdown()
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    cmd = groups.add_parser("serve", help="run Tiered on a local Ray cluster")
    cmd.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    cmd.add_argument("--host", default="127.0.0.1")
    cmd.add_argument("--port", type=int, default=8000)
    cmd.add_argument("--num-cpus", type=int, default=8, help="logical CPUs for the local Ray")
    cmd.add_argument(
        "--proxy", choices=PROXY_MODES, default=DEFAULT_PROXY_MODE,
        help="HTTP front: HAProxy and direct ingress, or Serve's proxy actor (README)",
    )
    cmd.set_defaults(
        handler=lambda a: serve_forever(a.config, a.host, a.port, a.num_cpus, a.proxy)
    )

    keys = groups.add_parser("keys", help="API keys").add_subparsers(
        dest="keys_command", required=True
    )
    new = keys.add_parser("new", help="print a fresh key and the hash line to paste")
    who = new.add_mutually_exclusive_group(required=True)
    who.add_argument("tenant", nargs="?", help="the tenant the key is for")
    who.add_argument("--admin", action="store_true", help="an admin key (GET /admin/usage)")

    def _new(args: argparse.Namespace) -> int:
        from deployments.tenancy.keys import new_key_command

        try:
            print(new_key_command(None if args.admin else args.tenant), end="")
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0

    new.set_defaults(handler=_new)
