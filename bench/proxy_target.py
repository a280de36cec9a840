"""The benchmark's local cluster under each proxy mode (deployments.proxy_mode).

With `direct`, no load balancer stands in front of the ingress replicas, so the client is
pointed at one ingress replica of each app, by the port Serve gave it: the floor of what
a load balancer in front of direct ingress could reach, not a way to serve.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from deployments.proxy_mode import ProxyMode

APP_OF_ENDPOINT = {"main": "tiered", "echo": "echo"}


def _replica_port(app: str) -> int:
    """The HTTP port of one of `app`'s ingress replicas (Serve's controller knows them;
    Ray 2.60 has no public call for it)."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is None:
        raise RuntimeError("Serve is not running")
    controller = client._controller
    for group in ray.get(controller.get_target_groups.remote(app), timeout=30):
        if group.protocol == "HTTP" and group.targets:
            return int(group.targets[0].port)
    raise RuntimeError(f"application {app} has no direct-ingress HTTP target")


def endpoints_for(mode: ProxyMode, endpoints: dict[str, str]) -> dict[str, str]:
    """The endpoints the client uses: the proxy's as given, or (direct) a replica's."""
    if mode != "direct":
        return endpoints
    out = dict(endpoints)
    for name, app in APP_OF_ENDPOINT.items():
        if name in endpoints:
            url = urlsplit(endpoints[name])
            out[name] = url._replace(netloc=f"{url.hostname}:{_replica_port(app)}").geturl()
    return out
