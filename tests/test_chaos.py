"""`tiered chaos` in its short form, one fault after another on one Tiered app on the
session's two-node cluster (real Serve HTTP, the ledger on a real PostgreSQL): each fault
runs under a small streaming load of a shared and a dedicated tenant, and the runner's
own checks (bench/chaos/faults.py) must all pass. The order is the issue's: client
disconnects, a model-server replica killed, a TP worker rank killed, an ingress replica
killed, the admission actor killed, the database down for 10 s, a worker node removed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray import serve

from bench.chaos.faults import FAULTS
from bench.chaos.observe import ChaosTarget
from bench.chaos.report import render
from bench.chaos.run import run_fault
from bench.chaos.scenarios import chaos_config, local_roles, short_shape
from deployments.app import build_from_config
from tests.postgres_server import PostgresServer
from tests.state_fixtures import postgres_server  # noqa: F401

APP = "chaos"


@pytest.fixture(scope="module")
def target(ray_cluster, tiny_model_dir: Path,
           postgres_server: PostgresServer) -> Iterator[ChaosTarget]:  # noqa: F811
    url = postgres_server.create_database("chaos")
    roles = local_roles("test")
    config = chaos_config(str(tiny_model_dir), url, roles)
    serve.run(build_from_config(config), name=APP, route_prefix="/")
    yield ChaosTarget(
        app=APP, root=f"http://127.0.0.1:{ray_cluster.serve_port}", model=config.models[0].name,
        admin_key=roles.admin_key, probe_key=roles.probe.key, cluster=ray_cluster,
        database=postgres_server,
    )
    serve.delete(APP)
    if postgres_server.running:
        postgres_server.drop_database("chaos")


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_short_form(target: ChaosTarget, fault: str) -> None:
    report = asyncio.run(asyncio.wait_for(
        run_fault(target, FAULTS[fault], short_shape(fault, local_roles("test"))), 240
    ))
    print("\n" + render([report]))
    failed = [f"{c.name}: {c.detail}" for c in report.checks if not c.passed]
    assert report.checks and not failed, failed
