"""A dedicated tenant's front door: the same ingress, in a Serve application of its own.

Its replicas run on the tenant's node type, so the Serve proxy of those nodes routes to
them first (RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING), and a load balancer that targets
those nodes keeps the tenant's whole request path (proxy, ingress, admission shard, model
server) off the nodes that serve the shared pool. The model servers stay in the main
application; the door reaches them by name.
"""

from __future__ import annotations

import asyncio
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.config.plan import deployment_plan
from deployments.config.tiered import TieredConfig

HANDLE_DEADLINE_S = 600.0  # the main application may still be deploying
HANDLE_RETRY_S = 1.0


async def main_app_handles(config: TieredConfig, main_app: str) -> dict[str, DeploymentHandle]:
    """A handle to each model-server deployment of the main application, keyed by pool,
    once the application has them (both may be deployed by one `serve deploy`)."""
    deadline = time.monotonic() + HANDLE_DEADLINE_S
    while True:
        try:
            return {
                plan.key: await asyncio.to_thread(
                    serve.get_deployment_handle, plan.deployment, main_app
                )
                for plan in deployment_plan(config)
            }
        except KeyError:  # not registered yet
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"application {main_app!r} has no model servers after {HANDLE_DEADLINE_S:.0f}s"
                ) from None
            await asyncio.sleep(HANDLE_RETRY_S)
