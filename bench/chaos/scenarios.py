"""Who the chaos load is (tenant roles), the Tiered app a run deploys on a cluster it
starts, and each fault's load: short (a few requests, for `make test`) and full (`make
chaos`), plus the 10-minute soak."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from bench.chaos.load import TenantLoad
from bench.chaos.run import LoadShape
from deployments.config.tiered import TieredConfig
from deployments.tenancy.keys import hash_key

MODEL = "tiny-llama"
ROLES = ("shared", "dedicated", "leaver", "probe")


@dataclass(frozen=True)
class Tenant:
    name: str
    key: str


@dataclass(frozen=True)
class Roles:
    """The tenants a run sends as: steady shared and dedicated clients (their tokens are
    compared with the ledger), clients that walk away, and the health probe."""

    shared: Tenant
    leaver: Tenant
    probe: Tenant
    admin_key: str
    dedicated: Tenant | None = None


def local_roles(seed: str) -> Roles:
    """Roles for the app `chaos_config` deploys; keys derived from a seed."""

    def tenant(role: str) -> Tenant:
        digest = hashlib.sha256(f"{seed}:{role}".encode()).hexdigest()[:24]
        return Tenant(f"chaos-{role}", f"tk-chaos-{digest}")

    admin = "tk-chaos-admin-" + hashlib.sha256(f"{seed}:admin".encode()).hexdigest()[:24]
    return Roles(tenant("shared"), tenant("leaver"), tenant("probe"), admin,
                 tenant("dedicated"))


def chaos_config(model_path: str, state_url: str, roles: Roles) -> TieredConfig:
    """A shared pool of 2 TP=2 replicas, a dedicated tenant on one TP=1 replica (on the
    worker node, with the `node_worker` resource, which node_removal takes) that spills
    to the shared pool, 2 ingress replicas, the ledger at `state_url`."""
    engine = {"num_kv_blocks": 256, "max_num_seqs": 4, "max_num_batched_tokens": 512}
    assert roles.dedicated is not None

    def tenant(t: Tenant, **kw: object) -> dict:
        return {"name": t.name, "api_key_hashes": [hash_key(t.key)], **kw}

    return TieredConfig.model_validate({
        "models": [{"name": MODEL, "path": model_path, "engine": engine,
                    "shared_pool": {"num_replicas": 2, "tp_size": 2}}],
        "tenants": [
            tenant(roles.shared),
            # On the worker node, so node_removal takes it: its tenant must spill.
            tenant(roles.dedicated, tier="dedicated", dedicated={
                "model": MODEL, "reserved_replicas": 1, "max_replicas": 1, "spill": True,
                "replica": {"node_type_resource": "node_worker"},
            }),
            tenant(roles.leaver),
            tenant(roles.probe),
        ],
        "admin_key_hashes": [hash_key(roles.admin_key)],
        "dispatch": {"queue_deadline_s": 30},
        # One per node: a node's removal must leave an ingress replica serving.
        "ingress": {"num_replicas": 2, "max_replicas_per_node": 1},
        "state": {"url": state_url, "connect_timeout_s": 3},
    })


def _steady(roles: Roles, clients: int, max_tokens: int, **kw: int) -> list[TenantLoad]:
    loads = [TenantLoad(roles.shared.name, roles.shared.key, clients, max_tokens, **kw)]
    if roles.dedicated is not None:
        loads.append(TenantLoad(roles.dedicated.name, roles.dedicated.key,
                                max(1, clients // 2), max_tokens, **kw))
    return loads


def _leaver(roles: Roles) -> TenantLoad:
    return TenantLoad(roles.leaver.name, roles.leaver.key, clients=0, max_tokens=200)


def short_shape(fault: str, roles: Roles) -> LoadShape:
    """A few requests: 3 streaming clients, the fault, 2 s without errors after it."""
    return LoadShape(_steady(roles, 2, 48), leaver=_leaver(roles),
                     disconnects=10 if fault == "disconnects" else 0,
                     warm_requests=3, after_s=2.0)


def full_shape(fault: str, roles: Roles) -> LoadShape:
    """The `make chaos` form: 6 clients, 100 disconnects, 10 s without errors after it."""
    return LoadShape(_steady(roles, 4, 64), leaver=_leaver(roles),
                     disconnects=100 if fault == "disconnects" else 0,
                     warm_requests=10, after_s=10.0)


def soak_shape(roles: Roles, minutes: float = 10.0) -> LoadShape:
    """Mixed load for `minutes`: every 7th request of a client disconnects (mid-stream or
    mid-queue), every 11th is a bad request (a 400); RSS sampled at minute 2 and the end."""
    steady = _steady(roles, 4, 64, disconnect_every=7, bad_every=11)
    return LoadShape(steady, warm_requests=10, after_s=minutes * 60,
                     healthy_timeout_s=minutes * 60 + 120, idle_timeout_s=minutes * 60 + 180,
                     rss_from_s=min(120.0, minutes * 12))
