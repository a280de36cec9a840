"""The proxy modes' environment (deployments.proxy_mode): what Ray is told, per mode."""

from __future__ import annotations

from pathlib import Path

from deployments.proxy_mode import DIRECT_GRPC_PORTS, DIRECT_HTTP_PORTS, proxy_env
from tests import ports

KERNEL_EPHEMERAL_FROM = 32768
RAY_WORKER_PORTS = (10002, 19999)


def test_direct_ingress_ports_miss_the_tests_ray_and_the_kernel() -> None:
    for low, high in (DIRECT_HTTP_PORTS, DIRECT_GRPC_PORTS):
        assert ports._RANGE[1] < low < high <= KERNEL_EPHEMERAL_FROM
        assert low > RAY_WORKER_PORTS[1]
    assert DIRECT_HTTP_PORTS[1] <= DIRECT_GRPC_PORTS[0]  # the two ranges are disjoint
    env = proxy_env("direct", Path("/unused"))
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == str(DIRECT_HTTP_PORTS[0])
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_haproxy_files_and_side_ports_are_the_clusters_own() -> None:
    handed = iter([40001, 40002, 40003])
    scratch = Path("/tmp/thp-abcdefgh")
    env = proxy_env("haproxy", scratch, lambda: next(handed))
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    sockets = [v for k, v in env.items() if k.endswith("_PATH") or k.endswith("_LOC")]
    assert sockets and all(v.startswith(str(scratch)) for v in sockets)
    # HAProxy nests its files one directory (56 hex characters) below; a socket path has
    # at most 97 characters.
    assert all(len(v) + 57 <= 97 for v in sockets)
    side = ("STATS_PORT", "METRICS_PORT", "FALLBACK_PROXY_HTTP_PORT")
    assert sorted(v for k, v in env.items() if k.endswith(side)) == ["40001", "40002", "40003"]


def test_serve_mode_turns_both_off() -> None:
    assert proxy_env("serve", Path()) == {
        "RAY_SERVE_ENABLE_HA_PROXY": "0",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    }
