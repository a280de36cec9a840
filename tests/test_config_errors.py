"""Configuration errors that autoscaling and placement depend on fail at load, with a
message naming the field: through the real YAML loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deployments.config.models import ConfigError
from deployments.config.tiered import load_config

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
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, config)
