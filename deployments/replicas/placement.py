"""Ray actor options for the ranks of one replica, from its placement-group bundles.

The bundles themselves (and whether they fit) are derived from the config in
deployments.config.resources.
"""

from __future__ import annotations

from deployments.config.resources import Resources


def replica_actor_options(bundle0: Resources) -> dict:
    """The replica actor takes bundle 0's CPU and its GPU, if any."""
    options: dict = {"num_cpus": bundle0.get("CPU", 0.0)}
    if bundle0.get("GPU"):
        options["num_gpus"] = bundle0["GPU"]
    return options


def worker_actor_options(bundle: Resources) -> dict:
    """A TP worker takes its bundle's GPU, and its CPU when the bundle has one."""
    return {"num_cpus": bundle.get("CPU", 0.0), "num_gpus": bundle.get("GPU", 0.0)}
