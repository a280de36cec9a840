"""Deploy the chaos app on a Ray cluster this process joins (not one it starts), then
leave: Serve keeps the app running. Used by tests/test_chaos_address.py, whose own process
must not join that cluster (the session's cluster_utils cluster may be joined already).

    python -m tests.address_deploy ADDRESS HTTP_PORT MODEL_DIR STATE_URL SEED
"""

from __future__ import annotations

import sys

DEPLOY_TIMEOUT_S = 600.0


def main(address: str, port: str, model_dir: str, state_url: str, seed: str) -> int:
    import ray
    from ray import serve

    from bench.chaos.command import token_auth_like_ray_start
    from bench.chaos.scenarios import chaos_config, local_roles
    from bench.targets import _deploy
    from deployments.app import build_from_config

    token_auth_like_ray_start()  # as the chaos command joins the cluster
    ray.init(address=address, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(port)})
    config = chaos_config(model_dir, state_url, local_roles(seed))
    config.ingress.max_replicas_per_node = None  # this cluster has one node
    _deploy(build_from_config(config), "tiered", "/", DEPLOY_TIMEOUT_S)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
