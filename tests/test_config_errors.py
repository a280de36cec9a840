"""Configuration errors that autoscaling, placement and authentication depend on fail at
load, with a one-line message naming the field: through the real YAML loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.config.models import ConfigError
from deployments.config.tiered import load_config
from deployments.tenancy.keys import hash_key, load_key_rings

GPU_ENGINE = {"device": "cuda", "dtype": "bfloat16"}


def _load(tmp_path: Path, config: dict):  # type: ignore[no-untyped-def]
    path = tmp_path / "tiered.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


def _config(**overrides: object) -> dict:
    base: dict = {
        "models": [
            {
                "name": "m",
                "path": "default:tiny",
                "engine": GPU_ENGINE,
                "shared_pool": {"tp_size": 2, "node_type_resource": "node_shared"},
            }
        ],
        "tenants": [
            {
                "name": "acme",
                "tier": "dedicated",
                "dedicated": {
                    "model": "m",
                    "reserved_replicas": 2,
                    "max_replicas": 3,
                    "replica": {"tp_size": 2, "node_type_resource": "node_dedicated_acme"},
                },
            }
        ],
        "node_types": {
            "shared-a10g": {"resources": {"CPU": 48, "GPU": 4, "node_shared": 1}, "max_workers": 4},
            "acme-a100": {
                "resources": {"CPU": 96, "GPU": 8, "node_dedicated_acme": 1},
                "max_workers": 2,
            },
        },
    }
    base.update(overrides)
    return base


def test_a_consistent_gpu_config_loads(tmp_path: Path) -> None:
    config = _load(tmp_path, _config())
    assert set(config.node_types) == {"shared-a10g", "acme-a100"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda c: c["models"][0]["shared_pool"].update(
                autoscaling={"min_replicas": 3, "max_replicas": 2}
            ),
            "min_replicas=3 exceeds max_replicas=2",
        ),
        (
            lambda c: c["tenants"][0]["dedicated"].update(reserved_replicas=4),
            "reserved_replicas=4 exceeds max_replicas=3",
        ),
        (
            lambda c: c["node_types"]["shared-a10g"]["resources"].update(GPU=1),
            r"models\[0\].shared_pool.tp_size: tp_size=2",
        ),
        (
            lambda c: c["node_types"]["acme-a100"]["resources"].pop("node_dedicated_acme"),
            r"tenants\[0\].dedicated.replica.node_type_resource: no node provides "
            "'node_dedicated_acme'",
        ),
        (
            lambda c: c["node_types"]["acme-a100"].update(min_workers=3),
            "min_workers=3 exceeds max_workers=2",
        ),
    ],
    ids=["min-over-max", "reservation-over-max", "too-few-gpus", "no-node-type", "workers"],
)
def test_bad_config_fails_at_load_naming_the_field(tmp_path: Path, change, message) -> None:  # type: ignore[no-untyped-def]
    config = _config()
    change(config)
    with pytest.raises(ConfigError, match=message) as err:
        _load(tmp_path, config)
    assert "\n" not in str(err.value)


MALFORMED = "sha256:1234"
GOOD = hash_key("tk-good")


def _with_keys(admin: list[str], revoked: list[str], *tenant_keys: list[str]) -> dict:
    """The base config plus shared tenants holding `tenant_keys`, and the key lists."""
    config = _config(admin_key_hashes=admin, revoked_key_hashes=revoked)
    for i, hashes in enumerate(tenant_keys):
        config["tenants"].append({"name": f"t{i + 1}", "api_key_hashes": hashes})
    return config


def test_keys_in_a_consistent_config_load_and_authenticate(tmp_path: Path) -> None:
    config = _load(tmp_path, _with_keys([GOOD.upper()], [], [hash_key("tk-t1")]))
    assert config.admin_key_hashes == [GOOD]  # stored lowercased
    rings = load_key_rings(config, {})
    assert rings.admin.tenant_for("tk-good") and rings.tenants.tenant_for("tk-t1") == "t1"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (([MALFORMED], []), r"admin_key_hashes\[0\]: not a key hash"),
        (([GOOD, "tk-plaintext"], []), r"admin_key_hashes\[1\]: not a key hash"),
        (([], [MALFORMED]), r"revoked_key_hashes\[0\]: not a key hash"),
        (([], [], [GOOD, MALFORMED]), r"tenants\[1\]\.api_key_hashes\[1\]: not a key hash"),
        (
            ([], [], [GOOD], [GOOD]),
            r"tenants\[2\]\.api_key_hashes\[0\] \(tenant 't2'\): the same key as "
            r"tenants\[1\]\.api_key_hashes\[0\] \(tenant 't1'\)",
        ),
        (
            ([GOOD], [], [GOOD]),
            r"admin_key_hashes\[0\]: the same key as tenants\[1\]\.api_key_hashes\[0\] "
            r"\(tenant 't1'\)",
        ),
    ],
    ids=[
        "admin-malformed",
        "admin-plaintext",
        "revoked-malformed",
        "tenant-malformed",
        "two-tenants",
        "tenant-and-admin",
    ],
)
def test_bad_key_hashes_fail_at_load_naming_the_field(
    tmp_path: Path, keys: tuple[list[str], ...], message: str
) -> None:
    """A malformed hash must not become a key whose plaintext is the typo, and one hash
    must not belong to two identities (the last would win, or a tenant key be admin)."""
    with pytest.raises(ConfigError, match=message) as err:
        _load(tmp_path, _with_keys(*keys))
    text = str(err.value)
    assert "\n" not in text and MALFORMED not in text and "tk-plaintext" not in text


def test_duplicate_tenant_names_fail_at_load(tmp_path: Path) -> None:
    config = _config()
    config["tenants"] += [{"name": "t"}, {"name": "t"}]
    with pytest.raises(ConfigError, match=r"tenants: duplicate tenant names: \['t'\]"):
        _load(tmp_path, config)
