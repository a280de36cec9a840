"""`ray up` YAMLs and rendered Serve configs, checked by Ray's own validators, and the node
types checked against every reservation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from cli.main import main
from deployments.config.tiered import load_config
from deployments.render import render_serve_config
from deployments.replicas.capacity import reservation_problems

CLUSTER = Path(__file__).resolve().parent.parent / "cluster"
RAY_UP = ["aws-gpu.yaml", "gcp-gpu.yaml", "local.yaml"]
TIERED = ["serve-default.yaml", "serve-gpu.yaml"]


def _node_types(cluster_yaml: str) -> dict:
    cfg = yaml.safe_load((CLUSTER / cluster_yaml).read_text())
    return {
        name: {
            "resources": t["resources"],
            "min_workers": t.get("min_workers", 0),
            "max_workers": t.get("max_workers", 0),
        }
        for name, t in cfg["available_node_types"].items()
        if t.get("max_workers", 0) > 0
    }


@pytest.mark.parametrize("name", RAY_UP)
def test_cluster_yaml_passes_rays_schema(name: str) -> None:
    config = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("name", TIERED)
def test_rendered_serve_config_passes_serve_schema(name: str) -> None:
    rendered = render_serve_config(load_config(CLUSTER / name, checkpoints=False))
    schema = ServeDeploySchema(**rendered)
    app = schema.applications[0]
    assert app.import_path == "deployments.app:build" and app.route_prefix == "/"
    assert {d["name"] for d in rendered["applications"][0]["deployments"]} >= {"ingress"}


@pytest.mark.parametrize("cluster_yaml", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_gpu_node_types_hold_every_reservation(cluster_yaml: str) -> None:
    config = load_config(CLUSTER / "serve-gpu.yaml", checkpoints=False)
    assert {k: v.model_dump() for k, v in config.node_types.items()} == _node_types(cluster_yaml)
    assert reservation_problems(config) == []


def test_a_reservation_larger_than_the_node_type_is_reported() -> None:
    config = load_config(CLUSTER / "serve-gpu.yaml", checkpoints=False)
    config.tenants[0].dedicated.reserved_replicas = 3  # type: ignore[union-attr]
    config.tenants[0].dedicated.max_replicas = 3  # type: ignore[union-attr]
    problems = reservation_problems(config)
    assert len(problems) == 1
    assert "tenants[0].dedicated.replica: 3 replica(s) of 8 rank(s)" in problems[0]
    assert "hold only 2" in problems[0]


def test_render_command_writes_a_deployable_config(tmp_path: Path) -> None:
    out = tmp_path / "serve.yaml"
    code = main(
        ["config", "render", "--config", str(CLUSTER / "serve-gpu.yaml"), "-o", str(out),
         "--env", "TIERED_API_KEYS_FILE=/etc/tiered/keys.yaml"]
    )
    assert code == 0
    rendered = yaml.safe_load(out.read_text())
    ServeDeploySchema(**rendered)
    app = rendered["applications"][0]
    assert app["runtime_env"]["env_vars"]["TIERED_API_KEYS_FILE"] == "/etc/tiered/keys.yaml"
    assert app["args"]["tiered"]["tenants"][0]["dedicated"]["replica"]["tp_size"] == 8


def test_render_command_refuses_what_the_nodes_cannot_hold(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = yaml.safe_load((CLUSTER / "serve-gpu.yaml").read_text())
    bad["node_types"]["dedicated_acme"].update(min_workers=0, max_workers=0)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["config", "render", "--config", str(path)]) == 2
    assert "cannot hold the reservations" in capsys.readouterr().err


@pytest.mark.parametrize("name", RAY_UP)
def test_every_node_gets_the_keys_file_the_app_reads(name: str) -> None:
    """Ingress replicas run on any node: the keys file is a file mount (synced to every
    node), and the head renders the Serve config pointing at that same path."""
    config = yaml.safe_load((CLUSTER / name).read_text())
    assert config["file_mounts"]["~/tiered-keys.yaml"] == "./tiered-keys.yaml"
    render = next(c for c in config["head_start_ray_commands"] if "config render" in c)
    assert "--env TIERED_API_KEYS_FILE=$HOME/tiered-keys.yaml" in " ".join(render.split())
    assert any(c.startswith("serve deploy") for c in config["head_start_ray_commands"])
