"""Shared fixtures: the embedded tiny checkpoint, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ports import free_port


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` default checkpoint, in a cache dir private to this test session."""
    from models.default_model import make_default

    cache = tmp_path_factory.mktemp("tiered-cache")
    os.environ["TIERED_CACHE_DIR"] = str(cache)
    return make_default("tiny", cache / "tiny")


@pytest.fixture(scope="session")
def ray_cluster(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A two-node local Ray cluster (ray.cluster_utils.Cluster) with Serve, for the session.

    Logical CPUs exceed the box's 2 cores on purpose: replicas reserve CPUs per TP rank.
    Each node carries a node-type resource so tests can pin and spread replicas. Each
    node's metrics agent listens on its own loopback port (`cluster.metrics_ports`) and
    reports every second, so metric tests need not wait Ray's default 10 s.
    """
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    # Each app's ledger defaults to a SQLite file under the state dir: one per session.
    os.environ["TIERED_STATE_DIR"] = str(tmp_path_factory.mktemp("tiered-state"))
    metrics_ports = [free_port(), free_port()]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 6,
            "resources": {"node_head": 100},
            "metrics_export_port": metrics_ports[0],
            "_system_config": {"metrics_report_interval_ms": 1000},
        },
    )
    cluster.add_node(
        num_cpus=6, resources={"node_worker": 100}, metrics_export_port=metrics_ports[1]
    )
    cluster.metrics_ports = metrics_ports
    env = {k: os.environ[k] for k in ("TIERED_CACHE_DIR", "TIERED_STATE_DIR")}
    ray.init(address=cluster.address, runtime_env={"env_vars": env})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cluster.serve_port = port
    yield cluster
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def local_ray():  # type: ignore[no-untyped-def]
    """A local Ray for this module, or the session's when one is already up."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
