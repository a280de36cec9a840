"""`tiered chaos run <fault> --address` against a cluster the run did not start.

A real `ray start --head` on loopback ports of its own (tests/ports.py), Tiered deployed
on it by another process, then the command run as an operator would, with `--address`,
the tenants' keys and the admin key; its own pass conditions are read from its
result.json. The cluster is stopped through its own process group (`ray start --block`
in a session of its own): `ray stop` would stop every cluster on the machine. It runs
with token authentication, as `ray start` sets up when a token is at hand (its own,
in RAY_AUTH_TOKEN): the command must join such a cluster as `ray start` would.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.chaos.scenarios import MODEL, local_roles
from tests.ports import free_port

SEED = "address"
PYTHON = sys.executable
RAY = str(Path(sys.executable).parent / "ray")
STOP_TIMEOUT_S = 60


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the cluster's process group (`ray start --block` stops what it started),
    then SIGKILL to whatever is left of it."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(STOP_TIMEOUT_S)


@pytest.fixture(scope="module")
def head(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A one-node cluster of `ray start --head` with Tiered's chaos app on it."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths
    logs = tmp_path_factory.mktemp("head")
    gcs, http = free_port(), free_port()
    ports = [
        "--node-manager-port",
        "--object-manager-port",
        "--metrics-export-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--ray-client-server-port",
        "--dashboard-port",
    ]
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=12",
        '--resources={"node_head": 100, "node_worker": 100}',
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={temp}",
        *(f"{flag}={free_port()}" for flag in ports),
    ]
    env = {**os.environ, "TIERED_STATE_DIR": str(logs), "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_AUTH_MODE", None)
    with open(logs / "ray-start.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        address = f"127.0.0.1:{gcs}"
        deploy = subprocess.run(
            [
                PYTHON,
                "-m",
                "tests.address_deploy",
                address,
                str(http),
                str(tiny_model_dir),
                f"sqlite+aiosqlite:///{logs / 'ledger.db'}",
                SEED,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert deploy.returncode == 0, deploy.stderr[-4000:]
        yield {"address": address, "url": f"http://127.0.0.1:{http}", "out": logs, "env": env}
    finally:
        _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_chaos_runs_against_a_cluster_it_did_not_start(head: dict) -> None:
    roles = local_roles(SEED)
    assert roles.dedicated is not None
    tenants = [
        f"{role}={t.name}:{t.key}"
        for role, t in (
            ("shared", roles.shared),
            ("probe", roles.probe),
            ("dedicated", roles.dedicated),
            ("leaver", roles.leaver),
        )
    ]
    out = head["out"] / "chaos"
    run = subprocess.run(
        [
            PYTHON,
            "-m",
            "cli.main",
            "chaos",
            "run",
            "disconnects",
            "--short",
            "--address",
            head["address"],
            "--url",
            head["url"],
            "--app",
            "tiered",
            "--model",
            MODEL,
            *(a for t in tenants for a in ("--tenant", t)),
            "--out",
            str(out),
        ],
        env={**head["env"], "TIERED_ADMIN_KEY": roles.admin_key},
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(run.stdout[-6000:])
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads((out / "result.json").read_text())
    assert result["target"] == head["url"]
    (fault,) = result["faults"]
    failed = [c for c in fault["checks"] if not c["passed"]]
    assert fault["fault"] == "disconnects" and fault["checks"] and not failed, failed
    assert fault["extra"]["dropped_mid_stream"] + fault["extra"]["dropped_mid_queue"] == 10
