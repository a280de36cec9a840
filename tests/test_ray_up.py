"""`ray up` on stock Ubuntu 22.04 GPU images: every node gets Python 3.11 and Tiered
(cluster/node-setup.sh), file_mounts sends the repository without virtualenvs, git
metadata or bench output, the Tiered YAML the cluster deploys is one file mount, the head
runs Prometheus, and local.yaml uses no legacy fields."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config

from deployments.config.tiered import load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
RAY_UP = ["aws-gpu.yaml", "gcp-gpu.yaml", "local.yaml"]
NODE_SETUP = "bash ~/tiered/cluster/node-setup.sh"


def raw(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", RAY_UP)
def test_every_node_sets_up_python_311_first(name: str) -> None:
    config = prepare_config(raw(name))
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert config[key][0] == NODE_SETUP, key  # before anything that runs python3
    assert raw(name)["setup_commands"] == [NODE_SETUP]
    text = (CLUSTER / name).read_text()
    assert "pip install -q -e" not in text  # installed as a package, not from the tree


@pytest.mark.parametrize("name", RAY_UP)
def test_file_mounts_leave_out_venvs_git_and_bench_results(name: str) -> None:
    config = raw(name)
    assert {"**/.venv", "**/.git", "bench/results", "**/__pycache__"} <= set(
        config["rsync_exclude"]
    )
    assert config["rsync_filter"] == [".gitignore"]
    gitignore = (ROOT / ".gitignore").read_text().split()
    assert ".venv/" in gitignore and "bench/results/" in gitignore


@pytest.mark.parametrize("name", RAY_UP)
def test_the_tiered_yaml_is_one_file_mount(name: str) -> None:
    config = raw(name)
    source = ROOT / config["file_mounts"]["~/tiered.yaml"]
    load_config(source, checkpoints=False)  # a Tiered YAML in this repository
    commands = " ".join(" ".join(c.split()) for c in config["head_start_ray_commands"])
    assert "tiered config render --config ~/tiered.yaml" in commands
    assert "serve-gpu.yaml" not in commands


@pytest.mark.parametrize("name", RAY_UP)
def test_the_head_alone_runs_prometheus_with_tiereds_config(name: str) -> None:
    config = prepare_config(raw(name))
    (prometheus,) = [" ".join(c.split()) for c in config["head_setup_commands"]
                     if "prometheus" in c]  # fmt: skip
    assert "apt-get install -y -q prometheus" in prometheus
    assert ("~/tiered/deployments/observability/prometheus.yml "
            "~/tiered/deployments/observability/alerts.yaml /etc/prometheus/") in prometheus
    assert prometheus.endswith("sudo systemctl restart prometheus")
    assert not [c for c in config["worker_setup_commands"] if "prometheus" in c]
    scrape = yaml.safe_load((ROOT / "deployments/observability/prometheus.yml").read_text())
    assert scrape["rule_files"] == ["alerts.yaml"]  # found beside it in /etc/prometheus


def test_local_yaml_uses_no_legacy_min_workers() -> None:
    config = raw("local.yaml")
    assert "min_workers" not in config and "max_workers" not in config
    prepared = prepare_config(config)
    (node_type,) = prepared["available_node_types"].values()
    workers = len(config["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == workers


def _fake_bin(tmp_path: Path, python311: bool) -> tuple[Path, Path]:
    """sudo, apt-get, add-apt-repository and (when `python311`) a python3.11 that makes a
    venv whose python logs what it is asked to install."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(exist_ok=True)
    stubs = {
        "sudo": 'shift_env() { [ "$1" = "-E" ] && shift; "$@"; }; shift_env "$@"',
        "apt-get": f'echo "apt-get $*" >> {log}',
        "add-apt-repository": f'echo "add-apt-repository $*" >> {log}',
    }
    if python311:
        venv_python = f'#!/bin/sh\necho "venv-python $*" >> {log}\n'
        stubs["python3.11"] = (
            f'echo "python3.11 $*" >> {log}; mkdir -p "$3/bin"; '
            f"printf '%s' '{venv_python}' > \"$3/bin/python\"; chmod +x \"$3/bin/python\""
        )
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    for tool in ("grep", "mkdir", "chmod"):  # all else the script finds is a stub
        (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    return bin_dir, log


def _node_setup(tmp_path: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(CLUSTER / "node-setup.sh")],
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},  # never this machine's python3.11
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_node_setup_makes_a_311_venv_installs_tiered_and_puts_it_on_path(
    tmp_path: Path,
) -> None:
    bin_dir, log = _fake_bin(tmp_path, python311=True)
    for _ in range(2):  # `ray up` runs it on every start
        proc = _node_setup(tmp_path, bin_dir)
        assert proc.returncode == 0, proc.stderr
    venv = tmp_path / "tiered-venv"
    calls = log.read_text().splitlines()
    assert calls.count(f"python3.11 -m venv {venv}") == 1  # made once, then kept
    assert not [c for c in calls if c.startswith(("apt-get", "add-apt-repository"))]
    installs = [c for c in calls if c.startswith("venv-python -m pip install")]
    assert installs[:3] == [
        "venv-python -m pip install -q --upgrade pip",
        "venv-python -m pip install -q torch==2.13.0",
        f"venv-python -m pip install -q {tmp_path}/tiered",
    ]
    bashrc = (tmp_path / ".bashrc").read_text().splitlines()
    assert bashrc == [f'export PATH="{venv}/bin:$PATH"  # Tiered (cluster/node-setup.sh)']


def test_node_setup_installs_python_311_where_the_image_has_310(tmp_path: Path) -> None:
    """Without python3.11 on PATH, deadsnakes' is installed (then the stub venv step fails:
    this fake apt-get installs nothing, and the script stops there)."""
    bin_dir, log = _fake_bin(tmp_path, python311=False)
    proc = _node_setup(tmp_path, bin_dir)
    assert proc.returncode != 0 and "python3.11" in proc.stderr
    assert log.read_text().splitlines() == [
        "apt-get update -q",
        "apt-get install -y -q software-properties-common",
        "add-apt-repository -y ppa:deadsnakes/ppa",
        "apt-get install -y -q python3.11 python3.11-venv",
    ]
