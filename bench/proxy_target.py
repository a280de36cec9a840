"""The benchmark's local cluster under each proxy mode (deployments.proxy_mode).

With `haproxy`, Serve also keeps its Python proxy (HAProxy's fallback, on a port of its
own) and every ingress replica listens on its own port, so one run can send the same
requests through all three paths: HAProxy (`main`, `echo`), Serve's proxy (`main@serve`,
`echo@serve`) and straight to one ingress replica (`main@direct`, `echo@direct`: the floor
of what any load balancer in front of direct ingress could reach, not a way to serve).
With `direct`, `main` and `echo` themselves point at one replica each.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from deployments.proxy_mode import ProxyMode

APP_OF_ENDPOINT = {"main": "tiered", "echo": "echo"}


def _controller() -> Any:
    """Serve's controller actor handle."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise RuntimeError("Serve is not running")
    return client._controller


def _replica_port(app: str) -> int:
    """The HTTP port of one of `app`'s ingress replicas (Serve's controller knows them;
    Ray 2.60 has no public call for it)."""
    import ray

    for group in ray.get(_controller().get_target_groups.remote(app), timeout=30):
        if group.protocol == "HTTP" and group.targets:
            return int(group.targets[0].port)
    raise RuntimeError(f"application {app} has no direct-ingress HTTP target")


def _on_port(url: str, port: int | str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"{parts.hostname}:{port}").geturl()


def endpoints_for(mode: ProxyMode, endpoints: dict[str, str]) -> dict[str, str]:
    """The endpoints the client may use under `mode` (see the module's docstring)."""
    out = dict(endpoints)
    for name, app in APP_OF_ENDPOINT.items():
        if name not in endpoints:
            continue
        if mode == "direct":
            out[name] = _on_port(endpoints[name], _replica_port(app))
        elif mode == "haproxy":
            fallback = os.environ["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]
            out[f"{name}@serve"] = _on_port(endpoints[name], fallback)
            out[f"{name}@direct"] = _on_port(endpoints[name], _replica_port(app))
    return out
