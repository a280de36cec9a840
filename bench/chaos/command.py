"""`tiered chaos`: faults under load, and what each cost, as a table.

    tiered chaos list
    tiered chaos run all                 # every fault, on a local 2-node cluster it starts
    tiered chaos run replica_kill --short
    tiered chaos run soak [--minutes 10]
    tiered chaos run replica_kill --address auto --url http://host:8000 --app tiered \\
        --tenant shared=NAME:KEY --tenant probe=NAME:KEY [--tenant dedicated=NAME:KEY] \\
        [--tenant leaver=NAME:KEY]       # admin key: TIERED_ADMIN_KEY

Locally the run deploys its own Tiered app (bench/chaos/scenarios.py) on a
ray.cluster_utils.Cluster (head + 1 worker node), with its ledger on a throwaway
PostgreSQL when one is installed (else SQLite, and `database_down` is skipped). Against
an existing cluster only the faults named run, and none that needs the run's own cluster
or database. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from rich.console import Console

from bench.chaos.faults import FAULTS, SOAK, Fault, FaultUnavailable
from bench.chaos.observe import ChaosTarget
from bench.chaos.report import FaultReport, render
from bench.chaos.run import LoadShape
from bench.chaos.scenarios import (
    ROLES,
    Roles,
    Tenant,
    full_shape,
    local_roles,
    short_shape,
    soak_shape,
)

RESULTS = Path("bench/results")
APP = "chaos"


def token_auth_like_ray_start() -> None:
    """`ray start` turns token authentication on when a token is at hand (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and RAY_AUTH_MODE is unset; a driver joining
    with `ray.init(address=...)` does not, and such a cluster refuses it. Do as `ray start`
    does, with its own function (Ray's config is read at import: setting the variable
    alone is too late). RAY_AUTH_MODE, when set, wins."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def parse_roles(items: list[str], admin_key: str | None) -> Roles:
    found: dict[str, Tenant] = {}
    for item in items:
        role, _, rest = item.partition("=")
        name, _, key = rest.partition(":")
        if role not in ROLES or not name or not key:
            raise ValueError(f"--tenant {item!r}: expected ROLE=NAME:KEY, ROLE one of {ROLES}")
        found[role] = Tenant(name, key)
    missing = {"shared", "probe"} - found.keys()
    if missing or not admin_key:
        raise ValueError(f"--address needs --tenant for {sorted(missing) or 'each role'} "
                         "and the admin key in TIERED_ADMIN_KEY")
    return Roles(found["shared"], found.get("leaver", found["shared"]), found["probe"],
                 admin_key, found.get("dedicated"))


def _shape(fault: Fault, roles: Roles, args: argparse.Namespace) -> LoadShape:
    if fault is SOAK:
        return soak_shape(roles, args.minutes)
    return short_shape(fault.name, roles) if args.short else full_shape(fault.name, roles)


@contextmanager
def local_target(console: Console, roles: Roles) -> Iterator[ChaosTarget]:
    """A head and a worker node (cluster_utils), Serve on loopback, the chaos app."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from bench.chaos.scenarios import chaos_config
    from bench.targets import _deploy, _free_port
    from deployments.app import build_from_config
    from deployments.state.config import state_dir
    from models.default_model import resolve_model_path
    from tests.postgres_server import PostgresServer, find_postgres_bin

    with ExitStack() as stack:
        database = None
        if find_postgres_bin() is not None:
            database = stack.enter_context(PostgresServer())
            url = database.create_database("chaos")
        else:
            url = f"sqlite+aiosqlite:///{state_dir() / 'chaos.db'}"
            console.print("[yellow]no PostgreSQL here: SQLite ledger, database_down skipped")
        with console.status("starting a 2-node local Ray cluster"):
            cluster = Cluster(initialize_head=True,
                              head_node_args={"num_cpus": 6, "resources": {"node_head": 100}})
            stack.callback(cluster.shutdown)
            cluster.add_node(num_cpus=6, resources={"node_worker": 100})
            ray.init(address=cluster.address, log_to_driver=False)
            stack.callback(ray.shutdown)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        stack.callback(serve.shutdown)
        config = chaos_config(str(resolve_model_path("default:tiny")), url, roles)
        with console.status("deploying the chaos app (every replica loads the model)"):
            _deploy(build_from_config(config), APP, "/", 300.0)
        yield ChaosTarget(APP, f"http://127.0.0.1:{port}", config.models[0].name,
                          roles.admin_key, roles.probe.key, cluster=cluster, database=database)


def _faults(name: str) -> list[Fault]:
    if name == "soak":
        return [SOAK]
    if name == "all":
        return list(FAULTS.values())
    if name not in FAULTS:
        raise ValueError(f"no scenario {name!r}; choose all, soak or one of {sorted(FAULTS)}")
    return [FAULTS[name]]


def run_all(target: ChaosTarget, faults: list[Fault], roles: Roles,
            args: argparse.Namespace, console: Console) -> list[FaultReport]:
    from bench.chaos.run import run_fault

    reports = []
    for fault in faults:
        if (fault.needs == "cluster" and target.cluster is None) or (
                fault.needs == "database" and target.database is None):
            console.print(f"[yellow]{fault.name}: skipped (needs the run's own {fault.needs})")
            continue
        console.print(f"[bold]{fault.name}[/bold] …")
        try:
            report = asyncio.run(run_fault(target, fault, _shape(fault, roles, args)))
        except FaultUnavailable as exc:
            console.print(f"[yellow]{fault.name}: skipped ({exc})")
            continue
        console.print(render([report]), highlight=False, markup=False)
        reports.append(report)
    return reports


def _run(args: argparse.Namespace) -> int:
    from bench.command import machine

    console = Console()
    try:
        faults = _faults(args.scenario)
        if args.address:
            roles = parse_roles(args.tenant, os.environ.get("TIERED_ADMIN_KEY"))
            if not args.url:
                raise ValueError("--address needs --url (the server root, e.g. http://host:8000)")
    except ValueError as exc:
        console.print(f"[red]{exc}")
        return 2
    with ExitStack() as stack:
        if args.address:
            import ray

            token_auth_like_ray_start()
            ray.init(address=args.address, log_to_driver=False)
            stack.callback(ray.shutdown)
            target = ChaosTarget(args.app, args.url.rstrip("/").removesuffix("/v1"),
                                 args.model, roles.admin_key, roles.probe.key)
        else:
            roles = local_roles("tiered-chaos")
            target = stack.enter_context(local_target(console, roles))
        reports = run_all(target, faults, roles, args, console)
    out = args.out or RESULTS / f"chaos-{args.scenario}{'-short' if args.short else ''}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.txt").write_text(render(reports) + "\n")
    (out / "result.json").write_text(json.dumps(
        {"scenario": args.scenario, "short": args.short, "machine": machine(),
         "target": "local 2-node cluster" if not args.address else args.url,
         "faults": [r.to_json() for r in reports]}, indent=2, default=str) + "\n")
    console.print(f"wrote {out / 'table.txt'} and {out / 'result.json'}")
    return 0 if reports and all(r.passed for r in reports) else 1


def _list(args: argparse.Namespace) -> int:
    console = Console()
    for name, fault in {**FAULTS, "soak": SOAK}.items():
        needs = f" (needs the run's own {fault.needs})" if fault.needs else ""
        console.print(f"{name}{needs}: {' '.join((fault.checks.__doc__ or '').split())}")
    return 0


def register(groups: argparse._SubParsersAction) -> None:
    chaos = groups.add_parser("chaos", help="fault injection under load, and what it cost")
    sub = chaos.add_subparsers(dest="chaos_command", required=True)
    run = sub.add_parser("run", help="run faults: all, soak, or one fault by name")
    run.add_argument("scenario", help="all, soak, or a fault from `tiered chaos list`")
    run.add_argument("--short", action="store_true", help="the short form (as make test)")
    run.add_argument("--minutes", type=float, default=10.0, help="soak length")
    run.add_argument("--address", help="an existing Ray cluster (e.g. auto) instead of a "
                     "local one the run starts")
    run.add_argument("--url", help="with --address: the server root (http://host:port)")
    run.add_argument("--app", default="tiered", help="with --address: the Serve app name")
    run.add_argument("--model", default="tiny-llama", help="with --address: the model")
    run.add_argument("--tenant", action="append", default=[], metavar="ROLE=NAME:KEY",
                     help=f"with --address: the tenant of a role ({', '.join(ROLES)})")
    run.add_argument("--out", type=Path, default=None, help="output directory")
    run.set_defaults(handler=_run)
    ls = sub.add_parser("list", help="the faults and what each checks")
    ls.set_defaults(handler=_list)
