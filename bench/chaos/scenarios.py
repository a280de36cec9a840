"""The Tiered app a chaos run deploys on a cluster it starts, and each fault's load:
short (a few requests, for `make test`) and full (`make chaos`)."""

from __future__ import annotations

import hashlib

from bench.chaos.load import TenantLoad
from bench.chaos.run import LoadShape
from deployments.config.tiered import TieredConfig
from deployments.tenancy.keys import hash_key

MODEL = "tiny-llama"
SHARED, DEDICATED, LEAVER, PROBE = "chaos-shared", "chaos-dedicated", "chaos-leaver", "chaos-probe"


def chaos_keys(seed: str) -> dict[str, str]:
    """The run's API keys, derived from a seed (the run prints nothing secret)."""
    return {
        name: "tk-chaos-" + hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:24]
        for name in (SHARED, DEDICATED, LEAVER, PROBE, "admin")
    }


def chaos_config(model_path: str, state_url: str, keys: dict[str, str]) -> TieredConfig:
    """A shared pool of 2 TP=2 replicas, a dedicated tenant on one TP=1 replica that
    spills to the shared pool, 2 ingress replicas, the ledger at `state_url`."""
    engine = {"num_kv_blocks": 256, "max_num_seqs": 4, "max_num_batched_tokens": 512}

    def tenant(name: str, **kw: object) -> dict:
        return {"name": name, "api_key_hashes": [hash_key(keys[name])], **kw}

    return TieredConfig.model_validate({
        "models": [{"name": MODEL, "path": model_path, "engine": engine,
                    "shared_pool": {"num_replicas": 2, "tp_size": 2}}],
        "tenants": [
            tenant(SHARED),
            tenant(DEDICATED, tier="dedicated", dedicated={
                "model": MODEL, "reserved_replicas": 1, "max_replicas": 1, "spill": True,
            }),
            tenant(LEAVER),
            tenant(PROBE),
        ],
        "admin_key_hashes": [hash_key(keys["admin"])],
        "dispatch": {"queue_deadline_s": 30},
        "ingress": {"num_replicas": 2},
        "state": {"url": state_url, "connect_timeout_s": 3},
    })


def _tenants(keys: dict[str, str], clients: int, max_tokens: int) -> list[TenantLoad]:
    return [
        TenantLoad(SHARED, keys[SHARED], clients=clients, max_tokens=max_tokens),
        TenantLoad(DEDICATED, keys[DEDICATED], clients=max(1, clients // 2),
                   max_tokens=max_tokens),
    ]


def short_shape(fault: str, keys: dict[str, str]) -> LoadShape:
    """A few requests: 3 streaming clients, the fault, 2 s more."""
    leaver = TenantLoad(LEAVER, keys[LEAVER], clients=0, max_tokens=200)
    disconnects = 10 if fault == "disconnects" else 0
    return LoadShape(_tenants(keys, 2, 48), leaver=leaver, disconnects=disconnects,
                     warm_requests=3, after_s=2.0)


def full_shape(fault: str, keys: dict[str, str]) -> LoadShape:
    """The `make chaos` form: 6 clients, 100 disconnects, 10 s of load after recovery."""
    leaver = TenantLoad(LEAVER, keys[LEAVER], clients=0, max_tokens=200)
    disconnects = 100 if fault == "disconnects" else 0
    return LoadShape(_tenants(keys, 4, 64), leaver=leaver, disconnects=disconnects,
                     warm_requests=10, after_s=10.0)
